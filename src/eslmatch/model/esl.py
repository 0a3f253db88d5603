"""The ESL model: encoders, level stacks, correspondence and pooling put together."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ESLConfig
from ..errors import CheckpointError, EslmatchError, InputError
from ..scoring import DEFAULT_BUDGET_BYTES, check_lengths, score_tiles
from ..text import WordVocab, tokenize
from .aggregation import LevelStack
from .correspondence import Correspondence
from .encoders import RegionEncoder, bert_from_config, bert_from_pretrained, build_text_encoder, lengths_to_mask
from .pooling import AttentionPooling

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_DIR = "text_encoder"
VOCAB_NAME = "vocab.json"


class ESLModel(nn.Module):
    """Enhanced Semantic Similarity Learning for image-text matching.

    Build with :meth:`from_config` (new weights), :meth:`from_pretrained` (our format) or
    :func:`eslmatch.load_official_checkpoint` (the authors' released ``.pth.tar``).

    Args:
        config: every hyper-parameter.
        text_backbone: the transformers model of a ``"bert"`` text encoder.
        tokenizer: a transformers tokenizer or a :class:`~eslmatch.text.WordVocab`
            (optional: only needed to score raw text).
    """

    def __init__(self, config: ESLConfig, text_backbone: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__()
        config.validate()
        if config.model_type != "esl":
            raise EslmatchError(f"ESLModel needs model_type 'esl', got {config.model_type!r}; use eslmatch.model.vse.VSEModel")
        self.config = config
        c = config
        self.image_encoder = RegionEncoder(c.img_dim, c.embed_size, c.l2_eps)
        self.text_encoder = build_text_encoder(c, text_backbone)
        dims = c.level_dims
        stack = dict(
            strategy=c.strategy,
            kernel_size=c.kernel_size,
            heuristic_channels=c.heuristic_channels,
            adaptive_select=c.adaptive_select,
            eps=c.l2_eps,
        )
        self.image_levels = LevelStack(dims, feed_normalized=True, **stack)
        self.text_levels = LevelStack(dims, feed_normalized=False, **stack)
        self.correspondence = Correspondence(
            dims, c.strategy == "heuristic", c.contribution_init, c.sigma_init, c.t2_init, c.layernorm_eps
        )
        self.pooling = AttentionPooling(c.temperature_init, c.leaky_slope, c.l2_eps)
        self.tokenizer = tokenizer
        self.budget_bytes = DEFAULT_BUDGET_BYTES
        self.score_precision = "fp32"  # opt-in "tf32" / "bf16" products (see docs/scoring.md)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ESLConfig, tokenizer: Any = None) -> ESLModel:
        """New model; a ``"bert"`` text encoder loads ``config.text_model`` (pretrained)."""
        backbone = None
        if config.text_encoder == "bert":
            if not config.text_model:
                raise EslmatchError("config.text_model must name a BERT-family model")
            backbone = bert_from_pretrained(config.text_model)
            if tokenizer is None:
                tokenizer = _load_tokenizer(config.text_model, required=False)
        return cls(config, backbone, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ input checks
    def _check_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor]:
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
        if image_lengths is None:
            lengths = torch.full((n,), r, dtype=torch.long)
        else:
            lengths = torch.as_tensor(image_lengths).to(torch.long).reshape(-1)
            if lengths.numel() != n:
                raise InputError(f"{lengths.numel()} image lengths given for {n} images")
        check_lengths(lengths, r, "image")
        return images.to(self.device), lengths.to(self.device)

    def _check_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
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
        vocab = self._vocab_size()
        if vocab is not None and (int(captions.min()) < 0 or int(captions.max()) >= vocab):
            raise InputError(f"token ids must lie in [0, {vocab}), got [{int(captions.min())}, {int(captions.max())}]")
        real = lengths_to_mask(lengths, w)
        if bool(((captions != 0) & ~real).any()):
            raise InputError("a caption has non-zero token ids beyond its length (0 is padding)")
        empty = ((captions != 0) & real).sum(1) == 0
        if bool(empty.any()):
            raise InputError(f"caption {int(empty.nonzero()[0])} is empty: all its tokens are padding (0)")
        return captions.to(self.device).long(), lengths.to(self.device)

    def _vocab_size(self) -> int | None:
        if self.config.text_encoder == "gru":
            return self.config.vocab_size
        emb = getattr(self.text_encoder.backbone, "get_input_embeddings", lambda: None)()
        return None if emb is None else int(emb.num_embeddings)

    # ------------------------------------------------------------------ public API
    def encode_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Region embeddings ``(N, R, E)`` (spec section 1)."""
        images, lengths = self._check_images(images, image_lengths)
        return self.image_encoder(images, lengths_to_mask(lengths, images.shape[1]))

    def encode_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Word embeddings ``(M, W, E)``."""
        captions, lengths = self._check_captions(captions, caption_lengths)
        return self.text_encoder(captions, lengths)

    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """Image level features ``(N, R, Dt)``, ready to cache and pass to :meth:`score`."""
        return self.image_levels(self.encode_images(images, image_lengths))

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """Caption level features ``(M, W, Dt)``, ready to cache and pass to :meth:`score`."""
        return self.text_levels(self.encode_captions(captions, caption_lengths))

    def prepare_images(self, image_emb: Tensor) -> Tensor:
        """Correspondence-transformed image side ``(N, R, Dt)`` used by the engine."""
        return self.correspondence.image_side(image_emb)

    def global_images(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """First-stage image vectors ``(N, Dt)``: the mean over valid regions of the
        correspondence-transformed level features.

        ESL's affinity is bilinear, so the mean affinity of a pair over its words and regions is
        ``mean_w(X) @ blockdiag(D) @ mean_r(Y)^T = global_captions . global_images``: an exact
        inner product, usable by any inner-product index (and trained by the auxiliary loss
        when ``global_loss_weight > 0``).
        """
        n, r, _ = image_emb.shape
        lengths = torch.full((n,), r, dtype=torch.long) if image_lengths is None else torch.as_tensor(image_lengths).long()
        return _masked_mean(self.prepare_images(image_emb.to(self.device)), lengths.to(self.device))

    def global_captions(self, caption_emb: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """First-stage caption vectors ``(M, Dt)``: the mean of the level features over real words."""
        return _masked_mean(caption_emb.to(self.device), torch.as_tensor(caption_lengths).long().to(self.device))

    @property
    def global_head(self) -> GlobalScorer:
        """The first-stage scorer (exact mean affinity), trained by the auxiliary loss."""
        return GlobalScorer(self)

    def score(
        self,
        image_emb: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        caption_emb: Tensor,
        caption_lengths: Tensor | Sequence[int],
    ) -> Tensor:
        """Scores ``(N, M)`` from cached level features (:meth:`embed_images`, :meth:`embed_captions`)."""
        dt = self.config.total_dim
        for name, t in (("image_emb", image_emb), ("caption_emb", caption_emb)):
            if t.dim() != 3 or t.shape[-1] != dt:
                raise InputError(f"{name} must have shape (*, *, {dt}), got {tuple(t.shape)}")
        n, r, _ = image_emb.shape
        img_len = torch.full((n,), r, dtype=torch.long) if image_lengths is None else torch.as_tensor(image_lengths).long()
        cap_len = torch.as_tensor(caption_lengths).long()
        image_emb, caption_emb = image_emb.to(self.device), caption_emb.to(self.device)
        return score_tiles(
            caption_emb,
            cap_len.to(self.device),
            self.prepare_images(image_emb),
            img_len.to(self.device),
            self.pooling.scale(),
            self.pooling.slope,
            self.pooling.eps,
            self.budget_bytes,
            precision=self.score_precision,
        )

    def similarity(
        self,
        images: Tensor,
        image_lengths: Tensor | Sequence[int] | None,
        captions: Tensor,
        caption_lengths: Tensor | Sequence[int],
    ) -> Tensor:
        """Scores ``(n_images, n_captions)`` from region features and token ids."""
        _, img_len = self._check_images(images, image_lengths)
        _, cap_len = self._check_captions(captions, caption_lengths)
        return self.score(
            self.embed_images(images, img_len), img_len, self.embed_captions(captions, cap_len), cap_len
        )

    forward = similarity

    def tokenize(self, texts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> ``(ids (M, W), lengths (M,))`` with this model's tokenizer."""
        return tokenize(self.tokenizer, texts)

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per part of the model."""
        parts = {
            "image_encoder": self.image_encoder,
            "text_encoder": self.text_encoder,
            "image_levels": self.image_levels,
            "text_levels": self.text_levels,
            "correspondence": self.correspondence,
            "pooling": self.pooling,
        }
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ our format
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the text encoder's files.

        The directory is built beside the target and renamed into place, so an interrupted
        save never leaves a half-written model behind.
        """
        from safetensors.torch import save_file

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (tmp / CONFIG_NAME).write_text(self.config.to_json(), encoding="utf-8")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "eslmatch"})
            if self.config.text_encoder == "bert":
                text_dir = tmp / TEXT_DIR
                text_dir.mkdir()
                self.text_encoder.backbone.config.save_pretrained(str(text_dir))
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(text_dir))
            elif isinstance(self.tokenizer, WordVocab):
                self.tokenizer.save(tmp / VOCAB_NAME)
            _replace_dir(tmp, target)
        except BaseException:
            _rmtree(tmp)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> ESLModel:
        """Load a model written by :meth:`save_pretrained`; needs no network."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise CheckpointError(f"{d}: not an eslmatch model directory (no {CONFIG_NAME})")
        try:
            config = ESLConfig.from_dict(json.loads((d / CONFIG_NAME).read_text(encoding="utf-8")))
        except ValueError as exc:
            raise CheckpointError(f"{d / CONFIG_NAME}: {exc}") from exc
        if config.model_type == "vse" and cls is ESLModel:
            from .vse import VSEModel

            return VSEModel.from_pretrained(d, map_location=map_location)
        backbone, tokenizer = None, None
        if config.text_encoder == "bert":
            from transformers import AutoConfig

            try:
                text_config = AutoConfig.from_pretrained(str(d / TEXT_DIR))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{d / TEXT_DIR}: unreadable text encoder config ({exc})") from exc
            backbone = bert_from_config(text_config)
            tokenizer = _load_tokenizer(d / TEXT_DIR, required=False)
        elif (d / VOCAB_NAME).is_file():
            tokenizer = WordVocab.load(d / VOCAB_NAME)
        model = cls(config, backbone, tokenizer)
        try:
            state = load_file(str(d / WEIGHTS_NAME))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{d / WEIGHTS_NAME}: cannot read weights ({exc})") from exc
        load_state_strict(model, state, str(d / WEIGHTS_NAME))
        return model.to(map_location).eval()


class GlobalScorer:
    """First-stage view of an :class:`ESLModel`: same embeddings, scores are the inner
    products of :meth:`ESLModel.global_images` and :meth:`ESLModel.global_captions` (each
    pair's mean word-region affinity). Holds no parameters of its own; training uses it for
    the auxiliary global-embedding loss (``config.global_loss_weight``), retrieval for the
    shortlist.
    """

    def __init__(self, model: ESLModel) -> None:
        self.model = model

    def embed_images(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        return self.model.embed_images(images, image_lengths)

    def embed_captions(self, captions: Tensor, caption_lengths: Tensor | Sequence[int]) -> Tensor:
        return self.model.embed_captions(captions, caption_lengths)

    def score(self, image_emb: Tensor, image_lengths: Tensor | Sequence[int] | None, caption_emb: Tensor,
              caption_lengths: Tensor | Sequence[int]) -> Tensor:
        """``(N, M)`` first-stage scores from level features."""
        m = self.model
        return m.global_images(image_emb, image_lengths) @ m.global_captions(caption_emb, caption_lengths).t()

    def similarity(self, images: Tensor, image_lengths: Tensor | Sequence[int] | None, captions: Tensor,
                   caption_lengths: Tensor | Sequence[int]) -> Tensor:
        return self.score(self.embed_images(images, image_lengths), image_lengths,
                          self.embed_captions(captions, caption_lengths), caption_lengths)


def _masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    """Mean of ``x (B, T, D)`` over the first ``lengths[b]`` positions -> ``(B, D)``."""
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    return (x * mask[..., None]).sum(1) / lengths.clamp_min(1).to(x.dtype)[:, None]


def load_state_strict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``, naming missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _load_tokenizer(name_or_path: str | Path, required: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, TypeError) as exc:
        if required:
            raise EslmatchError(f"cannot load a tokenizer from {str(name_or_path)!r}: {exc}") from exc
        return None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing an old one only at the end."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        _rmtree(old)
    else:
        os.replace(src, dst)
