"""Tiny precomp datasets written on the fly for tests (spec section 6 layout).

Each image shows two objects (colour, shape, size) and a relation; its region features
encode them through a fixed random projection, and its five captions describe them, so a
small model can actually learn to match (useful for training tests). Words come from
``_models.WORDS`` plus "is"/"of", so ``_models.tiny_vocab()`` covers nearly all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

COLORS = ("red", "blue", "green")
SHAPES = ("circle", "square")
SIZES = ("big", "small")
RELATIONS = ("left of", "right of", "above")
_CONCEPTS = len(COLORS) + len(SHAPES) + len(SIZES)


def _scene(rng: np.random.Generator) -> dict:
    objs = [(COLORS[rng.integers(3)], SHAPES[rng.integers(2)], SIZES[rng.integers(2)]) for _ in range(2)]
    return {"objects": objs, "relation": RELATIONS[rng.integers(3)]}


def scene_captions(scene: dict) -> list[str]:
    """Five captions of a scene."""
    (c1, s1, z1), (c2, s2, z2) = scene["objects"]
    rel = scene["relation"]
    return [
        f"a {z1} {c1} {s1}",
        f"the {c1} {s1} {rel} the {c2} {s2}",
        f"a {c1} {s1} and a {c2} {s2}",
        f"{z1} {c1} {s1} {rel} {z2} {c2} {s2}",
        f"the {z2} {c2} {s2}",
    ]


def _object_code(obj: tuple[str, str, str]) -> np.ndarray:
    c, s, z = obj
    v = np.zeros(_CONCEPTS, dtype=np.float32)
    v[COLORS.index(c)] = 1
    v[len(COLORS) + SHAPES.index(s)] = 1
    v[len(COLORS) + len(SHAPES) + SIZES.index(z)] = 1
    return v


def scene_features(scene: dict, regions: int, dim: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """Region features ``(regions, dim)``: region 0/1 show the objects, the rest noise."""
    proj = np.random.default_rng(12345).standard_normal((_CONCEPTS, dim)).astype(np.float32)
    feats = noise * rng.random((regions, dim), dtype=np.float32)
    for r, obj in enumerate(scene["objects"][:regions]):
        feats[r] += np.maximum(_object_code(obj) @ proj, 0)
    return feats


def make_precomp(
    root: str | Path,
    splits: Sequence[str] = ("train", "dev", "test"),
    n_images: int | dict[str, int] = 10,
    regions: int = 6,
    dim: int = 16,
    layout: str = "per5",
    captions: Sequence[str] | None = None,
    seed: int = 0,
    dtype: str = "float32",
    folder: str | None = "f30k_precomp",
    ids: bool = False,
    image_paths: bool = False,
) -> Path:
    """Write a precomp dataset and return the folder holding the split files.

    Args:
        root: where to write; the files go to ``root / folder`` (``folder=None``: ``root``).
        splits: split names to write.
        n_images: images per split (an int for all, or a dict per split).
        regions, dim: ``R`` and ``D`` of the region features.
        layout: ``"per5"`` (one row per image) or ``"repeated"`` (one row per caption, each
            image row repeated 5 times, as in the SCAN/VSE files).
        captions: 5 x n_images captions used for every split instead of generated ones.
        dtype: dtype of the ``.npy`` features.
        ids / image_paths: also write ``{split}_ids.txt`` / ``{split}_images.txt`` (one line
            per file row).
    """
    if layout not in ("per5", "repeated"):
        raise ValueError(f"layout must be 'per5' or 'repeated', got {layout!r}")
    out = Path(root) if folder is None else Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    for s_i, split in enumerate(splits):
        n = n_images[split] if isinstance(n_images, dict) else n_images
        rng = np.random.default_rng([seed, s_i])
        scenes = [_scene(rng) for _ in range(n)]
        feats = np.stack([scene_features(sc, regions, dim, rng) for sc in scenes]).astype(dtype)
        caps = list(captions) if captions is not None else [c for sc in scenes for c in scene_captions(sc)]
        if len(caps) != 5 * n:
            raise ValueError(f"need {5 * n} captions for {n} images, got {len(caps)}")
        rows = np.repeat(feats, 5, axis=0) if layout == "repeated" else feats
        np.save(out / f"{split}_ims.npy", rows)
        (out / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
        per_row = 5 if layout == "repeated" else 1
        if ids:
            (out / f"{split}_ids.txt").write_text(
                "\n".join(str(1000 + i // per_row) for i in range(len(rows))) + "\n", encoding="utf-8"
            )
        if image_paths:
            (out / f"{split}_images.txt").write_text(
                "\n".join(f"images/{split}/{i // per_row:05d}.jpg" for i in range(len(rows))) + "\n", encoding="utf-8"
            )
    return out
