"""The model base: what every model family shares, and the scoring protocol each implements.

Every family (ESL, the VSE baseline, ESL-CLIP) is a :class:`MatchingModel`:

========================================  ====================================================
``embed_images(images, image_lengths)``   image features, ready to cache (family-specific
                                          shape: ``(N, R, Dt)`` level features for ESL,
                                          ``(N, E)`` vectors for the single-vector families)
``embed_captions(captions, lengths)``     caption features, likewise
``score(img, img_len, cap, cap_len,       ``(N, M)`` scores from cached features
options=None)``
``similarity(images, image_lengths,       ``(N, M)`` scores from raw inputs (region features or
captions, caption_lengths)``              pixels, and token ids)
``tokenize(texts)``                       ``(ids (M, W), lengths (M,))``
``index_vectors_images(img, img_len)``    ``(N, K)`` first-stage vectors for an inner-product
``index_vectors_captions(cap, cap_len)``  index; ``exact_index`` says whether their inner
                                          product IS the score (one-stage search) or a
                                          shortlist to re-rank (two-stage)
``save_pretrained(dir)`` /                our format: ``config.json`` + ``model.safetensors``
``from_pretrained(dir)``                  (+ the family's tokenizer files)
========================================  ====================================================

:class:`RegionTextModel` adds what the two region-feature families (ESL, VSE) share: the
region encoder, the BERT or GRU text encoder, input checks and their tokenizers' files.
Only :mod:`eslmatch.factory` names the concrete families.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import ConfigData, ESLConfig
from ..errors import CheckpointError, EslmatchError, InputError, with_article
from ..scoring import ScoringOptions, check_lengths
from ..text import WordVocab, load_tokenizer, tokenize
from ..utils import atomic_dir, honour_umask, lengths_to_mask
from ..utils.io import check_replaceable
from .digest import WEIGHTS_NAME, verify_weights, write_digest
from .encoders import (
    BertTextEncoder,
    RegionEncoder,
    bert_from_pretrained,
    build_text_encoder,
    text_backbone_for_loading,
)

if TYPE_CHECKING:
    from PIL import Image

    from ..text import TextTokenizer

CONFIG_NAME = "config.json"
TEXT_DIR = "text_encoder"
VOCAB_NAME = "vocab.json"


class MatchingModel(nn.Module):
    """Base of every model family (see the module docstring for the protocol).

    Subclasses set ``family`` (the ``model_type`` in ``config.json``), ``config_class``,
    ``exact_index`` and implement the protocol; save/load, ``similarity``, ``tokenize``,
    ``device`` and ``parameter_counts`` come from here.
    """

    family: ClassVar[str] = ""
    config_class: ClassVar[Any] = ESLConfig
    # True when the inner product of the index vectors equals ``score`` (one-stage search).
    exact_index: ClassVar[bool] = False
    # What ``embed_images`` takes: "regions" (region features (N, R, D_in)) or "pixels"
    # (preprocessed images (N, 3, H, W), made by ``preprocess_image``).
    inputs: ClassVar[str] = "regions"

    config: Any
    tokenizer: Any
    # The weight file this model was loaded from, {"format": "eslmatch" | "released", "sha256"}
    # (None: built in memory); set by the loaders, recorded by an index so that a damaged or
    # replaced file is refused.
    weights_digest: dict[str, str] | None = None

    # ------------------------------------------------------------------ the protocol
    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        raise NotImplementedError

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        raise NotImplementedError

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def index_vectors_images(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        raise NotImplementedError

    def index_vectors_captions(self, caption_emb: Tensor, caption_lengths: Tensor | Sequence[int] | None) -> Tensor:
        raise NotImplementedError

    def parts(self) -> dict[str, nn.Module]:
        """Named sub-modules whose parameters :meth:`parameter_counts` reports."""
        raise NotImplementedError

    def preprocess_image(self, image: Image.Image) -> Tensor:
        """A PIL image -> the pixels ``(3, H, W)`` that :meth:`embed_images` takes (``inputs ==
        "pixels"``)."""
        raise NotImplementedError(f"{type(self).__name__} takes region features, not images")

    def image_preprocessor(self) -> Callable[[Image.Image], Tensor]:
        """What :meth:`preprocess_image` applies, as a small object of its own: a data loader's
        worker processes get it without a copy of the model."""
        raise NotImplementedError(f"{type(self).__name__} takes region features, not images")

    # ---- two-stage models (``exact_index`` False): the re-rank of a shortlist from stored sides
    def prepare_images(self, image_emb: Tensor) -> Tensor:
        """Engine-ready image sides ``(N, R, Dt)`` from :meth:`embed_images` (what a gallery stores)."""
        raise NotImplementedError(f"{type(self).__name__} is scored by an inner product: it has no image side")

    def score_prepared(
        self,
        image_side: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Scores ``(N, M)`` of prepared image sides against caption features."""
        raise NotImplementedError(f"{type(self).__name__} is scored by an inner product: it has no image side")

    def attention(self, caption_emb: Tensor, image_side: Tensor) -> Tensor:
        """Word-by-region attention ``(W, R)`` of one caption over one prepared image."""
        raise NotImplementedError(f"{type(self).__name__} has no word-by-region attention")

    def pretrained_backbone(self) -> nn.Module | None:
        """The pretrained part trained at the backbone learning rate (``None``: none)."""
        return None

    # The training loss of the family: "hinge" (VSE++) or "infonce" (CLIP, with logit_scale).
    loss_kind: ClassVar[str] = "hinge"

    def after_optimizer_step(self) -> None:
        """Called by the Trainer after each optimiser step (e.g. to clamp a temperature)."""

    @property
    def logit_scale(self) -> Tensor | None:
        """The learned log-temperature the InfoNCE loss needs (``None``: the family has none)."""
        return None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward (less memory, more compute), where the family can."""
        raise EslmatchError(f"gradient_checkpointing is not supported by {type(self).__name__}")

    def vocab_size(self) -> int | None:
        """Token ids must lie below this (``None``: unknown)."""
        return None

    def uncached(self) -> contextlib.AbstractContextManager[None]:
        """A block in which every call runs the whole model: no cache of frozen layers' outputs
        (what tracing an encoder for ONNX needs)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ shared behaviour
    def similarity(
        self,
        images: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        captions: Tensor,
        caption_lengths: Tensor | Sequence[int],
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Scores ``(n_images, n_captions)`` from raw inputs."""
        img = self.embed_images(images, image_lengths)
        cap = self.embed_captions(captions, caption_lengths)
        return self.score(img, image_lengths, cap, caption_lengths, options)

    def forward(
        self,
        images: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        captions: Tensor,
        caption_lengths: Tensor | Sequence[int],
        options: ScoringOptions | None = None,
    ) -> Tensor:
        return self.similarity(images, image_lengths, captions, caption_lengths, options)

    def tokenize(self, texts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> ``(ids (M, W), lengths (M,))`` with this model's tokenizer."""
        return tokenize(self.tokenizer, texts)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per part of the model, and ``total``."""
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in self.parts().items()}
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ our format
    def save_extra(self, directory: Path) -> None:
        """Write the family's own files (tokenizer, backbone config) into ``directory``."""

    @classmethod
    def build_for_loading(cls, config: ConfigData, directory: Path) -> MatchingModel:
        """A model of ``config`` with placeholder weights, read from ``directory``'s extra files."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the family's files, atomically.

        The folder is built beside the target and renamed into place: an interrupted save
        never leaves a half-written model behind (nor litter, once the next save ran).
        """
        target = Path(directory)
        check_replaceable(target, CONFIG_NAME, "an eslmatch model")
        with atomic_dir(target) as tmp:
            (tmp / CONFIG_NAME).write_text(self.config.to_json(), encoding="utf-8")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "eslmatch"})
            honour_umask(tmp / WEIGHTS_NAME)
            write_digest(tmp)
            self.save_extra(tmp)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> MatchingModel:
        """Load a model of this family written by :meth:`save_pretrained`; needs no network.

        (:func:`eslmatch.factory.load_pretrained` picks the family from ``config.json``.)
        """
        d = Path(directory)
        data = read_config(d)
        found = data.get("model_type", "esl")
        if found != cls.family:
            raise CheckpointError(
                f"{d}: {with_article(repr(found))} model, not {cls.family!r} (eslmatch.load_pretrained reads any)"
            )
        config = cls.config_class.from_dict(data)
        digest, _ = verify_weights(d)
        with placeholder_init():
            model = cls.build_for_loading(config, d)
        model.weights_digest = {"format": "eslmatch", "sha256": digest}
        try:
            state = load_file(str(d / WEIGHTS_NAME))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{d / WEIGHTS_NAME}: cannot read weights ({exc})") from exc
        load_state_strict(model, state, str(d / WEIGHTS_NAME))
        return model.to(map_location).eval()


# torch.nn.init's in-place initialisers; modules' reset_parameters() call them
_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip
_INIT_LOCK = threading.Lock()


def _as_allocated(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return tensor


@contextlib.contextmanager
def placeholder_init() -> Iterator[None]:
    """Inside the block, ``torch.nn.init`` leaves tensors as allocated (uninitialised).

    For a model built only to receive saved weights: drawing random values it throws away
    costs 0.4 s of loading a MiniLM model, every search. Whatever is built must then get
    every parameter and buffer from a strict load (:func:`load_state_strict`). Values a
    module computes itself (position ids, a zeroed padding row) are unaffected.
    """
    with _INIT_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
        for name in saved:
            setattr(nn.init, name, _as_allocated)
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(nn.init, name, function)


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a mapping (errors name the file)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: not an eslmatch model directory (no {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable model config ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class RegionTextModel(MatchingModel):
    """Region features + BERT/GRU text: the encoders, input checks and files ESL and VSE share.

    Args:
        config: the model's :class:`~eslmatch.config.ESLConfig`.
        text_backbone: the transformers model of a ``"bert"`` text encoder.
        tokenizer: a transformers tokenizer or a :class:`~eslmatch.text.WordVocab`
            (optional: only needed to score raw text).
    """

    def __init__(
        self, config: ESLConfig, text_backbone: nn.Module | None = None, tokenizer: TextTokenizer | None = None
    ) -> None:
        super().__init__()
        config.validate()
        if config.model_type != self.family:
            raise EslmatchError(f"{type(self).__name__} needs model_type {self.family!r}, got {config.model_type!r}")
        self.config = config
        self.image_encoder = RegionEncoder(config.img_dim, config.embed_size, config.l2_eps)
        self.text_encoder = build_text_encoder(config, text_backbone)
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, config: ESLConfig, tokenizer: TextTokenizer | None = None) -> RegionTextModel:
        """New model; a ``"bert"`` text encoder loads ``config.text_model`` (pretrained)."""
        backbone = None
        if config.text_encoder == "bert":
            if not config.text_model:
                raise EslmatchError("config.text_model must name a BERT-family model")
            backbone = bert_from_pretrained(config.text_model)
            if tokenizer is None:
                tokenizer = load_tokenizer(config.text_model, required=False)
        return cls(config, backbone, tokenizer)

    def pretrained_backbone(self) -> nn.Module | None:
        return self.text_encoder.backbone if isinstance(self.text_encoder, BertTextEncoder) else None

    def uncached(self) -> contextlib.AbstractContextManager[None]:
        return (
            self.text_encoder.uncached() if isinstance(self.text_encoder, BertTextEncoder) else contextlib.nullcontext()
        )

    # ------------------------------------------------------------------ input checks
    def check_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor]:
        """Validate ``images (N, R, D_in)`` and their lengths; both moved to the model's device."""
        if not isinstance(images, Tensor) or images.dim() != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"images must be a float tensor (N, R, {self.config.img_dim}), got {shape}")
        if not images.is_floating_point():
            raise InputError(f"images must be floating point, got {images.dtype}")
        if images.shape[-1] != self.config.img_dim:
            raise InputError(
                f"image features have dimension {images.shape[-1]}, this model expects {self.config.img_dim}"
            )
        n, r, _ = images.shape
        if n == 0 or r == 0:
            raise InputError(f"images tensor is empty: shape {tuple(images.shape)}")
        lengths = full_lengths(n, r) if image_lengths is None else torch.as_tensor(image_lengths).long().reshape(-1)
        if lengths.numel() != n:
            raise InputError(f"{lengths.numel()} image lengths given for {n} images")
        check_lengths(lengths, r, "image")
        return images.to(self.device), lengths.to(self.device)

    def check_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Validate token ids ``(M, W)`` (0 = padding) and lengths; both moved to the device."""
        if not isinstance(captions, Tensor) or captions.dim() != 2:
            shape = tuple(captions.shape) if isinstance(captions, Tensor) else type(captions).__name__
            raise InputError(f"captions must be a LongTensor (M, W) of token ids, got {shape}")
        if captions.is_floating_point() or captions.dtype == torch.bool:
            raise InputError(f"captions must hold integer token ids, got {captions.dtype}")
        m, w = captions.shape
        if m == 0 or w == 0:
            raise InputError(f"captions tensor is empty: shape {tuple(captions.shape)}")
        lengths = torch.as_tensor(caption_lengths).to(torch.long).reshape(-1)
        if lengths.numel() != m:
            raise InputError(f"{lengths.numel()} caption lengths given for {m} captions")
        check_lengths(lengths, w, "caption")
        vocab = self.vocab_size()
        if vocab is not None and (int(captions.min()) < 0 or int(captions.max()) >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}), got [{int(captions.min())}, {int(captions.max())}]")
        real = lengths_to_mask(lengths, w)
        if bool(((captions != 0) & ~real).any()):
            raise InputError("a caption has non-zero token ids beyond its length (0 is padding)")
        empty = ((captions != 0) & real).sum(1) == 0
        if bool(empty.any()):
            raise InputError(f"caption {int(empty.nonzero()[0])} is empty: all its tokens are padding (0)")
        return captions.to(self.device).long(), lengths.to(self.device)

    def vocab_size(self) -> int | None:
        if not isinstance(self.text_encoder, BertTextEncoder):
            return int(self.config.vocab_size)
        emb = self.text_encoder.backbone.get_input_embeddings()
        return None if emb is None else int(emb.num_embeddings)

    # ------------------------------------------------------------------ encoders
    def encode_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Region embeddings ``(N, R, E)`` (spec section 1)."""
        images, lengths = self.check_images(images, image_lengths)
        return self.image_encoder(images, lengths_to_mask(lengths, images.shape[1]))

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Word embeddings ``(M, W, E)``."""
        captions, lengths = self.check_captions(captions, caption_lengths)
        return self.text_encoder(captions, lengths)

    # ------------------------------------------------------------------ files
    def save_extra(self, directory: Path) -> None:
        if self.config.text_encoder == "bert":
            text_dir = directory / TEXT_DIR
            text_dir.mkdir()
            cast(Any, self.text_encoder).backbone.config.save_pretrained(str(text_dir))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(text_dir))
        elif isinstance(self.tokenizer, WordVocab):
            self.tokenizer.save(directory / VOCAB_NAME)

    @classmethod
    def build_for_loading(cls, config: ConfigData, directory: Path) -> RegionTextModel:
        if not isinstance(config, ESLConfig):
            raise CheckpointError(f"{directory}: not {with_article(cls.family)} configuration")
        backbone, tokenizer = None, None
        if config.text_encoder == "bert":
            backbone = text_backbone_for_loading(directory / TEXT_DIR)
            tokenizer = load_tokenizer(directory / TEXT_DIR, required=False)
        elif (directory / VOCAB_NAME).is_file():
            tokenizer = WordVocab.load(directory / VOCAB_NAME)
        return cls(config, backbone, tokenizer)


def full_lengths(n: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(n,)`` lengths all equal to ``width`` (no padding)."""
    return torch.full((n,), width, dtype=torch.long, device=device)


def as_lengths(lengths: Tensor | Sequence[int] | None, n: int, width: int, device: torch.device) -> Tensor:
    """Lengths as a long tensor on ``device``; ``None`` means every position is real."""
    if lengths is None:
        return full_lengths(n, width, device)
    return torch.as_tensor(lengths).long().reshape(-1).to(device)


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, naming missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {few(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_mapped_state(model: nn.Module, mapped: dict[str, Tensor], left: list[str], source: str, what: str) -> None:
    """Load a released checkpoint's state, already mapped onto our names, strictly.

    ``left`` are the released keys no mapping used. Buffers transformers registers (position
    ids) are taken from the model when the release lacks them. Missing (our names) and
    unexpected (theirs) keys are one error naming them.
    """
    own = model.state_dict()
    for k in own:
        if k not in mapped and k.endswith("position_ids"):
            mapped[k] = own[k]
    missing = sorted(set(own) - set(mapped))
    if left or missing:
        problems = []
        if missing:
            problems.append(f"missing keys (our names): {few(missing)}")
        if left:
            problems.append(f"unexpected keys: {few(left)}")
        raise CheckpointError(f"{source} does not match the {what} model: " + "; ".join(problems))
    load_state_strict(model, mapped, source)


def few(items: list[str], n: int = 6) -> str:
    """The first ``n`` items, comma-separated, with a count of the rest."""
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def takes_pixels(model: MatchingModel) -> bool:
    """Whether ``model`` embeds photos (preprocessed pixels, ESL-CLIP) rather than region features."""
    return model.inputs == "pixels"
