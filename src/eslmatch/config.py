"""Model configuration as data.

:class:`ESLConfig` holds every hyper-parameter of the model. It is written to
``config.json`` by :meth:`eslmatch.ESLModel.save_pretrained` and read back by
:meth:`eslmatch.ESLModel.from_pretrained`; nothing about the model is decided by module-level
flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import EslmatchError

# Keys written by eslmatch 0.1 that are no longer model settings: the loss settings moved to
# the training configuration and the text hidden size is read from the backbone. A model
# config.json holding them still loads; they are dropped.
LEGACY_KEYS = frozenset({"margin", "global_loss_weight", "text_hidden_size"})

STRATEGIES = ("adaptive", "heuristic")
TEXT_ENCODERS = ("bert", "gru")
MODEL_TYPES = ("esl", "vse")


C = TypeVar("C", bound="ConfigData")


class ConfigData:
    """What every model configuration dataclass shares: JSON round trip, unknown keys named."""

    LEGACY: frozenset[str] = frozenset()

    def validate(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a mapping; unknown keys are an error that names them."""
        data = {k: v for k, v in data.items() if k not in cls.LEGACY}
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise EslmatchError(f"unknown {getattr(cls, 'KIND', 'model')} configuration key(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


class LevelGeometry:
    """The level widths every ESL family derives from ``embed_size``, ``kernel_size`` and
    ``num_levels`` (``E / k**l`` for ``l = 0..L``), and their check."""

    embed_size: int
    kernel_size: int
    num_levels: int

    @property
    def level_dims(self) -> list[int]:
        """Widths ``n_l = E / k**l`` for ``l = 0..L``."""
        return [self.embed_size // self.kernel_size**lvl for lvl in range(self.num_levels + 1)]

    @property
    def total_dim(self) -> int:
        """``Dt``, the width of the concatenated level features."""
        return sum(self.level_dims)

    def check_levels(self, embed_name: str = "embed_size") -> None:
        """Raise :class:`EslmatchError` unless every level has an integer width >= 1."""
        if not isinstance(self.num_levels, int) or self.num_levels < 0:
            raise EslmatchError(f"num_levels must be an integer >= 0, got {self.num_levels!r}")
        if self.kernel_size < 2 and self.num_levels > 0:
            raise EslmatchError("kernel_size must be >= 2 when num_levels > 0")
        if self.num_levels > 0 and (self.embed_size % self.kernel_size**self.num_levels != 0):
            raise EslmatchError(
                f"{embed_name} {self.embed_size} must be divisible by kernel_size**num_levels = "
                f"{self.kernel_size}**{self.num_levels} (E / k^L >= 1, integer at every level)"
            )


@dataclass
class ESLConfig(ConfigData, LevelGeometry):
    """Every hyper-parameter of an ESL model (spec sections 1-4).

    Attributes:
        model_type: ``"esl"`` (the paper's model) or ``"vse"`` (mean-pooled global
            embeddings with cosine similarity, a baseline sharing the encoders).
        strategy: dimensional selective mask: ``"adaptive"`` (ESL-A) or ``"heuristic"`` (ESL-H).
        embed_size: joint embedding size ``E``.
        kernel_size: ``k``; level ``l`` has ``E / k**l`` dimensions.
        num_levels: ``L``, the number of aggregation levels after level 0.
        img_dim: width of the input region features (2048 for BUTD regions).
        text_encoder: ``"bert"`` (any BERT-family model from transformers) or ``"gru"``.
        text_model: local directory or Hub name of the BERT-family model (``"bert"`` only).
        freeze_text_backbone: keep the BERT-family backbone fixed (no gradient, eval mode,
            hidden states cached per distinct caption); its projection still trains.
        text_train_layers: train only the top ``k`` transformer layers of the BERT-family
            backbone (the embeddings and the layers below are frozen and their output
            cached per caption); ``null``: every layer trains (unless
            ``freeze_text_backbone``); 0: the same as ``freeze_text_backbone``.
        vocab_size: word vocabulary size (``"gru"`` only; BERT reads its own).
        word_dim: word embedding width of the GRU encoder.
        heuristic_channels: output channels of each heuristic Conv1d, summed.
        adaptive_select: surviving entries per row of each adaptive matrix.
        leaky_slope: negative slope of the leaky ReLU in attention pooling.
        temperature_init: initial softmax scale ``s = exp(t)``.
        contribution_init: initial value of each contribution degree ``w_l``.
        sigma_init: initial threshold scalar of the heuristic contribution degrees.
        t2_init: initial ``t2`` (``lambda = exp(t2)``) of the heuristic contribution degrees.
        layernorm_eps: epsilon of the correspondence LayerNorms.
        l2_eps: epsilon of ``l2n(v) = v / (||v|| + eps)``.
        extra: free-form metadata carried along (ignored by the model).
    """

    model_type: str = "esl"
    strategy: str = "adaptive"
    embed_size: int = 512
    kernel_size: int = 2
    num_levels: int = 8
    img_dim: int = 2048
    text_encoder: str = "bert"
    text_model: str | None = "bert-base-uncased"
    freeze_text_backbone: bool = False
    text_train_layers: int | None = None
    vocab_size: int | None = None
    word_dim: int = 300
    heuristic_channels: int = 4
    adaptive_select: int = 2
    leaky_slope: float = 0.1
    temperature_init: float = 1.0 / 0.07
    contribution_init: float = 0.1
    sigma_init: float = 0.0
    t2_init: float = 3.0
    layernorm_eps: float = 1e-8
    l2_eps: float = 1e-8
    extra: dict[str, Any] = field(default_factory=dict)

    LEGACY = LEGACY_KEYS

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`EslmatchError` naming the first inconsistent field."""
        if self.model_type not in MODEL_TYPES:
            raise EslmatchError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.strategy not in STRATEGIES:
            raise EslmatchError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise EslmatchError(f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        for name in ("embed_size", "kernel_size", "img_dim", "word_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EslmatchError(f"{name} must be a positive integer, got {value!r}")
        self.check_levels()
        if self.text_encoder == "gru" and self.vocab_size is not None and self.vocab_size < 4:
            raise EslmatchError("vocab_size must be >= 4 for the GRU encoder")
        if self.adaptive_select < 1:
            raise EslmatchError("adaptive_select must be >= 1")
        if self.heuristic_channels < 1:
            raise EslmatchError("heuristic_channels must be >= 1")
        if not math.isfinite(self.temperature_init) or self.temperature_init <= 0:
            raise EslmatchError("temperature_init must be a positive number")
