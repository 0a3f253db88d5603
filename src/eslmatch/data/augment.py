"""Training-time augmentation (spec section 5), deterministic from a per-item generator.

- Region dropping: each region is dropped with probability ``p``; the kept regions move to
  the front and the image's length becomes the kept count (padding is masked by lengths,
  so no zero row ever enters the BatchNorm). At least one region is kept.
- Caption masking (VSE-infinity style): each word is chosen with probability ``p``; a chosen
  word is, with probability 0.5, replaced by the mask token (one per word piece), with 0.1
  replaced by random vocabulary ids (one per piece), with 0.4 deleted. At least one word is
  kept. BERT-family tokenizers use their mask token; the GRU :class:`WordVocab` uses
  ``<unk>`` and random word ids ``>= 4``.

Random draws happen in a fixed order (regions, then one draw per word, then random ids as
needed), so ``numpy.random.default_rng([seed, epoch, index])`` fixes the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EslmatchError
from ..text import MAX_TOKENS, UNK, WordVocab, words

if TYPE_CHECKING:
    from ..text import BertFamilyTokenizer, TextTokenizer

MASK_SHARE = 0.5
RANDOM_SHARE = 0.1  # the remaining 0.4 of chosen words are deleted
_FIRST_WORD_ID = 4  # WordVocab ids 0..3 are <pad>, <start>, <end>, <unk>


def drop_regions(image: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each region of ``image`` ``(R, D)`` with probability ``p``.

    Returns:
        the kept regions ``(R', D)`` in their original order, ``1 <= R' <= R``.
    """
    r = image.shape[0]
    if p <= 0 or r == 0:
        return image
    keep = np.asarray(rng.random(r) >= p)
    if not keep.any():
        keep[int(rng.integers(r))] = True
    return image[keep]


def choose_word_actions(n_words: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Per word: 0 keep, 1 mask, 2 random ids, 3 delete (never every word deleted).

    Returns:
        int array ``(n_words,)``.
    """
    actions = np.zeros(n_words, dtype=np.int64)
    if n_words == 0 or p <= 0:
        return actions
    u = rng.random(n_words)
    chosen = u < p
    v = u / p  # uniform on [0, 1) for chosen words
    actions[chosen & (v < MASK_SHARE)] = 1
    actions[chosen & (v >= MASK_SHARE) & (v < MASK_SHARE + RANDOM_SHARE)] = 2
    actions[chosen & (v >= MASK_SHARE + RANDOM_SHARE)] = 3
    if (actions == 3).all():
        actions[int(rng.integers(n_words))] = 0
    return actions


def apply_word_actions(
    pieces: Sequence[Sequence[int]],
    actions: np.ndarray,
    mask_id: int,
    draw_random: Callable[[], int] | None,
) -> list[int]:
    """Flatten word pieces after ``actions`` (see :func:`choose_word_actions`).

    ``draw_random()`` returns one random token id; it is called once per piece of each
    word whose action is 2, in word order.
    """
    out: list[int] = []
    for word, action in zip(pieces, actions):
        if action == 0:
            out.extend(word)
        elif action == 1:
            out.extend(mask_id for _ in word)
        elif action == 2:
            assert draw_random is not None, "a word to replace by random ids needs draw_random"
            out.extend(draw_random() for _ in word)
    return out


# ---------------------------------------------------------------------- tokenisers
def word_pieces(tokenizer: BertFamilyTokenizer, text: str) -> list[list[int]]:
    """Token ids of ``text`` grouped by word, without special tokens.

    Fast (tokenizers-backed) tokenizers group by their own ``word_ids``, so the pieces are
    exactly those of ``tokenizer(text)``; other tokenizers split words with their basic
    tokenizer (or on white space) and tokenise each word with ``tokenizer.tokenize``.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False)
        return _by_word(enc["input_ids"], enc.word_ids())
    basic = getattr(tokenizer, "basic_tokenizer", None)
    split = basic.tokenize(text) if basic is not None else text.split()
    groups = []
    for w in split:
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))  # a list for a list of tokens
        if ids:
            groups.append([int(i) for i in (ids if isinstance(ids, list) else [ids])])
    return groups


def word_pieces_of(tokenizer: BertFamilyTokenizer, texts: Sequence[str]) -> list[list[list[int]]]:
    """:func:`word_pieces` of each of ``texts`` (one call of a fast tokenizer for them all)."""
    if not getattr(tokenizer, "is_fast", False) or not texts:
        return [word_pieces(tokenizer, t) for t in texts]
    enc = tokenizer(list(texts), add_special_tokens=False)
    return [_by_word(ids, enc.word_ids(i)) for i, ids in enumerate(enc["input_ids"])]


def _by_word(ids: Sequence[int], word_ids: Sequence[int | None]) -> list[list[int]]:
    """Token ``ids`` grouped by the word each belongs to (a fast tokenizer's ``word_ids``)."""
    groups: list[list[int]] = []
    last: object = object()
    for tok, w in zip(ids, word_ids):
        if w is None or w != last or not groups:
            groups.append([])
        groups[-1].append(int(tok))
        last = w
    return groups


@dataclass(frozen=True)
class PieceTokens:
    """What caption masking needs of a transformers tokenizer, read once (its attribute
    reads cost more than the masking itself): the mask id, the vocabulary size, the special
    ids and the tokens around a caption."""

    tokenizer: BertFamilyTokenizer
    mask_id: int | None
    vocab_size: int
    special: frozenset[int]
    around: tuple[tuple[int, ...], tuple[int, ...]] | None  # (before, after); None: asked per caption

    @classmethod
    def of(cls, tokenizer: BertFamilyTokenizer) -> PieceTokens:
        mask_id = getattr(tokenizer, "mask_token_id", None)
        special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        vocab = int(tokenizer.vocab_size)
        around: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        probe = next((i for i in range(vocab) if i not in special), None)
        if not hasattr(tokenizer, "build_inputs_with_special_tokens"):  # transformers 5: [CLS] ... [SEP]
            around = ((int(tokenizer.cls_token_id),), (int(tokenizer.sep_token_id),))
        elif probe is not None:
            full = [int(i) for i in tokenizer.build_inputs_with_special_tokens([probe])]
            if full.count(probe) == 1:
                k = full.index(probe)
                around = (tuple(full[:k]), tuple(full[k + 1 :]))
        return cls(tokenizer, None if mask_id is None else int(mask_id), vocab, special, around)

    def wrap(self, ids: list[int]) -> list[int]:
        """``ids`` (cut to fit) between the tokenizer's special tokens."""
        ids = ids[: MAX_TOKENS - 2]
        if self.around is not None:
            return [*self.around[0], *ids, *self.around[1]]
        if hasattr(self.tokenizer, "build_inputs_with_special_tokens"):
            return [int(i) for i in self.tokenizer.build_inputs_with_special_tokens(ids)]
        return [int(self.tokenizer.cls_token_id), *ids, int(self.tokenizer.sep_token_id)]

    def drawer(self, rng: np.random.Generator) -> Callable[[], int]:
        """Draws uniform ids from the vocabulary, never a special token (``[PAD]`` = 0 included:
        a random padding id would silently shorten the caption under the attention mask)."""
        vocab, special = self.vocab_size, self.special
        if vocab - sum(1 for s in special if 0 <= s < vocab) < 1:
            raise EslmatchError("the tokenizer's vocabulary holds only special tokens")

        def draw() -> int:
            while True:
                t = int(rng.integers(vocab))
                if t not in special:
                    return t

        return draw


def augment_pieces(
    tokens: PieceTokens, pieces: Sequence[Sequence[int]], p: float, rng: np.random.Generator
) -> list[int]:
    """Token ids ``[CLS] ... [SEP]`` of a caption's word ``pieces`` after word masking."""
    actions = choose_word_actions(len(pieces), p, rng)
    if tokens.mask_id is None and (actions == 1).any():
        raise EslmatchError("caption masking needs a tokenizer with a mask token")
    draw = tokens.drawer(rng) if (actions == 2).any() else None
    ids = apply_word_actions(pieces, actions, tokens.mask_id if tokens.mask_id is not None else -1, draw)
    return tokens.wrap(ids)


def augment_caption_bert(tokenizer: BertFamilyTokenizer, text: str, p: float, rng: np.random.Generator) -> list[int]:
    """Token ids ``[CLS] ... [SEP]`` of ``text`` after word masking with a transformers tokenizer."""
    return augment_pieces(PieceTokens.of(tokenizer), word_pieces(tokenizer, text), p, rng)


def augment_caption_words(vocab: WordVocab, text: str, p: float, rng: np.random.Generator) -> list[int]:
    """Ids ``<start> ... <end>`` of ``text`` after word masking with a :class:`WordVocab`."""
    unk = vocab.index[UNK]
    pieces = [[vocab.index.get(w, unk)] for w in words(text)]
    actions = choose_word_actions(len(pieces), p, rng)
    n = len(vocab)

    def draw() -> int:
        return int(rng.integers(_FIRST_WORD_ID, n)) if n > _FIRST_WORD_ID else unk

    ids = apply_word_actions(pieces, actions, unk, draw)
    encoded = vocab.encode("")  # [<start>, <end>]
    return [encoded[0], *ids, encoded[-1]]


def augment_caption(tokenizer: TextTokenizer, text: str, p: float, rng: np.random.Generator) -> list[int]:
    """Dispatch on the tokenizer kind (:class:`WordVocab` or transformers)."""
    if isinstance(tokenizer, WordVocab):
        return augment_caption_words(tokenizer, text, p, rng)
    return augment_caption_bert(tokenizer, text, p, rng)
