"""Reading what sources are made of: region grids, lengths, image paths beside features, and
raw-image split files (helpers of :mod:`.sources`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..data.files import caption_lines
from ..errors import EslmatchError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..data.raw import ImageCaptionSplit

    ImageInput = Union[Path, Image.Image, np.ndarray, "torch.Tensor"]  # a photo, pixels or region features

    # real regions per image: an array, a tensor, a list or an .npy file of them
    Lengths = Union[np.ndarray, "torch.Tensor", Sequence[int], str, Path]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXTRACT_META = "extract_meta.json"


def paths_from_dir(images_dir: str | Path, count: int, known: list[str] | None, ids: list[str] | None) -> list[str]:
    """Image paths under ``images_dir`` for ``count`` images: known relative paths joined to the
    folder; else a file named after each id (``ID.jpg``, ...); else the folder's image files,
    sorted by name, which must be exactly ``count``."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise EslmatchError(f"{folder}: no such image folder (--images)")
    if known is not None:
        return [p if Path(p).is_absolute() else str((folder / p).resolve()) for p in known]
    if ids is not None:
        found = []
        for i in ids:
            match = next((folder / f"{i}{s}" for s in IMAGE_SUFFIXES if (folder / f"{i}{s}").is_file()), None)
            if match is None:
                break
            found.append(str(match.resolve()))
        else:
            return found
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) != count:
        raise EslmatchError(
            f"{folder}: {len(files)} image files for {count} indexed images; give image paths "
            f"({{split}}_images.txt) or ids that name the files"
        )
    return [str(p.resolve()) for p in files]


def clean_line(value: object, what: str, i: int) -> str:
    """``value`` as one line of text (``None``: ``""``), or one line naming item ``i``'s line break."""
    s = "" if value is None else str(value)
    if "\n" in s or "\r" in s:
        raise EslmatchError(f"{what} {i} contains a line break: {s!r}")
    return s


def make_ids(given: Sequence[str] | None, found: list[str] | None, n: int) -> tuple[list[str], bool]:
    """Item ids (given, else from the data, else numbers) and whether they were named."""
    if given is not None:
        ids = [clean_line(v, "id", i) for i, v in enumerate(given)]
        if len(ids) != n:
            raise EslmatchError(f"{len(ids)} ids given for {n} items")
    elif found is not None:
        ids = list(found)
    else:
        return [str(i) for i in range(n)], False
    seen: set[str] = set()
    for i, s in enumerate(ids):
        if not s:
            raise EslmatchError(f"id {i} is empty")
        if s in seen:
            raise EslmatchError(f"duplicate id {s!r} among the items (ids must be unique in a gallery; pass ids=)")
        seen.add(s)
    return ids, True


def make_paths(
    given: Sequence[str | None] | None,
    found: list[str] | None,
    n: int,
    images_dir: str | Path | None,
    ids: list[str] | None,
) -> list[str]:
    """Item paths (given, else under ``images_dir``, else from the data, else ``""``)."""
    if given is not None:
        paths = [clean_line(v, "path", i) for i, v in enumerate(given)]
        if len(paths) != n:
            raise EslmatchError(f"{len(paths)} paths given for {n} items")
        return paths
    if images_dir is not None:
        return paths_from_dir(images_dir, n, found, ids)
    return [clean_line(v, "path", i) for i, v in enumerate(found)] if found is not None else [""] * n


def caption_file(path: Path) -> tuple[list[str] | None, list[str], list[int]]:
    """A captions ``.txt`` (:func:`~eslmatch.data.files.caption_lines`): the ids its lines give
    (``ID<TAB>caption``, all or none; ``None``: the captions are numbered) and the captions."""
    lines = caption_lines(path)
    bad = next((n for n, _, text in lines if text is None), None)
    if bad is not None:
        raise EslmatchError(f"{path}: line {bad} is not valid UTF-8")
    named = [n for n, key, _ in lines if key is not None]
    if named and len(named) < len(lines):
        first = next(n for n, key, _ in lines if key is None)
        raise EslmatchError(f"{path}: line {first} names no id (ID<TAB>caption): every line names one, or none does")
    return ([str(k) for _, k, _ in lines] if named else None), [str(t) for _, _, t in lines], [n for n, _, _ in lines]


def resolve_split_paths(paths: list[str] | None, root: Path) -> list[str] | None:
    """Relative image paths of a split, made absolute when they exist under its folder."""
    if paths is None:
        return None
    out = []
    for p in paths:
        cand = Path(p)
        if not cand.is_absolute() and (root / cand).is_file():
            cand = root / cand
        out.append(str(cand.resolve()) if cand.is_absolute() else p)
    return out


def read_extract_meta(folder: str | Path) -> dict[str, Any] | None:
    """``extract_meta.json`` of an ``eslmatch extract`` folder, or ``None`` (absent, unreadable)."""
    try:
        meta = json.loads((Path(folder) / EXTRACT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_grid(folder: Path, regions: int, split: str | None = None) -> tuple[int, int] | None:
    """The region grid ``(h, w)`` recorded by ``eslmatch extract`` in ``extract_meta.json``
    (``splits[split].backbone_info.grid``; box-pooled features have none), or a top-level
    ``grid`` / ``grid_shape`` / ``grid_h`` + ``grid_w``; used only when ``h * w == R``."""
    meta = read_extract_meta(folder)
    if meta is None:
        return None
    candidates: list[Any] = []
    splits = meta.get("splits")
    if isinstance(splits, dict):
        records = [splits.get(split)] if split in splits else list(splits.values())
        for rec in records:
            info = rec.get("backbone_info") if isinstance(rec, dict) else None
            if isinstance(info, dict) and not info.get("boxes_file"):
                candidates.append(info.get("grid"))
    candidates.append(meta.get("grid", meta.get("grid_shape")))
    if "grid_h" in meta and "grid_w" in meta:
        candidates.append((meta["grid_h"], meta["grid_w"]))
    for grid in candidates:
        try:
            h, w = (int(v) for v in grid)
        except (TypeError, ValueError):
            continue
        if h > 0 and w > 0 and h * w == regions:
            return (h, w)
    return None


def check_grid(grid: Sequence[int] | None, regions: int) -> tuple[int, int] | None:
    if grid is None:
        return None
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise EslmatchError(f"grid must be two integers (h, w), got {grid!r}") from None
    if h < 1 or w < 1 or h * w != regions:
        raise EslmatchError(f"grid {h}x{w} does not cover the {regions} regions per image")
    return (h, w)


def check_lengths(lengths: Lengths | None, n: int, r: int) -> np.ndarray | None:
    if lengths is None:
        return None
    if isinstance(lengths, (str, Path)):
        lengths = np.load(lengths, allow_pickle=False)
    arr = np.asarray(lengths.cpu() if hasattr(lengths, "cpu") else lengths).reshape(-1)
    if not np.issubdtype(arr.dtype, np.integer):
        raise EslmatchError(f"image lengths must be integers, got {arr.dtype}")
    if arr.shape[0] != n:
        raise EslmatchError(f"{arr.shape[0]} image lengths given for {n} images")
    bad = np.nonzero((arr < 1) | (arr > r))[0]
    if bad.size:
        raise EslmatchError(f"image {int(bad[0])} has length {int(arr[bad[0]])}, outside 1..{r}")
    return arr.astype(np.int64)


def is_split_file(path: Path) -> bool:
    """A Karpathy-split JSON or a captions TSV (``{split}`` in the name picks a file per split)."""
    return "{split}" in str(path) or (path.is_file() and path.suffix.lower() in (".json", ".tsv"))


def split_file(path: Path, images_dir: str | Path | None, split: str, captions_per_image: int) -> ImageCaptionSplit:
    from ..data.raw import open_image_split

    if images_dir is None:
        raise EslmatchError(f"{path}: a split file needs the folder of its images (images_dir= / --images)")
    if not Path(str(path).replace("{split}", split)).is_file():
        raise EslmatchError(f"{str(path).replace('{split}', split)}: no such split file")
    return open_image_split(path, images_dir, split, captions_per_image)


def is_image_file(query: object) -> bool:
    """Whether a query is a photo: an image file's path or a PIL image (else: a sentence)."""
    return isinstance(query, Path) or type(query).__module__.startswith("PIL")
