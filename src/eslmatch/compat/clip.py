"""The CLIP-based ESL branch's released checkpoints (``model_best_{heuristic,adaptive}_coco_clip_based.pth``).

The file is ``{'epoch', 'state_dict', 'optimizer'}``; ``state_dict`` holds ``clip.*`` (OpenAI
CLIP's names: fused attention ``in_proj``, ``(width, E)`` projection matrices) and
``pool_frames.*`` (the ESL head). Strategy and architecture are inferred from tensor names
and shapes (OpenAI's rule: 64-wide attention heads); every released tensor is mapped
strictly onto our names (``in_proj`` split into q / k / v, projections transposed), so a
missing or unexpected key is an error that names it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..model.base import load_mapped_state
from ..model.esl_clip import ClipArchitecture, ESLClipConfig, ESLClipModel

_HEAD = "pool_frames.cross_attn."
_LEVELS = _HEAD + "plus_encoder.encoders_1."
_SIMS = _HEAD + "sims.calculator_1."
_BLOCK = re.compile(r"^(?:visual\.)?transformer\.resblocks\.(\d+)\.")
_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def is_clip_release(ckpt: Any) -> bool:
    """A dict whose ``state_dict`` has the branch's ``clip.*`` / ``pool_frames.*`` keys."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    return isinstance(state, dict) and any(str(k).startswith(("clip.", "module.clip.")) for k in state)


def release_state(ckpt: dict[str, Any], source: str) -> dict[str, Tensor]:
    """The release's state dict (``module.`` prefixes stripped, tensors only, float32)."""
    out: dict[str, Tensor] = {}
    for k, v in ckpt["state_dict"].items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{source}: state_dict[{k!r}] is not a tensor")
        out[k[len("module.") :] if k.startswith("module.") else k] = v.float() if v.is_floating_point() else v
    return out


def infer_config(state: dict[str, Tensor], source: str) -> ESLClipConfig:
    """Strategy, levels and the CLIP architecture from the tensors' names and shapes."""

    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{source}: not an ESL-CLIP checkpoint (no {key})")
        return state[key]

    conv = need("clip.visual.conv1.weight")
    width, _, patch, _ = conv.shape
    positions = need("clip.visual.positional_embedding").shape[0]
    grid = round((positions - 1) ** 0.5)
    text_width = need("clip.ln_final.weight").shape[0]
    arch = ClipArchitecture(
        embed_dim=int(need("clip.text_projection").shape[1]),
        image_size=int(patch * grid),
        patch_size=int(patch),
        vision_width=int(width),
        vision_layers=_count(state, r"^clip\.visual\.transformer\.resblocks\.(\d+)\."),
        vision_heads=int(width) // 64,
        context_length=int(need("clip.positional_embedding").shape[0]),
        vocab_size=int(need("clip.token_embedding.weight").shape[0]),
        text_width=int(text_width),
        text_layers=_count(state, r"^clip\.transformer\.resblocks\.(\d+)\."),
        text_heads=int(text_width) // 64,
    )
    heuristic = any(k.startswith(_LEVELS + "image_levels.kernel_img_") for k in state)
    if not heuristic and not any(k.startswith(_LEVELS + "image_levels.masks_") for k in state):
        raise CheckpointError(f"{source}: no ESL level stack ({_LEVELS}image_levels.*) in the checkpoint")
    prefix = _LEVELS + ("image_levels.kernel_img_" if heuristic else "image_levels.masks_")
    levels = len([k for k in state if k.startswith(prefix)])
    first = need(prefix + "1.weight")
    if heuristic:
        kernel, channels = int(first.shape[2]), int(first.shape[0])
    else:
        kernel, channels = int(first.shape[1]) // max(1, int(first.shape[0])), 4
    return ESLClipConfig(
        strategy="heuristic" if heuristic else "adaptive",
        kernel_size=kernel,
        num_levels=levels,
        heuristic_channels=channels,
        clip=arch,
        extra={"source": "released CLIP-based checkpoint"},
    )


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def map_state(state: dict[str, Tensor], config: ESLClipConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Released names -> ours. Returns the mapped state and the released keys left unused."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return state[key]

    for key in list(state):
        if not key.startswith("clip."):
            continue
        rel = key[len("clip.") :]
        tower = "vision_model" if rel.startswith("visual.") else "text_model"
        m = _BLOCK.match(rel)
        if m:
            layer = f"clip.{tower}.encoder.layers.{m.group(1)}."
            rest = rel[m.end() :]
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), take(key).chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.clone()
                continue
            for theirs, ours in _LAYER_PARTS.items():
                if rest.startswith(theirs + "."):
                    out[layer + ours + rest[len(theirs) :]] = take(key)
                    break
            continue
        simple = {
            "logit_scale": "clip.logit_scale",
            "token_embedding.weight": "clip.text_model.embeddings.token_embedding.weight",
            "positional_embedding": "clip.text_model.embeddings.position_embedding.weight",
            "ln_final.weight": "clip.text_model.final_layer_norm.weight",
            "ln_final.bias": "clip.text_model.final_layer_norm.bias",
            "visual.class_embedding": "clip.vision_model.embeddings.class_embedding",
            "visual.conv1.weight": "clip.vision_model.embeddings.patch_embedding.weight",
            "visual.positional_embedding": "clip.vision_model.embeddings.position_embedding.weight",
            "visual.ln_pre.weight": "clip.vision_model.pre_layrnorm.weight",
            "visual.ln_pre.bias": "clip.vision_model.pre_layrnorm.bias",
            "visual.ln_post.weight": "clip.vision_model.post_layernorm.weight",
            "visual.ln_post.bias": "clip.vision_model.post_layernorm.bias",
        }
        if rel in simple:
            out[simple[rel]] = take(key)
        elif rel == "text_projection":
            out["clip.text_projection.weight"] = take(key).t().contiguous()
        elif rel == "visual.proj":
            out["clip.visual_projection.weight"] = take(key).t().contiguous()
    heuristic = config.strategy == "heuristic"
    for side, short in (("image", "img"), ("text", "txt")):
        for lvl in range(1, config.num_levels + 1):
            name = f"kernel_{short}_{lvl}" if heuristic else f"masks_{lvl}"
            key = f"{_LEVELS}{side}_levels.{name}.weight"
            if key in state:
                out[f"{side}_levels.levels.{lvl - 1}.weight"] = take(key)
    for lvl in range(config.num_levels + 1):
        key = f"{_SIMS}masks_{lvl}.weight"
        if key in state:
            out[f"measuring.M.{lvl}"] = take(key)
    for theirs, ours in (
        ("sim_eval.weight", "measuring.w"),
        ("temp_scale.weight", "measuring.temperature"),
        ("temp_scale_1.weight", "measuring.sigma"),
        ("temp_scale_2.weight", "measuring.t2"),
    ):
        if _SIMS + theirs in state:
            t = take(_SIMS + theirs)
            out[ours] = t.reshape(-1) if ours == "measuring.w" else t.reshape(())
    return out, sorted(set(state) - used)


def load_clip_release(ckpt: dict[str, Any], source: str, map_location: str | torch.device = "cpu") -> ESLClipModel:
    """An :class:`ESLClipModel` (eval mode) from a released CLIP-based checkpoint's contents."""
    state = release_state(ckpt, source)
    config = infer_config(state, source)
    config.extra["epoch"] = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), (int, float)) else None
    model = ESLClipModel(config)
    mapped, left = map_state(state, config)
    load_mapped_state(model, mapped, left, source, "ESL-CLIP")
    return model.to(map_location).eval()
