"""Compositional benchmarks: SugarCrepe and Winoground, with any model family.

- **SugarCrepe** (Hsieh et al., NeurIPS 2023): COCO val2017 images, each with a positive and
  a hard negative caption, in up to seven JSON files (``replace_obj``, ``replace_att``,
  ``replace_rel``, ``swap_obj``, ``swap_att``, ``add_obj``, ``add_att``; each
  ``{id: {"filename", "caption", "negative_caption"}}``). An item is right when its positive
  caption scores strictly higher than its negative (as the authors' ``main_eval.py``: a tie
  is wrong); the score of a file is the share of its items that are right, the macro average
  the mean over the files present.
- **Winoground** (Thrush et al., CVPR 2022): ``examples.jsonl``, one example per line with two
  images and two captions (``image_0``, ``image_1``, ``caption_0``, ``caption_1``); with
  ``s(c, i)`` the score of caption ``c`` and image ``i``, the text score counts an example
  when ``s(c0, i0) > s(c1, i0)`` and ``s(c1, i1) > s(c0, i1)``, the image score when
  ``s(c0, i0) > s(c0, i1)`` and ``s(c1, i1) > s(c1, i0)``, the group score when both hold.

Every distinct image and every distinct caption is encoded once per model (SugarCrepe images
are shared by several files); then only the pairs the items need are scored, one image at a
time against its captions (:func:`score_pairs`). Models that take pixels (ESL-CLIP) read the
images; region models read a features folder written by ``eslmatch extract`` over the same
images, whose ``{split}_ids.txt`` names each row by file name without extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import eval_mode
from ..data.files import list_images
from ..data.precomp import check_region_features, open_memmap, read_lines, split_files
from ..data.raw import ImageCaptionSplit, encode_image_files
from ..errors import EslmatchError
from ..evaluate import embed_caption_texts
from ..model import MatchingModel
from ..model.base import takes_pixels
from ..scoring import ScoringOptions
from ..utils import resolve_device
from ..utils.precision import inference_precision, to_float32
from .files import read_json, text_lines

SUGARCREPE_FILES = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
SUGARCREPE_GROUPS = {"replace": SUGARCREPE_FILES[:3], "swap": SUGARCREPE_FILES[3:5], "add": SUGARCREPE_FILES[5:]}
WINOGROUND_FILE = "examples.jsonl"
_SHOW = 3  # missing images named in one error


@dataclass
class CompositionalData:
    """Items of a benchmark over its distinct images and captions.

    Attributes:
        protocol: ``"sugarcrepe"`` or ``"winoground"``.
        source: the folder (or file) read.
        images: distinct image names as the files give them; ``image_refs[u]``: where image
            ``u`` is first named (for errors).
        captions: distinct caption texts.
        pairs: ``(P, 2)`` int64 (image index, caption index): the pairs to score.
        item_pairs: per item, its pairs: SugarCrepe ``(I, 2)`` (positive, negative),
            Winoground ``(I, 4)`` (``s(c0,i0)``, ``s(c1,i0)``, ``s(c0,i1)``, ``s(c1,i1)``).
        item_groups: per item, its SugarCrepe file (Winoground: ``""``).
        item_ids: per item, its id in the file.
    """

    protocol: str
    source: Path
    images: list[str]
    image_refs: list[str]
    captions: list[str]
    pairs: np.ndarray
    item_pairs: np.ndarray
    item_groups: list[str]
    item_ids: list[str]


class _Builder:
    """Collects items, numbering distinct images, captions and pairs in first-seen order."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}
        self.refs: list[str] = []
        self.captions: dict[str, int] = {}
        self.pairs: dict[tuple[int, int], int] = {}
        self.items: list[list[int]] = []
        self.groups: list[str] = []
        self.ids: list[str] = []

    def pair(self, image: str, caption: str, ref: str) -> int:
        if image not in self.images:
            self.images[image] = len(self.images)
            self.refs.append(ref)
        text = " ".join(caption.split())
        c = self.captions.setdefault(text, len(self.captions))
        return self.pairs.setdefault((self.images[image], c), len(self.pairs))

    def build(self, protocol: str, source: Path, width: int) -> CompositionalData:
        if not self.items:
            raise EslmatchError(f"{source}: holds no {protocol} items")
        return CompositionalData(
            protocol,
            source,
            list(self.images),
            self.refs,
            list(self.captions),
            np.array(list(self.pairs), dtype=np.int64).reshape(-1, 2),
            np.array(self.items, dtype=np.int64).reshape(-1, width),
            self.groups,
            self.ids,
        )


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EslmatchError(f"{where}: {key!r} must be a non-empty string")
    return value.strip()


def load_sugarcrepe(folder: str | Path) -> CompositionalData:
    """The SugarCrepe files present in ``folder`` (any subset of :data:`SUGARCREPE_FILES`, ``.json``).

    Raises:
        EslmatchError: no SugarCrepe file, unreadable JSON, or an item without
        ``filename`` / ``caption`` / ``negative_caption`` (naming the file and the item).
    """
    root = Path(folder)
    if not root.is_dir():
        raise EslmatchError(f"{root}: not a folder (--data takes the folder of the SugarCrepe JSON files)")
    present = [name for name in SUGARCREPE_FILES if (root / f"{name}.json").is_file()]
    if not present:
        raise EslmatchError(f"{root}: none of the SugarCrepe files {', '.join(f + '.json' for f in SUGARCREPE_FILES)}")
    b = _Builder()
    for name in present:
        path = root / f"{name}.json"
        data = read_json(path, "SugarCrepe file")
        if not isinstance(data, dict) or not data:
            raise EslmatchError(
                f'{path}: expected a non-empty object {{id: {{"filename", "caption", "negative_caption"}}}}'
            )
        for key, item in data.items():
            where = f"{path}: item {key!r}"
            if not isinstance(item, dict):
                raise EslmatchError(f"{where}: expected an object with filename, caption, negative_caption")
            image = _text(item.get("filename"), where, "filename")
            pos = b.pair(image, _text(item.get("caption"), where, "caption"), where)
            neg = b.pair(image, _text(item.get("negative_caption"), where, "negative_caption"), where)
            b.items.append([pos, neg])
            b.groups.append(name)
            b.ids.append(str(key))
    return b.build("sugarcrepe", root, 2)


def load_winoground(path: str | Path) -> CompositionalData:
    """Winoground's ``examples.jsonl`` (``path`` is the file or its folder).

    Raises:
        EslmatchError: a missing file, a line that is not a JSON object with ``image_0``,
        ``image_1``, ``caption_0``, ``caption_1`` (naming the line).
    """
    p = Path(path)
    if p.is_dir():
        p = p / WINOGROUND_FILE
    if not p.is_file():
        raise EslmatchError(f"{p}: no such Winoground file (--data takes examples.jsonl or its folder)")
    b = _Builder()
    for n, line in enumerate(text_lines(p), start=1):
        if not line:
            continue
        where = f"{p}: line {n}"
        try:
            ex = json.loads(line)
        except ValueError as exc:
            raise EslmatchError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(ex, dict):
            raise EslmatchError(f"{where}: expected a JSON object")
        imgs = [_text(ex.get(f"image_{j}"), where, f"image_{j}") for j in (0, 1)]
        caps = [_text(ex.get(f"caption_{j}"), where, f"caption_{j}") for j in (0, 1)]
        b.items.append([b.pair(imgs[i], caps[c], where) for i in (0, 1) for c in (0, 1)])
        b.groups.append("")
        b.ids.append(str(ex.get("id", n - 1)))
    return b.build("winoground", p, 4)


# ---------------------------------------------------------------------------------------------- images
def _name_keys(name: str) -> list[str]:
    """Names an image may be found under: as given, without extension, bare file name with/without."""
    rel = name.replace("\\", "/").removeprefix("./")
    base = rel.rsplit("/", 1)[-1]
    keys = [rel, base]
    for n in (rel, base):
        if "." in n.rsplit("/", 1)[-1][1:]:
            keys.append(n.rsplit(".", 1)[0])
    return keys


def _missing_error(data: CompositionalData, missing: list[int], where: str) -> EslmatchError:
    u = missing[0]
    more = f" ({len(missing) - 1} more image(s) missing)" if len(missing) > 1 else ""
    return EslmatchError(f"{data.image_refs[u]}: image {data.images[u]!r} {where}{more}")


def image_files(data: CompositionalData, image_root: str | Path) -> list[Path]:
    """The file of every image of ``data`` under ``image_root`` (looked up as :func:`_name_keys`)."""
    root = Path(image_root)
    if not root.is_dir():
        raise EslmatchError(f"{root}: the image folder does not exist")
    entries, _ = list_images(root, recursive=True)
    table: dict[str, Path] = {}
    for e in entries:
        for key in (e.rel, e.id, e.rel.rsplit("/", 1)[-1], e.id.rsplit("/", 1)[-1]):
            table.setdefault(key, e.path)
    found = [next((table[k] for k in _name_keys(name) if k in table), None) for name in data.images]
    missing = [u for u, f in enumerate(found) if f is None]
    if missing:
        raise _missing_error(data, missing, f"is not in {root}")
    return [f for f in found if f is not None]


@dataclass
class FeatureFolder:
    """Region features written by ``eslmatch extract``: ``rows`` ``(N, R, D)`` memory-mapped, one
    id per row (the file name without extension)."""

    folder: Path
    split: str
    ids: list[str]
    rows: np.ndarray


def open_features(folder: str | Path, split: str = "test", img_dim: int | None = None) -> FeatureFolder:
    """``{split}_ims.npy`` and ``{split}_ids.txt`` of an ``eslmatch extract`` output folder."""
    root = Path(folder)
    files = split_files(root, split)
    for key in ("images", "ids"):
        if not files[key].is_file():
            raise EslmatchError(
                f"{root}: no {files[key].name} (a features folder comes from eslmatch extract --images IMAGES "
                f"--out {root} --split {split})"
            )
    rows = check_region_features(open_memmap(files["images"]), files["images"], img_dim)
    ids = read_lines(files["ids"], "ids")
    if len(ids) != rows.shape[0]:
        raise EslmatchError(f"{files['ids']}: {len(ids)} ids for the {rows.shape[0]} rows of {files['images'].name}")
    return FeatureFolder(root, split, ids, rows)


def feature_rows(data: CompositionalData, features: FeatureFolder) -> np.ndarray:
    """The feature row of every image of ``data``: ``(U,)`` int64."""
    table: dict[str, int] = {}
    for r, key in enumerate(features.ids):
        table.setdefault(key, r)
        table.setdefault(key.rsplit("/", 1)[-1], r)
    found = [next((table[k] for k in _name_keys(name) if k in table), -1) for name in data.images]
    missing = [u for u, r in enumerate(found) if r < 0]
    if missing:
        ids_file = split_files(features.folder, features.split)["ids"]
        raise _missing_error(data, missing, f"has no features in {ids_file} (extract features from the same images)")
    return np.array(found, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- scoring
def score_pairs(
    model: MatchingModel,
    img: torch.Tensor,
    img_len: torch.Tensor | None,
    cap: torch.Tensor,
    cap_len: torch.Tensor,
    pairs: np.ndarray,
    options: ScoringOptions | None = None,
) -> np.ndarray:
    """``model.score`` of the listed (image, caption) pairs only, from encoded features.

    Args:
        img: ``(U, ...)`` image features, ``img_len`` their lengths (``None``: pixels models).
        cap: ``(C, ...)`` caption features (``(C, W, Dt)`` zero-padded, or ``(C, Dt)``),
            ``cap_len`` ``(C,)``.
        pairs: ``(P, 2)`` image and caption indices.
    Returns:
        ``(P,)`` float64 scores; each image is scored once against all of its captions.
    """
    out = np.empty(len(pairs), dtype=np.float64)
    order = np.argsort(pairs[:, 0], kind="stable")
    starts = np.flatnonzero(np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]])
    for s0, s1 in zip(starts, [*starts[1:], len(order)]):
        which = order[s0:s1]
        u = int(pairs[which[0], 0])
        cols = torch.as_tensor(pairs[which, 1], device=cap.device)
        feats, lens = cap[cols], cap_len[cols]
        if feats.dim() == 3:
            feats = feats[:, : int(lens.max())]
        lengths = None if img_len is None else img_len[u : u + 1]
        out[which] = model.score(img[u : u + 1], lengths, feats, lens, options)[0].double().cpu().numpy()
    return out


@dataclass
class ImageInputs:
    """Where each image of a benchmark is read: ``paths`` (files, for models that take pixels)
    and/or ``rows`` of ``features`` (region models); ``None`` when not given."""

    paths: list[Path] | None = None
    features: FeatureFolder | None = None
    rows: np.ndarray | None = None


def resolve_inputs(
    data: CompositionalData, image_root: str | Path | None = None, features: FeatureFolder | None = None
) -> ImageInputs:
    """Find every image of ``data`` in what was given (before any model is loaded): a missing
    file or feature row is an error naming the item that needs it."""
    return ImageInputs(
        None if image_root is None else image_files(data, image_root),
        features,
        None if features is None else feature_rows(data, features),
    )


def check_inputs(model: MatchingModel, inputs: ImageInputs, name: str = "the model") -> None:
    """Refuse a model whose kind of input (pixels or region features) was not given."""
    if takes_pixels(model) and inputs.paths is None:
        raise EslmatchError(f"{name} takes images (ESL-CLIP): pass --image-root, the folder of the benchmark's images")
    if not takes_pixels(model) and inputs.rows is None:
        raise EslmatchError(
            f"{name} scores region features: pass --features, a folder written by eslmatch extract over the "
            "benchmark's images"
        )


def _embed_images(
    model: MatchingModel, data: CompositionalData, inputs: ImageInputs, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if takes_pixels(model):
        assert inputs.paths is not None
        split = ImageCaptionSplit(data.protocol, data.source, inputs.paths, list(data.images), [], 1)
        return encode_image_files(model, split, batch_size), None
    assert inputs.rows is not None and inputs.features is not None
    feats = inputs.features.rows
    out = []
    for i0 in range(0, len(inputs.rows), batch_size):
        x = torch.from_numpy(np.asarray(feats[inputs.rows[i0 : i0 + batch_size]], dtype=np.float32)).to(device)
        out.append(model.embed_images(x, None))
    img = torch.cat(out)
    return img, torch.full((img.shape[0],), feats.shape[1], dtype=torch.long, device=device)


def score_compositional(
    model: MatchingModel,
    data: CompositionalData,
    inputs: ImageInputs,
    batch_size: int = 64,
    device: Any = None,
    options: ScoringOptions | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Scores ``(P,)`` of ``data.pairs``: images and captions encoded once (in ``precision``),
    in eval mode; the pairs are scored in the engine's precision.

    Models with a ``preprocess`` (ESL-CLIP) read ``inputs.paths``; region models read
    ``inputs.rows`` of ``inputs.features`` (:func:`resolve_inputs`).
    """
    check_inputs(model, inputs)
    dev = resolve_device(device, model)
    model.to(dev)
    with eval_mode(model):
        with inference_precision(precision, dev):
            img, img_len = to_float32(_embed_images(model, data, inputs, batch_size, dev))
            cap, cap_len = to_float32(
                embed_caption_texts(
                    model, data.captions, batch_size, dev, lambda c: f"{data.source}: caption {data.captions[c]!r}"
                )
            )
        return score_pairs(model, img, img_len, cap, cap_len, data.pairs, options)


# ---------------------------------------------------------------------------------------------- metrics
def sugarcrepe_metrics(data: CompositionalData, scores: np.ndarray) -> dict[str, Any]:
    """Per-file accuracy (fractions), the REPLACE / SWAP / ADD means and the macro average."""
    s = np.asarray(scores, dtype=np.float64)
    right = s[data.item_pairs[:, 0]] > s[data.item_pairs[:, 1]]
    groups = np.array(data.item_groups)
    per_file = {}
    for name in SUGARCREPE_FILES:
        sel = groups == name
        if sel.any():
            per_file[name] = {"accuracy": float(right[sel].mean()), "items": int(sel.sum())}
    families = {
        fam: float(np.mean([per_file[n]["accuracy"] for n in names if n in per_file]))
        for fam, names in SUGARCREPE_GROUPS.items()
        if any(n in per_file for n in names)
    }
    return {
        "categories": per_file,
        "groups": families,
        "macro_average": float(np.mean([v["accuracy"] for v in per_file.values()])),
        "items": int(len(right)),
        "images": len(data.images),
        "captions": len(data.captions),
    }


def winoground_metrics(data: CompositionalData, scores: np.ndarray) -> dict[str, Any]:
    """Text, image and group scores (fractions of the examples)."""
    s = np.asarray(scores, dtype=np.float64)[data.item_pairs]  # (E, 4): s(c0,i0), s(c1,i0), s(c0,i1), s(c1,i1)
    c0i0, c1i0, c0i1, c1i1 = s.T
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    return {
        "text": float(text.mean()),
        "image": float(image.mean()),
        "group": float((text & image).mean()),
        "examples": int(len(s)),
        "images": len(data.images),
        "captions": len(data.captions),
    }


def format_compositional(result: dict[str, Any]) -> str:
    """A readable table of :func:`sugarcrepe_metrics` / :func:`winoground_metrics` (percent)."""
    lines = [f"protocol {result['protocol']} ({result.get('data')})"]
    if result.get("models"):
        lines.append("models: " + ", ".join(str(m) for m in result["models"]))
    if result["protocol"] == "sugarcrepe":
        m = result["sugarcrepe"]
        lines.append(f"{m['items']} items over {m['images']} images and {m['captions']} captions")
        lines.append(f"{'':<14}{'accuracy':>9}{'items':>8}")
        for name, v in m["categories"].items():
            lines.append(f"{name:<14}{100 * v['accuracy']:>9.1f}{v['items']:>8}")
        for fam, v in m["groups"].items():
            lines.append(f"{fam + ' (mean)':<14}{100 * v:>9.1f}")
        lines.append(f"{'macro average':<14}{100 * m['macro_average']:>9.1f}")
    else:
        m = result["winoground"]
        lines.append(f"{m['examples']} examples over {m['images']} images and {m['captions']} captions")
        lines.append(f"text {100 * m['text']:.1f}  image {100 * m['image']:.1f}  group {100 * m['group']:.1f}")
    return "\n".join(lines)
