"""ESL-CLIP: CLIP's image and text towers with ESL's levels and weighted measuring.

The CLIP-based branch of the authors' code (kkzhang95/ESL): the global image vector (CLS
token, ``ln_post``, projection) and the global text vector (end-token state, ``ln_final``,
projection) are l2-normalised, expanded into ESL's ``L+1`` levels by the level stacks of
:mod:`eslmatch.model.aggregation` (the image stack feeding normalised levels, the text
stack raw ones) and scored by :class:`~.measure.WeightedMeasuring`. Training is CLIP's
symmetric InfoNCE with CLIP's learned logit scale.

Shapes: ``embed_images(pixels (N, 3, H, W)) -> (N, Dt)`` level features,
``embed_captions(ids (M, W), lengths (M,)) -> (M, Dt)``, ``score -> (N, M)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...errors import CheckpointError, EslmatchError, InputError
from ...scoring import ScoringOptions
from ...text import check_texts
from ..aggregation import LevelStack
from ..base import MatchingModel
from .config import ESLClipConfig
from .measure import WeightedMeasuring
from .preprocess import ClipPreprocess
from .tokenizer import ClipTokenizer
from .towers import ClipTowers

if TYPE_CHECKING:
    from PIL import Image

    from ...config import ConfigData
    from ...text import TextTokenizer


class ESLClipModel(MatchingModel):
    """The CLIP-based ESL (``model_type="esl-clip"``).

    Build with :meth:`from_config` (the pretrained towers of ``config.clip_model`` when set,
    else random), :meth:`from_pretrained` (our format) or
    :func:`eslmatch.load_official_checkpoint` (the branch's ``model_best_*_clip_based.pth``).
    """

    family = "esl-clip"
    config_class = ESLClipConfig
    exact_index = True  # the score is an inner product of per-item vectors
    inputs = "pixels"
    loss_kind = "infonce"

    def __init__(self, config: ESLClipConfig, clip: ClipTowers | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.clip = clip if clip is not None else ClipTowers(config.clip)
        stack = dict(
            kernel_size=c.kernel_size,
            heuristic_channels=c.heuristic_channels,
            adaptive_select=c.adaptive_select,
            eps=c.l2_eps,
        )
        self.image_levels = LevelStack(c.level_dims, c.strategy, feed_normalized=True, **stack)  # type: ignore[arg-type]
        self.text_levels = LevelStack(c.level_dims, c.strategy, feed_normalized=False, **stack)  # type: ignore[arg-type]
        self.measuring = WeightedMeasuring(c.level_dims, c.contribution_init, c.sigma_init, c.t2_init)
        self.tokenizer = ClipTokenizer(c.clip.context_length)
        self.preprocess = ClipPreprocess(c.clip.image_size)
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, config: ESLClipConfig, tokenizer: TextTokenizer | None = None) -> ESLClipModel:
        """New model; ``config.clip_model`` (a transformers CLIP folder or Hub name) gives the towers."""
        if not config.clip_model:
            return cls(config)
        from transformers import CLIPModel  # the pretrained weights' format: read once, then ours

        try:
            pretrained = CLIPModel.from_pretrained(str(config.clip_model), attn_implementation="eager")
        except OSError as exc:
            raise EslmatchError(f"cannot load CLIP {config.clip_model!r}: {str(exc).splitlines()[0]}") from exc
        have, want = pretrained.config, config.clip.to_transformers()
        for side in ("text_config", "vision_config"):
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
                if getattr(getattr(have, side), key, None) != getattr(getattr(want, side), key, None):
                    raise EslmatchError(f"{config.clip_model}: its {side}.{key} differs from the configured clip.*")
        towers = ClipTowers(config.clip)
        towers.load_state_dict(pretrained.state_dict())
        return cls(config, towers)

    # ------------------------------------------------------------------ protocol
    def preprocess_image(self, image: Image.Image) -> Tensor:
        """A PIL image -> CLIP's normalised pixels ``(3, size, size)``."""
        return self.preprocess(image)

    def image_preprocessor(self) -> ClipPreprocess:
        return self.preprocess

    def parts(self) -> dict[str, nn.Module]:
        return {
            "clip": self.clip,
            "image_levels": self.image_levels,
            "text_levels": self.text_levels,
            "measuring": self.measuring,
        }

    def pretrained_backbone(self) -> nn.Module | None:
        return self.clip

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned log-temperature of the InfoNCE loss."""
        scale: Tensor = self.clip.logit_scale
        return scale

    def vocab_size(self) -> int | None:
        return int(self.config.clip.vocab_size)

    def after_optimizer_step(self) -> None:
        """Clamp the logit scale to ``log(logit_scale_max)``, as the branch does after each step."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=math.log(self.config.logit_scale_max))

    def check_pixels(self, images: Tensor) -> Tensor:
        size = self.config.clip.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"images must be preprocessed pixels (N, 3, {size}, {size}), got {shape}")
        if images.shape[-2:] != (size, size):
            raise InputError(
                f"images are {images.shape[-2]}x{images.shape[-1]} pixels, this model expects {size}x{size}"
            )
        if not images.is_floating_point():
            raise InputError(f"images must be floating point, got {images.dtype}")
        return images.to(self.device)

    def check_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int] | None) -> Tensor:
        ctx = self.config.clip.context_length
        if not isinstance(captions, Tensor) or captions.dim() != 2 or captions.is_floating_point():
            shape = tuple(captions.shape) if isinstance(captions, Tensor) else type(captions).__name__
            raise InputError(f"captions must be CLIP token ids (M, <= {ctx}), got {shape}")
        if captions.shape[1] > ctx or captions.shape[0] == 0:
            raise InputError(f"captions must be (M >= 1, <= {ctx}) token ids, got {tuple(captions.shape)}")
        if int(captions.min()) < 0 or int(captions.max()) >= self.config.clip.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.config.clip.vocab_size})")
        if caption_lengths is not None:
            lengths = torch.as_tensor(caption_lengths).long().reshape(-1)
            if (
                lengths.numel() != captions.shape[0]
                or bool((lengths < 1).any())
                or bool((lengths > captions.shape[1]).any())
            ):
                raise InputError(f"caption lengths must be {captions.shape[0]} values in 1..{captions.shape[1]}")
        return captions.to(self.device).long()

    def encode_images(self, images: Tensor) -> Tensor:
        """CLIP's image vectors ``(N, E)``: CLS token, post-LayerNorm, projection."""
        return self.clip.visual_projection(self.clip.vision_model(self.check_pixels(images)))

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """CLIP's text vectors ``(M, E)``: the final-LayerNorm state at the highest token id
        (the end token; OpenAI's ``argmax`` pooling), projection."""
        ids = self.check_captions(captions, caption_lengths)
        hidden = self.clip.text_model(ids)  # causal mask only, as OpenAI
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return self.clip.text_projection(pooled)

    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Image level features ``(N, Dt)`` (``image_lengths`` is ignored: one vector per image)."""
        x = self.encode_images(images)
        return self.image_levels(x / x.norm(dim=-1, keepdim=True))

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Caption level features ``(M, Dt)``."""
        y = self.encode_captions(captions, caption_lengths)
        return self.text_levels(y / y.norm(dim=-1, keepdim=True))

    def index_vectors_images(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """``(N, Dt)``: ``concat_l(X_l @ D_l) / (L+1)``; its inner product with
        :meth:`index_vectors_captions` IS the score."""
        return self.measuring.image_side(image_emb.to(self.device))

    def index_vectors_captions(self, caption_emb: Tensor, caption_lengths: Tensor | Sequence[int] | None) -> Tensor:
        return caption_emb.to(self.device)

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int] | None,
        options: ScoringOptions | None = None,
    ) -> Tensor:
        """Scores ``(N, M)`` of level features ``(N, Dt)`` and ``(M, Dt)``: one product."""
        dt = self.config.total_dim
        for name, t in (("image_emb", image_emb), ("caption_emb", caption_emb)):
            if t.dim() != 2 or t.shape[-1] != dt:
                raise InputError(f"{name} must have shape (*, {dt}), got {tuple(t.shape)}")
        return self.index_vectors_images(image_emb) @ self.index_vectors_captions(caption_emb, caption_lengths).t()

    def tokenize(self, texts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> ``(ids (M, 77), lengths (M,))`` exactly as the branch's tokenizer makes them
        (start token, BPE ids, end token, zeros; ``lengths`` up to and including the end token)."""
        return self.tokenizer(check_texts(texts, empty_ok=True), pad_to_context=True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the CLIP towers' activations in backward (less memory, more compute)."""
        self.clip.set_gradient_checkpointing(enabled)
        self.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ files
    def save_extra(self, directory: Path) -> None:
        (directory / "tokenizer.txt").write_text(
            "CLIP BPE (bpe_simple_vocab_16e6), eslmatch.model.esl_clip.tokenizer.ClipTokenizer, "
            f"context {self.config.clip.context_length}\n",
            encoding="utf-8",
        )

    @classmethod
    def build_for_loading(cls, config: ConfigData, directory: Path) -> ESLClipModel:
        if not isinstance(config, ESLClipConfig):
            raise CheckpointError(f"{directory}: not an esl-clip configuration")
        return cls(config)  # the weights come from model.safetensors, never from clip_model
