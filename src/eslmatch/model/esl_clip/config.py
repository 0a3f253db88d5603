"""The ESL-CLIP configuration as data (``config.json`` of an ``esl-clip`` model)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ...config import ConfigData, LevelGeometry
from ...errors import EslmatchError

STRATEGIES = ("adaptive", "heuristic")


@dataclass
class ClipArchitecture:
    """The two CLIP towers (OpenAI's names; ViT-B/16 by default).

    Attributes:
        embed_dim: joint (projection) width, ESL's ``E``.
        image_size, patch_size: input resolution and ViT patch.
        vision_width, vision_layers, vision_heads: the image transformer.
        context_length, vocab_size: text positions (77) and BPE vocabulary (49408).
        text_width, text_layers, text_heads: the text transformer.
    """

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise EslmatchError(f"clip.{f.name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise EslmatchError(f"clip.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise EslmatchError(f"clip.{name}_width {width} must be divisible by {name}_heads {heads}")

    def to_transformers(self) -> Any:
        """The equivalent ``transformers.CLIPConfig`` (quick_gelu, layer-norm eps 1e-5)."""
        from transformers import CLIPConfig  # heavy: only when a CLIP tower is built

        text = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.text_width,
            "intermediate_size": 4 * self.text_width,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "max_position_embeddings": self.context_length,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": self.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
            "attention_dropout": 0.0,
        }
        vision = {
            "hidden_size": self.vision_width,
            "intermediate_size": 4 * self.vision_width,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": self.embed_dim,
            "attention_dropout": 0.0,
        }
        cfg = CLIPConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=self.embed_dim,
            logit_scale_init_value=math.log(1 / 0.07),
        )
        cfg._attn_implementation = "eager"
        return cfg


@dataclass
class ESLClipConfig(ConfigData, LevelGeometry):
    """Every hyper-parameter of an ESL-CLIP model (the CLIP-based ESL branch).

    Attributes:
        model_type: ``"esl-clip"``.
        strategy: dimensional selective mask of the level stacks, ``"heuristic"`` or
            ``"adaptive"`` (the branch's module flag).
        kernel_size: ``k``; level ``l`` has ``E / k**l`` dimensions.
        num_levels: ``L`` (8 in the branch).
        heuristic_channels, adaptive_select: as :class:`~eslmatch.config.ESLConfig`.
        contribution_init, sigma_init, t2_init: initial level weights ``w`` (0.1), the
            threshold scalar ``sigma`` (-1; passed through a sigmoid) and ``t2`` (4;
            ``lambda = exp(t2)``) of the weighted measuring.
        logit_scale_max: the learned logit scale is clamped to ``log`` of this after each
            optimiser step (100, as the branch).
        clip: the CLIP towers.
        clip_model: a ``transformers`` CLIP directory or Hub name whose pretrained towers
            ``from_config`` loads (``null``: random towers, e.g. for tests).
        extra: free-form metadata.
    """

    model_type: str = "esl-clip"
    strategy: str = "heuristic"
    kernel_size: int = 2
    num_levels: int = 8
    heuristic_channels: int = 4
    adaptive_select: int = 2
    contribution_init: float = 0.1
    sigma_init: float = -1.0
    t2_init: float = 4.0
    l2_eps: float = 1e-8
    logit_scale_max: float = 100.0
    clip: ClipArchitecture = field(default_factory=ClipArchitecture)
    clip_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KIND = "esl-clip"

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            known = {f.name for f in dataclasses.fields(ClipArchitecture)}
            unknown = sorted(set(self.clip) - known)
            if unknown:
                raise EslmatchError(f"unknown clip configuration key(s): {', '.join(unknown)}")
            self.clip = ClipArchitecture(**self.clip)
        self.validate()

    @property
    def embed_size(self) -> int:  # type: ignore[override]  # derived here, a field in ESLConfig
        """``E``: the CLIP projection width."""
        return self.clip.embed_dim

    def validate(self) -> None:
        if self.model_type != "esl-clip":
            raise EslmatchError(f"model_type must be 'esl-clip' for this configuration, got {self.model_type!r}")
        if self.strategy not in STRATEGIES:
            raise EslmatchError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.clip.validate()
        self.check_levels("clip.embed_dim")
        if self.heuristic_channels < 1 or self.adaptive_select < 1:
            raise EslmatchError("heuristic_channels and adaptive_select must be >= 1")
        if not math.isfinite(self.logit_scale_max) or self.logit_scale_max <= 0:
            raise EslmatchError(f"logit_scale_max must be a positive number, got {self.logit_scale_max}")
