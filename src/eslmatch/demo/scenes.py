"""Rendered scenes for the demo dataset: sampling, hard pairs, splits, PNG rendering, writing.

A split is generated (never downloaded) from a seed: scenes of 2-4 coloured shapes, five true
captions per image (:mod:`eslmatch.demo.grammar`), and *hard pairs*: two images that differ
only by swapping the colours, the sizes or the positions of two objects, so that a caption of
one ("a red circle and a blue square", "a red circle left of a blue square") is false of the
other. Matching those needs the fine-grained binding ESL is meant for.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import EslmatchError
from ..utils import atomic_write_text
from .grammar import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    SIZE_RADIUS,
    Caption,
    Obj,
    Scene,
    caption_candidates,
    caption_is_true,
    describe,
    meaning_key,
    relation_holds,
    split_truth,
)

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (247, 140, 20),
    "yellow": (238, 206, 30),
    "green": (40, 158, 50),
    "blue": (35, 85, 215),
    "purple": (140, 60, 180),
    "black": (30, 30, 30),
}
HARD_KINDS: tuple[str, ...] = ("color", "size", "position")
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are sampled (fractions of the image side unless said otherwise).

    ``twin_prob``: chance that a new object copies shape and colour of an earlier one (gives
    counts such as "two green triangles"); ``share_prob``: chance it copies just one of them.
    ``hard_weights``: relative frequency of colour / size / position swaps in hard pairs.
    ``hard_captions``: captions per hard-pair image chosen to be false of its partner.
    """

    min_objects: int = 2
    max_objects: int = 4
    large_prob: float = 0.4
    radius_jitter: float = 0.1
    gap: float = 0.025
    border: float = 0.02
    max_angle: float = 12.0
    tint: int = 12
    twin_prob: float = 0.2
    share_prob: float = 0.25
    hard_weights: tuple[float, float, float] = (0.4, 0.2, 0.4)
    hard_captions: int = 2


DEFAULT_SCENE = SceneConfig()


# ----------------------------------------------------------------------------- sampling


def layout_ok(objects: Sequence[Obj], config: SceneConfig = DEFAULT_SCENE) -> bool:
    """Every object inside the image and no two bounding circles closer than ``gap``."""
    for k, o in enumerate(objects):
        if not (o.r + config.border <= o.x <= 1 - o.r - config.border):
            return False
        if not (o.r + config.border <= o.y <= 1 - o.r - config.border):
            return False
        for p in objects[:k]:
            if math.hypot(o.x - p.x, o.y - p.y) < o.r + p.r + config.gap:
                return False
    return True


def _new_object(rng: random.Random, placed: Sequence[Obj], config: SceneConfig) -> Obj | None:
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    if placed:
        u, other = rng.random(), rng.choice(placed)
        if u < config.twin_prob:
            shape, color = other.shape, other.color
        elif u < config.twin_prob + config.share_prob:
            shape, color = (other.shape, color) if rng.random() < 0.5 else (shape, other.color)
    size = "large" if rng.random() < config.large_prob else "small"
    r = SIZE_RADIUS[size] * (1 + rng.uniform(-config.radius_jitter, config.radius_jitter))
    angle = rng.uniform(-config.max_angle, config.max_angle)
    tint = tuple(rng.randint(-config.tint, config.tint) for _ in range(3))
    lo, hi = r + config.border, 1 - r - config.border
    for _ in range(60):
        o = Obj(shape, color, size, rng.uniform(lo, hi), rng.uniform(lo, hi), r, angle, tint)  # type: ignore[arg-type]
        if layout_ok([*placed, o], config):
            return o
    return None


def sample_scene(rng: random.Random, config: SceneConfig = DEFAULT_SCENE) -> Scene:
    """A random scene of ``min_objects``..``max_objects`` non-overlapping objects."""
    while True:
        n = rng.randint(config.min_objects, config.max_objects)
        objects: list[Obj] = []
        while len(objects) < n:
            o = _new_object(rng, objects, config)
            if o is None:
                break
            objects.append(o)
        if len(objects) == n:
            g = rng.randint(222, 246)
            background = tuple(min(255, g + rng.randint(-8, 8)) for _ in range(3))
            return Scene(tuple(objects), background, rng.getrandbits(32))  # type: ignore[arg-type]


def swap_objects(scene: Scene, i: int, j: int, kind: str, config: SceneConfig = DEFAULT_SCENE) -> Scene | None:
    """The scene with objects ``i`` and ``j`` swapping colour, size or position.

    None when the swap changes nothing that a caption can state (same colour / size /
    description) or breaks the layout.
    """
    objs = list(scene.objects)
    a, b = objs[i], objs[j]
    if kind == "color":
        if a.color == b.color or a.shape == b.shape:
            return None
        objs[i], objs[j] = replace(a, color=b.color), replace(b, color=a.color)
    elif kind == "size":
        if a.size == b.size or (a.shape == b.shape and a.color == b.color):
            return None
        objs[i], objs[j] = replace(a, size=b.size, radius=b.r), replace(b, size=a.size, radius=a.r)
    elif kind == "position":
        if (a.shape, a.color, a.size) == (b.shape, b.color, b.size):
            return None
        if not any(relation_holds(a, rel, b) for rel in ("left_of", "right_of", "above", "below")):
            return None
        objs[i], objs[j] = replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)
    else:
        raise EslmatchError(f"unknown hard-pair kind {kind!r} (expected one of {', '.join(HARD_KINDS)})")
    if not layout_ok(objs, config):
        return None
    return replace(scene, objects=tuple(objs))


def _false_for(scene: Scene, partner: Scene, rng: random.Random, focus: Sequence[int], want: int) -> list[Caption]:
    """Up to ``want`` distinct captions true of ``scene`` and false of ``partner`` (lenient)."""
    out: list[Caption] = []
    seen: set[object] = set()
    for cap in caption_candidates(scene, rng, 24, focus):
        if len(out) >= want:
            break
        key = meaning_key(cap.meaning)
        if key not in seen and not caption_is_true(partner, cap, strict=False):
            out.append(cap)
            seen.add(key)
    return out


def sample_hard_pair(
    rng: random.Random, kind: str, config: SceneConfig = DEFAULT_SCENE, n: int = CAPTIONS_PER_IMAGE
) -> tuple[Scene, list[Caption], Scene, list[Caption]]:
    """Two scenes differing by one swap, each with ``n`` captions, at least one of them false
    of the other scene (``config.hard_captions`` when the grammar finds that many)."""
    while True:
        a = sample_scene(rng, config)
        pairs = [(i, j) for i in range(len(a.objects)) for j in range(i + 1, len(a.objects))]
        rng.shuffle(pairs)
        for i, j in pairs:
            b = swap_objects(a, i, j, kind, config)
            if b is None:
                continue
            keep_a = _false_for(a, b, rng, (i, j), config.hard_captions)
            keep_b = _false_for(b, a, rng, (i, j), config.hard_captions)
            if keep_a and keep_b:
                return a, describe(a, rng, n, keep_a), b, describe(b, rng, n, keep_b)


# ----------------------------------------------------------------------------- splits


@dataclass
class SplitSpec:
    """A generated split: ``scenes[i]`` has captions ``captions[i]`` (``captions_per_image``
    each); ``hard_pairs[k] = (a, b)`` are image indices that differ by a ``hard_kinds[k]``
    swap."""

    name: str
    seed: int
    scenes: list[Scene]
    captions: list[list[Caption]]
    hard_pairs: list[tuple[int, int]] = field(default_factory=list)
    hard_kinds: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.scenes)

    @property
    def captions_per_image(self) -> int:
        return len(self.captions[0]) if self.captions else CAPTIONS_PER_IMAGE

    @property
    def n_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def image_names(self) -> list[str]:
        return [f"{self.name}_{i:05d}.png" for i in range(self.n_images)]

    def caption_texts(self) -> list[str]:
        """All captions, image by image (caption ``c`` belongs to image ``c // 5``)."""
        return [c.text for caps in self.captions for c in caps]


def generate_split(
    n_images: int,
    seed: int,
    hard_fraction: float = 0.3,
    *,
    name: str = "test",
    config: SceneConfig = DEFAULT_SCENE,
    captions_per_image: int = CAPTIONS_PER_IMAGE,
) -> SplitSpec:
    """Generate a split deterministically from ``seed``.

    About ``hard_fraction`` of the images belong to hard pairs (two images per pair), placed at
    random indices.
    """
    if n_images < 1:
        raise EslmatchError(f"n_images must be at least 1, got {n_images}")
    if not 0.0 <= hard_fraction <= 1.0:
        raise EslmatchError(f"hard_fraction must be within [0, 1], got {hard_fraction}")
    if captions_per_image < config.hard_captions or captions_per_image < 1:
        least = max(1, config.hard_captions)
        raise EslmatchError(f"captions_per_image must be at least {least}, got {captions_per_image}")
    if not 1 <= config.min_objects <= config.max_objects <= max(NUMBER_WORDS):
        raise EslmatchError(
            f"objects per scene must satisfy 1 <= min_objects <= max_objects <= {max(NUMBER_WORDS)}, "
            f"got {config.min_objects}..{config.max_objects}"
        )
    if hard_fraction > 0 and config.max_objects < 2:
        raise EslmatchError("hard pairs need scenes of at least two objects (max_objects >= 2)")
    rng = random.Random(seed)
    n_pairs = int(n_images * hard_fraction) // 2
    units: list[Any] = []
    for _ in range(n_pairs):
        kind = rng.choices(HARD_KINDS, weights=config.hard_weights)[0]
        units.append((kind, sample_hard_pair(rng, kind, config, captions_per_image)))
    for _ in range(n_images - 2 * n_pairs):
        s = sample_scene(rng, config)
        units.append((None, (s, describe(s, rng, captions_per_image))))
    slots = list(range(n_images))
    rng.shuffle(slots)
    scenes: list[Scene | None] = [None] * n_images
    captions: list[list[Caption]] = [[] for _ in range(n_images)]
    pairs: list[tuple[int, int]] = []
    kinds: list[str] = []
    it = iter(slots)
    for kind, items in units:
        placed = []
        for k in range(0, len(items), 2):
            slot = next(it)
            scenes[slot], captions[slot] = items[k], items[k + 1]
            placed.append(slot)
        if kind is not None:
            pairs.append((placed[0], placed[1]))
            kinds.append(kind)
    return SplitSpec(name, seed, scenes, captions, pairs, kinds)  # type: ignore[arg-type]


@dataclass(frozen=True)
class HardCase:
    """Caption ``caption`` (global index) describes ``image`` and is false of ``partner``."""

    caption: int
    image: int
    partner: int
    kind: str


def hard_case_captions(spec: SplitSpec) -> list[HardCase]:
    """For each hard pair (a, b), both ways: the captions of a that are false of b.

    Falsity is checked with the lenient reading, so these captions are false of the partner
    under any reading; ranking the partner above the right image is a real mistake.
    """
    cpi = spec.captions_per_image
    out: list[HardCase] = []
    for (a, b), kind in zip(spec.hard_pairs, spec.hard_kinds):
        for img, partner in ((a, b), (b, a)):
            for k, cap in enumerate(spec.captions[img]):
                if not caption_is_true(spec.scenes[partner], cap, strict=False):
                    out.append(HardCase(img * cpi + k, img, partner, kind))
    return out


def hard_case_scores(sims: np.ndarray, cases: Sequence[HardCase]) -> dict[str, float]:
    """Retrieval on the hard captions from an image x caption score matrix ``sims (N, M)``.

    ``r1``: share of hard captions whose best image is the right one; ``pairwise``: share
    where the right image scores above its partner; ``count``: number of hard captions.
    """
    sims = np.asarray(sims)
    if not cases:
        return {"r1": float("nan"), "pairwise": float("nan"), "count": 0.0}
    cap = np.array([c.caption for c in cases])
    img = np.array([c.image for c in cases])
    partner = np.array([c.partner for c in cases])
    if sims.ndim != 2 or cap.max() >= sims.shape[1] or max(img.max(), partner.max()) >= sims.shape[0]:
        raise EslmatchError(f"score matrix of shape {sims.shape} does not cover the hard cases")
    cols = sims[:, cap]
    r1 = float(np.mean(cols.argmax(axis=0) == img))
    pairwise = float(np.mean(cols[img, np.arange(len(cap))] > cols[partner, np.arange(len(cap))]))
    return {"r1": r1, "pairwise": pairwise, "count": float(len(cases))}


# ----------------------------------------------------------------------------- rendering


def _shape_points(o: Obj, scale: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a non-circle shape, rotated by ``o.angle``."""
    r = o.r * scale
    if o.shape == "square":
        h = 0.74
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif o.shape == "triangle":
        # Equilateral, pointing up; the centroid sits at the centre. Slightly enlarged so its
        # area is closer to the other shapes' (its vertices stay inside the placement gap).
        pts = [(1.08 * math.cos(math.radians(a)), 1.08 * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif o.shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif o.shape == "cross":
        w, L = 0.32, 0.95
        pts = [
            (-w, -L),
            (w, -L),
            (w, -w),
            (L, -w),
            (L, w),
            (w, w),
            (w, L),
            (-w, L),
            (-w, w),
            (-L, w),
            (-L, -w),
            (-w, -w),
        ]
    elif o.shape == "diamond":
        pts = [(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]
    else:
        raise EslmatchError(f"unknown shape {o.shape!r} (expected one of {', '.join(SHAPES)})")
    c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
    cx, cy = o.x * scale, o.y * scale
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]


def object_rgb(o: Obj) -> tuple[int, int, int]:
    """Fill colour of an object: its named colour plus its tint."""
    if o.color not in COLOR_RGB:
        raise EslmatchError(f"unknown colour {o.color!r} (expected one of {', '.join(COLOR_RGB)})")
    return tuple(int(min(255, max(0, v + t))) for v, t in zip(COLOR_RGB[o.color], o.tint))  # type: ignore[return-value]


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Light background ``(size, size, 3)`` float: base colour, soft gradient, blotchy texture."""
    coarse = Image.fromarray(rng.normal(0.0, 4.0, (5, 5)).astype(np.float32), mode="F")
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(size, dtype=np.float32) / size) - 0.5
    grad = rng.uniform(4.0, 10.0) * (math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None])
    base = np.asarray(scene.background, dtype=np.float32)
    return base[None, None, :] + (texture + grad)[:, :, None]


def render_scene(scene: Scene, size: int = 128, supersample: int = 2) -> Image.Image:
    """Draw a scene as a ``size x size`` RGB image (anti-aliased by supersampling)."""
    rng = np.random.default_rng(scene.noise_seed)
    bg = _background(scene, size, rng)
    big = size * supersample
    layer = Image.new("RGB", (big, big))
    mask = Image.new("L", (big, big))
    dl, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    edge_w = max(1, supersample)
    for o in scene.objects:
        fill = object_rgb(o)
        edge = tuple(int(v * 0.6) for v in fill)
        if o.shape == "circle":
            r, cx, cy = o.r * big, o.x * big, o.y * big
            box = (cx - r, cy - r, cx + r, cy + r)
            dl.ellipse(box, fill=fill, outline=edge, width=edge_w)
            dm.ellipse(box, fill=255)
        else:
            pts = _shape_points(o, big)
            dl.polygon(pts, fill=fill, outline=edge, width=edge_w)
            dm.polygon(pts, fill=255)
    # The colour layer is black outside shapes, so its box-filtered version is premultiplied.
    col = np.asarray(layer.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[:, :, None] / 255.0
    img = bg * (1.0 - alpha) + col + 2.5 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SplitFiles:
    """Where :func:`write_split` put a split."""

    images_dir: Path
    captions_file: Path
    hard_pairs_file: Path
    image_names: tuple[str, ...]
    truth_file: Path | None = None


def hard_pairs_record(spec: SplitSpec) -> dict[str, Any]:
    """The JSON-able description of a split's hard pairs (global caption indices)."""
    cases = hard_case_captions(spec)
    by_pair: dict[tuple[int, int], list[int]] = {}
    for c in cases:
        by_pair.setdefault((c.image, c.partner), []).append(c.caption)
    names = spec.image_names()
    return {
        "split": spec.name,
        "seed": spec.seed,
        "n_images": spec.n_images,
        "captions_per_image": spec.captions_per_image,
        "pairs": [
            {
                "a": a,
                "b": b,
                "a_name": names[a],
                "b_name": names[b],
                "kind": kind,
                "captions_of_a_false_for_b": by_pair.get((a, b), []),
                "captions_of_b_false_for_a": by_pair.get((b, a), []),
            }
            for (a, b), kind in zip(spec.hard_pairs, spec.hard_kinds)
        ],
    }


def write_split(
    spec: SplitSpec,
    images_dir: str | Path,
    captions_file: str | Path,
    hard_pairs_file: str | Path | None = None,
    *,
    size: int = 128,
    progress: bool = False,
) -> SplitFiles:
    """Write ``{split}_{i:05d}.png`` images, an ``image_name<TAB>caption`` file (one line per
    caption, images in order), the hard pairs as JSON (default: ``{split}_hard_pairs.json``
    next to the captions file) and the truth of every caption (``{split}_truth.json`` next to
    the captions file: the images each caption is true of, :mod:`eslmatch.truth`).

    Images are rendered into a temporary folder first and moved in only when all succeeded;
    the text files are replaced atomically.
    """
    images_dir, captions_file = Path(images_dir), Path(captions_file)
    hard_path = Path(hard_pairs_file) if hard_pairs_file else captions_file.with_name(f"{spec.name}_hard_pairs.json")
    for text in spec.caption_texts():
        if "\t" in text or "\n" in text:
            raise EslmatchError(f"caption {text!r} holds a tab or a newline")
    images_dir.mkdir(parents=True, exist_ok=True)
    captions_file.parent.mkdir(parents=True, exist_ok=True)
    hard_path.parent.mkdir(parents=True, exist_ok=True)
    names = spec.image_names()
    tmp_dir = Path(tempfile.mkdtemp(dir=images_dir, prefix=f".{spec.name}-"))
    try:
        from tqdm import tqdm

        def render(i: int) -> None:
            render_scene(spec.scenes[i], size).save(tmp_dir / names[i], format="PNG", compress_level=1)

        # PIL's drawing and PNG encoding release the GIL: threads render about twice as fast on 2 cores
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for _ in tqdm(
                pool.map(render, range(spec.n_images)),
                total=spec.n_images,
                desc=f"rendering {spec.name}",
                unit="img",
                disable=not progress,
            ):
                pass
        lines = [f"{names[i]}\t{c.text}\n" for i, caps in enumerate(spec.captions) for c in caps]
        record = json.dumps(hard_pairs_record(spec), indent=1) + "\n"
        for name in names:
            os.replace(tmp_dir / name, images_dir / name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    atomic_write_text(captions_file, "".join(lines))
    atomic_write_text(hard_path, record)
    truth_file = captions_file.with_name(f"{spec.name}_truth.json")
    atomic_write_text(truth_file, truth_record(spec))
    return SplitFiles(images_dir, captions_file, hard_path, tuple(names), truth_file)


def truth_record(spec: SplitSpec) -> str:
    """``{split}_truth.json`` of a split: ``{"captions": [[image indices], ...]}`` in caption
    order (strict reading of each caption), plus the image names and the reading."""
    truth = split_truth(spec.scenes, [c for caps in spec.captions for c in caps])
    lines = ",\n  ".join(json.dumps(t) for t in truth)
    head = {"split": spec.name, "reading": "strict", "n_images": spec.n_images, "image_names": spec.image_names()}
    return json.dumps(head)[:-1] + ',\n "captions": [\n  ' + lines + "\n ]\n}\n"


def load_hard_cases(path: str | Path, ids: Sequence[str] | None = None) -> list[HardCase]:
    """The hard cases of a ``{split}_hard_pairs.json`` written by :func:`write_split`.

    ``ids``: image ids in the row order of extracted features (``PrecompSplit.ids``, file
    names with or without extension); when given, image and caption indices are remapped to
    those rows (caption ``k`` of row ``r`` is ``r * captions_per_image + k``), and pairs with
    an image missing from ``ids`` are dropped.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        cpi = int(record["captions_per_image"])
        pairs = record["pairs"]
        raw = [
            (p[img], p[partner], c, p["kind"], p[f"{img}_name"], p[f"{partner}_name"])
            for p in pairs
            for img, partner, key in (("a", "b", "captions_of_a_false_for_b"), ("b", "a", "captions_of_b_false_for_a"))
            for c in p[key]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EslmatchError(f"{path}: not a readable hard-pairs file ({exc})") from exc
    if ids is None:
        return [HardCase(int(c), int(i), int(j), str(k)) for i, j, c, k, _, _ in raw]

    def stem(name: str) -> str:
        return Path(str(name)).name.rsplit(".", 1)[0]

    row = {stem(name): r for r, name in enumerate(ids)}
    out = []
    for i, _j, c, kind, name_i, name_j in raw:
        ri, rj = row.get(stem(name_i)), row.get(stem(name_j))
        if ri is not None and rj is not None:
            out.append(HardCase(ri * cpi + (int(c) - int(i) * cpi), ri, rj, str(kind)))
    return out


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and seed of the whole demo dataset (Flickr30K-like evaluation splits)."""

    n_train: int = 10_000
    n_dev: int = 1_000
    n_test: int = 1_000
    seed: int = 0
    hard_fraction: float = 0.3
    image_size: int = 128
    scene: SceneConfig = DEFAULT_SCENE


def split_seed(seed: int, split: str) -> int:
    """Seed of one split, distinct per split for one dataset seed."""
    return seed * 4 + {"train": 0, "dev": 1, "test": 2}[split]


def write_demo_dataset(
    root: str | Path, config: DemoConfig = DemoConfig(), progress: bool = False
) -> dict[str, SplitFiles]:
    """Generate and write train/dev/test under ``root``: ``images/{split}/{split}_{i:05d}.png``
    (one folder per split, so ``eslmatch extract --images`` sees one split),
    ``{split}_captions.txt`` and ``{split}_hard_pairs.json``. Empty splits are skipped."""
    root = Path(root)
    out: dict[str, SplitFiles] = {}
    for split, n in (("train", config.n_train), ("dev", config.n_dev), ("test", config.n_test)):
        if n <= 0:
            continue
        spec = generate_split(n, split_seed(config.seed, split), config.hard_fraction, name=split, config=config.scene)
        out[split] = write_split(
            spec, root / "images" / split, root / f"{split}_captions.txt", size=config.image_size, progress=progress
        )
    return out
