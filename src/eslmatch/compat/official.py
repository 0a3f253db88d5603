"""Loading the authors' released ESL checkpoints (spec section 7).

A released checkpoint is a pickle. It is read with ``torch.load(weights_only=True)`` and an
allow-list holding only ``argparse.Namespace``; a file needing any other object is refused
and nothing in it is executed. Keys are matched strictly: any missing or unexpected key is
named in the error.
"""

from __future__ import annotations

import argparse
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ESLConfig
from ..errors import CheckpointError
from ..model.base import load_mapped_state
from ..model.encoders import bert_from_config
from ..model.esl import ESLModel
from ..model.esl_clip import ESLClipModel
from ..text import load_tokenizer
from ..utils.digest import sha256_stream
from .clip import is_clip_release, load_clip_release


class ReleasedClipConfig:
    """An inert stand-in for the CLIP-based branch's pickled ``config.all_config.AllConfig``
    (its ``_save_checkpoint`` stores the run's configuration object in the checkpoint): it
    only receives the object's attribute values; nothing of the branch's code is imported or
    run."""


ReleasedClipConfig.__module__ = "config.all_config"
ReleasedClipConfig.__name__ = ReleasedClipConfig.__qualname__ = "AllConfig"

ALLOWED_GLOBALS: list[Any] = [argparse.Namespace, ReleasedClipConfig]

# Present in released checkpoints but never used by their forward pass: loaded, ignored.
_UNUSED = (re.compile(r"^image\.mlp\.bns\.1\."), re.compile(r"^text\.bert\.pooler\."))
_SIM_PREFIX = "sims.calculator_1."
_LEVELS_PREFIX = "plus_encoder.encoders_1."


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Unpickle a released checkpoint with ``weights_only=True`` (tensors, plain containers and
    ``argparse.Namespace`` only); anything else is refused and nothing in the file runs."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file")
    _check_magic(p)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 24": we answer in one line below
            return torch.load(str(p), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not match:  # a pickle the weights-only unpickler cannot read (random bytes, protocol 4 frames)
            why = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n|$)", str(exc))
            detail = f" ({why.group(1)})" if why else ""
            raise CheckpointError(
                f"{p}: refused to load: not a PyTorch checkpoint the weights-only unpickler reads{detail}; nothing "
                "in the file was executed"
            ) from exc
        what = f"it needs {match.group(1)}, which is not allowed"
        raise CheckpointError(
            f"{p}: refused to load: {what} (only tensors, plain containers, argparse.Namespace and the "
            "CLIP branch's config record are allowed; nothing in the file was executed)"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        detail = "a damaged zip archive" if isinstance(exc, (OSError, zipfile.BadZipFile)) else _first_line(exc)
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt?): {detail}") from exc
    except (IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as exc:
        # the weights-only unpickler (which runs nothing) trips over bytes that are no pickle
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (a corrupt pickle; nothing in it was executed)") from exc


# torch.save writes a zip archive (since 1.6) or, in the legacy format, a pickle (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _check_magic(p: Path) -> None:
    """Refuse, in one line, a file that does not even start like a ``torch.save`` file."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    if not head:
        raise CheckpointError(f"{p}: an empty file, not a PyTorch checkpoint")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOLS)):
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint (neither a zip archive nor a pickle; a released .pth.tar or a model folder "
            "is expected)"
        )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Unpickle a released ESL (BERT + regions) checkpoint safely and check its outline."""
    return check_outline(safe_load(path, map_location), Path(path))


def check_outline(ckpt: Any, p: Path) -> dict[str, Any]:
    """``ckpt`` if it has the released ESL layout, else an error naming what is wrong."""
    if is_clip_release(ckpt):
        raise CheckpointError(
            f"{p}: a CLIP-based ESL checkpoint, not the BERT + regions one (load it with "
            "load_official_checkpoint / eslmatch convert)"
        )
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{p}: not a released ESL checkpoint (no 'model' entry)")
    parts = ckpt["model"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3 or not all(isinstance(s, dict) for s in parts):
        raise CheckpointError(f"{p}: 'model' must be a list of 3 state dicts [image encoder, text encoder, similarity]")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def detect_strategy(sim_state: dict[str, Tensor]) -> str:
    """``"adaptive"`` or ``"heuristic"``, from the level-stack key names."""
    keys = list(sim_state)
    if any(".kernel_img_" in k or ".kernel_txt_" in k for k in keys):
        return "heuristic"
    if any(k.startswith(_LEVELS_PREFIX + "image_levels.masks_") for k in keys):
        return "adaptive"
    raise CheckpointError(
        "cannot tell the strategy: the similarity module has neither image_levels.masks_* "
        "(adaptive) nor image_levels.kernel_img_* (heuristic) weights"
    )


def infer_bert_config(text_state: dict[str, Tensor]) -> Any:
    """A BertConfig from tensor names and shapes (released checkpoints do not store it)."""
    from transformers import BertConfig

    try:
        words = text_state["bert.embeddings.word_embeddings.weight"]
        positions = text_state["bert.embeddings.position_embeddings.weight"]
        types = text_state["bert.embeddings.token_type_embeddings.weight"]
    except KeyError as exc:
        raise CheckpointError(f"text encoder has no BERT embedding weights (missing {exc.args[0]})") from exc
    layers = {int(m.group(1)) for k in text_state if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError("text encoder has no bert.encoder.layer.* weights")
    hidden = int(words.shape[1])
    inter = text_state.get("bert.encoder.layer.0.intermediate.dense.weight")
    heads = 12 if hidden % 12 == 0 else max(1, hidden // 64)
    return BertConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=heads,
        intermediate_size=int(inter.shape[0]) if inter is not None else 4 * hidden,
        max_position_embeddings=int(positions.shape[0]),
        type_vocab_size=int(types.shape[0]),
    )


def _level_count(sim_state: dict[str, Tensor], pattern: str) -> int:
    return len([k for k in sim_state if re.match(pattern, k)])


def config_from_checkpoint(ckpt: dict[str, Any]) -> ESLConfig:
    """Our :class:`ESLConfig` for a released checkpoint."""
    opt = ckpt.get("opt")
    get = (lambda k, d: getattr(opt, k, d)) if opt is not None else (lambda k, d: d)
    img, _, sim = (_strip(s) for s in ckpt["model"])
    strategy = detect_strategy(sim)
    level_pat = _LEVELS_PREFIX + (
        r"image_levels\.masks_\d+\.weight$" if strategy == "adaptive" else r"image_levels\.kernel_img_\d+\.weight$"
    )
    num_levels = _level_count(sim, level_pat)
    fc = img.get("fc.weight")
    if fc is None:
        raise CheckpointError("image encoder has no fc.weight")
    embed_size, img_dim = int(fc.shape[0]), int(fc.shape[1])
    kernel = int(get("kernel_size", 2))
    channels = 4
    if strategy == "heuristic":
        w = sim.get(_LEVELS_PREFIX + "image_levels.kernel_img_1.weight")
        if w is not None:
            channels, kernel = int(w.shape[0]), int(w.shape[2])
    return ESLConfig(
        strategy=strategy,
        embed_size=embed_size,
        kernel_size=kernel,
        num_levels=num_levels,
        img_dim=img_dim,
        text_encoder="bert",
        text_model=None,
        heuristic_channels=channels,
        extra={
            "source": "released checkpoint",
            "epoch": ckpt.get("epoch"),
            "best_rsum": _num(ckpt.get("best_rsum")),
            "margin": _num(get("margin", 0.2)),
        },
    )


def _num(x: Any) -> Any:
    return float(x) if isinstance(x, (int, float, Tensor)) and not isinstance(x, bool) else None


def map_state(ckpt: dict[str, Any], num_levels: int) -> tuple[dict[str, Tensor], list[str]]:
    """Rename released keys to ours. Returns the mapped state and the keys left unmapped."""
    img, txt, sim = (_strip(s) for s in ckpt["model"])
    tagged = {f"image.{k}": v for k, v in img.items()}
    tagged.update({f"text.{k}": v for k, v in txt.items()})
    tagged.update({f"sim.{k}": v for k, v in sim.items()})
    rules: list[tuple[str, str]] = [
        (r"^image\.fc\.(weight|bias)$", r"image_encoder.fc.\1"),
        (r"^image\.mlp\.layers\.0\.(.+)$", r"image_encoder.mlp.fc1.\1"),
        (r"^image\.mlp\.layers\.1\.(.+)$", r"image_encoder.mlp.fc2.\1"),
        (r"^image\.mlp\.bns\.0\.(.+)$", r"image_encoder.mlp.bn.\1"),
        (r"^text\.bert\.(.+)$", r"text_encoder.backbone.\1"),
        (r"^text\.linear\.(weight|bias)$", r"text_encoder.proj.\1"),
        (
            r"^sim\.plus_encoder\.encoders_1\.image_levels\.(?:masks|kernel_img)_(\d+)\.weight$",
            "image_levels.levels.{0}.weight",
        ),
        (
            r"^sim\.plus_encoder\.encoders_1\.text_levels\.(?:masks|kernel_txt)_(\d+)\.weight$",
            "text_levels.levels.{0}.weight",
        ),
        (r"^sim\.sims\.calculator_1\.masks_(\d+)\.weight$", "correspondence.S.{1}"),
        (r"^sim\.sims\.calculator_1\.lynorm_(\d+)\.weight$", "correspondence.ln_weight.{1}"),
        (r"^sim\.sims\.calculator_1\.lynorm_(\d+)\.bias$", "correspondence.ln_bias.{1}"),
        (r"^sim\.sims\.calculator_1\.sim_eval\.weight$", "correspondence.w"),
        (r"^sim\.sims\.calculator_1\.temp_scale\.weight$", "pooling.t"),
        (r"^sim\.sims\.calculator_1\.temp_scale_1\.weight$", "correspondence.sigma"),
        (r"^sim\.sims\.calculator_1\.temp_scale_2\.weight$", "correspondence.t2"),
    ]
    out: dict[str, Tensor] = {}
    left: list[str] = []
    for key, value in tagged.items():
        if any(p.match(key) for p in _UNUSED):
            continue
        for pattern, target in rules:
            m = re.match(pattern, key)
            if m:
                if "{0}" in target:  # level l (1-based) -> list index l-1
                    name = target.format(int(m.group(1)) - 1)
                elif "{1}" in target:
                    name = target.replace("{1}", m.group(1))
                else:
                    name = m.expand(target)
                out[name] = value
                break
        else:
            left.append(key)
    for name in ("correspondence.w", "pooling.t", "correspondence.sigma", "correspondence.t2"):
        if name in out:
            out[name] = out[name].reshape(-1) if name == "correspondence.w" else out[name].reshape(())
    return out, left


def load_official_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", text_model: str | Path | None = None
) -> ESLModel | ESLClipModel:
    """Load one of the authors' released checkpoints, in eval mode.

    - The BERT + regions ESL (``model_best.pth.tar``): an :class:`ESLModel`.
    - The CLIP-based branch (``model_best_*_clip_based.pth``): an ESL-CLIP model (its
      tokenizer is built in; ``text_model`` is ignored).

    Args:
        path: the checkpoint.
        map_location: device for the weights.
        text_model: a BERT model directory or Hub name whose tokenizer is used for raw text
            (released BERT files do not store one). Without it, the model scores token ids only.
    """
    raw = safe_load(path, map_location="cpu")
    model = (
        load_clip_release(raw, str(path), map_location) if is_clip_release(raw) else _load_esl(raw, path, text_model)
    )
    # An index records it. Not cached: no litter beside a user's file, and torch.load has just read it all.
    model.weights_digest = {"format": "released", "sha256": sha256_stream(path)}
    return model.to(map_location).eval()


def _load_esl(raw: Any, path: str | Path, text_model: str | Path | None) -> ESLModel:
    ckpt = check_outline(raw, Path(path))
    config = config_from_checkpoint(ckpt)
    text_state = _strip(ckpt["model"][1])
    bert_config = infer_bert_config(text_state)
    tokenizer = load_tokenizer(text_model, required=True) if text_model is not None else None
    if text_model is not None:
        config.text_model = str(text_model)
    model = ESLModel(config, bert_from_config(bert_config), tokenizer)
    state, left = map_state(ckpt, config.num_levels)
    load_mapped_state(model, state, left, str(path), "ESL")
    return model
