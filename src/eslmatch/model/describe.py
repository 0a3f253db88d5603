"""What ``eslmatch info`` shows of a model, computed here so that a Python caller gets it too:
:func:`describe_model` returns the facts (what ``info --json`` prints), :func:`format_model`
the table, :func:`verify_checkpoint` the byte-for-byte check of ``info --verify``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from ..errors import EslmatchError
from ..factory import model_format
from .base import MatchingModel, RegionTextModel
from .digest import DIGEST_NAME, verify_weights
from .encoders import BertTextEncoder


class ModelDescription(TypedDict):
    """A model's facts: its file format, configuration, parameters per part and weights."""

    format: str
    config: dict[str, Any]  # the config.json fields, JSON values of any kind
    parameters: dict[str, int]
    weights: dict[str, str] | None
    verified: bool


def verify_checkpoint(checkpoint: str | Path) -> str:
    """The model folder's weights sha256, checked byte for byte against its ``digest.json``
    (an :class:`~eslmatch.errors.EslmatchError` for a released file or a folder without one)."""
    if model_format(checkpoint) != "eslmatch":
        raise EslmatchError(f"{checkpoint}: a released checkpoint records no digest: --verify checks a model folder")
    digest, recorded = verify_weights(Path(checkpoint), use_cache=False)
    if not recorded:
        raise EslmatchError(
            f"{checkpoint}: no {DIGEST_NAME} (written by an older eslmatch): nothing to verify against "
            f"(sha256 now {digest[:16]}...; load and save_pretrained it again to record one)"
        )
    return digest


def describe_model(model: MatchingModel, path: str | Path, verified: bool = False) -> ModelDescription:
    """``model`` (loaded from ``path``) as ``info --json`` prints it (``verified``: its weights
    were checked by :func:`verify_checkpoint`)."""
    return {
        "format": model_format(path),
        "config": model.config.to_dict(),
        "parameters": model.parameter_counts(),
        "weights": model.weights_digest,
        "verified": verified,
    }


def format_model(model: MatchingModel, path: str | Path, verified: bool = False) -> str:
    """``model`` (loaded from ``path``) as ``info`` prints it: type, levels, encoders, tokenizer
    and the parameters per part."""
    c = model.config
    variant = "ESL-A" if c.strategy == "adaptive" else "ESL-H"
    lines = [f"model      {path}", f"format     {model_format(path)}"]
    if model.weights_digest:
        note = " (verified: every byte matches digest.json)" if verified else ""
        lines.append(f"weights    sha256 {model.weights_digest['sha256']}{note}")
    levels = f"levels     E={c.embed_size} k={c.kernel_size} L={c.num_levels} widths={c.level_dims} Dt={c.total_dim}"
    if c.model_type == "esl-clip":
        a = c.clip
        lines += [
            f"type       ESL-CLIP ({variant}, {c.strategy} strategy; the CLIP-based branch)",
            levels,
            f"image      ViT {a.image_size}px patch {a.patch_size}, width {a.vision_width}, {a.vision_layers} layers",
            f"text       CLIP BPE, context {a.context_length}, width {a.text_width}, {a.text_layers} layers",
        ]
    else:
        text = c.text_encoder
        if text == "bert" and isinstance(model, RegionTextModel) and isinstance(model.text_encoder, BertTextEncoder):
            bc = model.text_encoder.backbone.config
            source = c.text_model or "config inferred from tensors"
            text += f" ({source}; hidden {bc.hidden_size}, {bc.num_hidden_layers} layers, vocab {bc.vocab_size})"
        else:
            text += f" (vocab {c.vocab_size}, word_dim {c.word_dim})"
        lines += [
            f"type       {c.model_type.upper()} ({variant}, {c.strategy} strategy)",
            levels,
            f"text       {text}",
            f"image      region features of width {c.img_dim}",
        ]
    lines.append(
        f"tokenizer  {'yes' if model.tokenizer is not None else 'none (score token ids, or pass --text-model)'}"
    )
    lines.append("parameters")
    lines += [f"  {part:<15} {n:>13,}" for part, n in model.parameter_counts().items()]
    return "\n".join(lines)
