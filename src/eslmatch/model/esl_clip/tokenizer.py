"""CLIP's byte-pair-encoding tokenizer, giving the ids of the branch's ``SimpleTokenizer``.

Text is cleaned (``ftfy.fix_text`` when ftfy is installed, HTML entities unescaped twice,
white space collapsed), lower-cased, split by CLIP's pattern, each piece's UTF-8 bytes are
mapped to printable characters and merged by the 48,894 ranked merges of OpenAI's
vocabulary (shipped as package data). A caption becomes ``<|startoftext|>`` (49406), its
BPE ids, ``<|endoftext|>`` (49407), zeros after; longer than the context (77) it is cut to 77
ids, as the branch cuts it (then without the end token).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import regex
import torch
from torch import Tensor

from ...errors import InputError

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START, END = "<|startoftext|>", "<|endoftext|>"
START_ID, END_ID = 49406, 49407
_N_MERGES = 49152 - 256 - 2
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Every byte -> a printable character, in vocabulary order: the printable Latin-1 bytes
    (as themselves) first, then the other bytes mapped to ``chr(256 + n)``."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def clean(text: str) -> str:
    """The branch's cleaning: ftfy (when installed), HTML unescaping, white space, lower case."""
    try:
        import ftfy  # optional: fixes mojibake as the branch does; plain text is unaffected

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """Captions -> ``(ids (M, W), lengths (M,))`` with CLIP's BPE.

    ``lengths`` count the tokens up to and including the end token; ``ids`` are zero after.
    ``W`` is the longest caption's length (``pad_to_context=True``: always the context, 77).
    """

    def __init__(self, context_length: int = 77, vocab_file: str | Path = VOCAB_FILE) -> None:
        # "a b" lines, ranked; kept as text (no token holds a space: bytes are mapped to letters),
        # which builds the tables in a fraction of the time tuples take (every process pays it)
        merges = gzip.open(vocab_file).read().decode("utf-8").split("\n", _N_MERGES + 1)[1 : _N_MERGES + 1]
        alphabet = list(byte_alphabet().values())
        vocab = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges] + [START, END]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_alphabet()
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {}
        if self.encoder[START] != START_ID or self.encoder[END] != END_ID:
            raise ValueError(f"{vocab_file}: not CLIP's BPE vocabulary")

    def __len__(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenised piece (its bytes already mapped to characters)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            best = min((f"{a} {b}" for a, b in zip(word, word[1:])), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            first, second = best.split(" ")
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[w] for w in word]
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no start or end token)."""
        out: list[int] = []
        for piece in _PATTERN.findall(clean(text)):
            out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return out

    def __call__(self, texts: Sequence[str] | str, pad_to_context: bool = False) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("no captions given")
        seqs = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"caption {i} is empty")
            seqs.append([START_ID, *self.encode(text), END_ID][: self.context_length])
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        width = self.context_length if pad_to_context else int(lengths.max())
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, lengths
