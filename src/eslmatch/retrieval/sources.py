"""What an index is built from: region features, photos (models that take pixels) or
captions, with ids, paths and a grid."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import open_split
from ..data.files import SkipImage, list_images, open_image
from ..data.precomp import read_lines
from ..data.raw import ImageCaptionSplit, open_image_split
from ..errors import EslmatchError
from .store import open_array

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXTRACT_META = "extract_meta.json"


@dataclass
class ImageSource:
    """Region features to index.

    Attributes:
        count: images ``N``.
        regions: ``R`` (positions per image, padded).
        read: rows ``[i0, i1)`` as float32 ``(i1 - i0, R, D)``.
        lengths: ``(N,)`` real regions per image or ``None`` (all ``R``).
        ids, paths: per image, or ``None``.
        grid: ``(h, w)`` of the regions when they form a grid, else ``None``.
        description: where the features came from (for the manifest).
    """

    count: int
    regions: int
    dim: int
    read: Callable[[int, int], np.ndarray]
    lengths: np.ndarray | None
    ids: list[str] | None
    paths: list[str] | None
    grid: tuple[int, int] | None
    description: dict[str, Any]


@dataclass
class CaptionSource:
    """Captions to index (with the image path of each caption's image when known)."""

    captions: list[str]
    ids: list[str] | None
    paths: list[str] | None
    description: dict[str, Any]


def _is_split(obj: Any) -> bool:
    return hasattr(obj, "captions") and hasattr(obj, "images") and hasattr(obj, "image_of_caption")


def _open_split(path: Path, split: str, img_dim: int | None) -> Any:
    return open_split(path, split, img_dim=img_dim)


def read_grid(folder: Path, regions: int, split: str | None = None) -> tuple[int, int] | None:
    """The region grid ``(h, w)`` recorded by ``eslmatch extract`` in ``extract_meta.json``.

    Looks at ``splits[split].backbone_info.grid`` (what ``eslmatch extract`` writes; box-pooled
    features, which name a ``boxes_file``, have no grid), then at a top-level ``grid`` /
    ``grid_shape`` / ``grid_h`` + ``grid_w``. A grid is used only when ``h * w == R``.
    """
    path = folder / EXTRACT_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
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


def _resolve_split_paths(paths: list[str] | None, root: Path) -> list[str] | None:
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


def paths_from_dir(images_dir: str | Path, count: int, known: list[str] | None, ids: list[str] | None) -> list[str]:
    """Image paths under ``images_dir`` for ``count`` images.

    Known relative paths are joined to the folder; else an image file named after each id
    (``ID.jpg``, ``ID.png``...) is looked for; else the folder's image files, sorted by
    name, must be exactly ``count``.
    """
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


def image_source(
    features: Any,
    *,
    img_dim: int,
    split: str = "test",
    lengths: Any = None,
    grid: Sequence[int] | None = None,
) -> ImageSource:
    """Region features from a precomp split (folder or :class:`PrecompSplit`), an ``.npy``
    file ``(N, R, D)``, an array / tensor ``(N, R, D)``, or an :class:`ImageSource` (e.g.
    features produced chunk by chunk)."""
    if isinstance(features, ImageSource):
        if features.dim != img_dim:
            raise EslmatchError(f"region features have width {features.dim}, the model expects {img_dim}")
        return features
    if isinstance(features, (str, Path)):
        path = Path(features)
        if path.is_dir():
            features = _open_split(path, split, img_dim)
        elif path.suffix == ".npy" and path.is_file():
            src = _array_source(open_array(path), img_dim, lengths, grid, {"features": str(path.resolve())})
            if src.grid is None:
                src.grid = read_grid(path.parent, src.regions)
            return src
        elif not path.exists():
            raise EslmatchError(f"{path}: no such features folder or .npy file")
        else:
            raise EslmatchError(f"{path}: features must be a precomp dataset folder or an .npy (N, R, D) array")
    if _is_split(features):
        s = features
        if s.img_dim != img_dim:
            raise EslmatchError(f"{s.images_path}: features have width {s.img_dim}, the model expects {img_dim}")
        ids = list(s.ids) if s.ids is not None else None
        paths = _resolve_split_paths(s.image_paths, Path(s.root))
        desc = {"features": str(Path(s.root).resolve()), "split": s.name}
        found = check_grid(grid, s.n_regions) if grid is not None else read_grid(Path(s.root), s.n_regions, s.name)
        return ImageSource(
            s.n_images,
            s.n_regions,
            s.img_dim,
            lambda i0, i1: s.read_images(slice(i0, i1)),
            _lengths(lengths, s.n_images, s.n_regions),
            ids,
            paths,
            found,
            desc,
        )
    return _array_source(features, img_dim, lengths, grid, {"features": "array"})


@dataclass
class PhotoSource:
    """Image files to index with a model that takes pixels (``model.preprocess``).

    The files are opened and preprocessed while they are encoded (:func:`load_pixels`): one
    that cannot be read is skipped then and named, never fatal.

    Attributes:
        files: absolute paths of the candidate files, in order.
        ids: one per file (its path relative to the folder without extension, or the
            split's image id).
        names: how each file is named in messages and the manifest (relative to the folder,
            or the absolute path for a split).
        refused: ``(name, reason)`` of files left out before reading (an image a split names
            that is missing, a second file with the same id).
        description: where the files came from (for the manifest).
    """

    files: list[Path]
    ids: list[str]
    names: list[str]
    refused: list[tuple[str, str]]
    description: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.files)


def is_split_file(path: Path) -> bool:
    """A Karpathy-split JSON or a captions TSV (``{split}`` in the name picks a file per split)."""
    return "{split}" in str(path) or (path.is_file() and path.suffix.lower() in (".json", ".tsv"))


def _split_file(path: Path, images_dir: str | Path | None, split: str, captions_per_image: int) -> ImageCaptionSplit:
    if images_dir is None:
        raise EslmatchError(f"{path}: a split file needs the folder of its images (images_dir= / --images)")
    if not Path(str(path).replace("{split}", split)).is_file():
        raise EslmatchError(f"{str(path).replace('{split}', split)}: no such split file")
    return open_image_split(path, images_dir, split, captions_per_image)


def photo_source(
    source: Any,
    *,
    images_dir: str | Path | None = None,
    split: str = "test",
    recursive: bool = True,
    captions_per_image: int = 5,
) -> PhotoSource:
    """The images to index for a model that takes pixels.

    ``source``: a folder of photos (every regular file in it, recursively, in sorted
    relative-path order; ids are relative paths without extension), a Karpathy-split JSON or
    an ``image<TAB>caption`` TSV (``split`` of it, images under ``images_dir``), an
    :class:`~eslmatch.data.raw.ImageCaptionSplit`, or a :class:`PhotoSource`.
    """
    if isinstance(source, PhotoSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _folder_photos(path, recursive)
        if is_split_file(path):
            source = _split_file(path, images_dir, split, captions_per_image)
        elif not path.exists():
            raise EslmatchError(f"{path}: no such folder of photos or split file")
        else:
            raise EslmatchError(
                f"{path}: this model takes images: give a folder of photos, or a Karpathy-split .json / "
                "captions .tsv with the folder of its images"
            )
    if isinstance(source, ImageCaptionSplit):
        files = [Path(p) for p in source.image_paths]
        desc = {"split_file": str(Path(source.source).resolve()), "split": source.name}
        refused = [(m, "missing: the split names it, the image folder lacks it") for m in source.missing]
        return PhotoSource(files, list(source.ids), [str(p) for p in files], refused, desc)
    raise EslmatchError(
        f"this model takes images: give a folder of photos or a split file, not {type(source).__name__}"
    )


def _folder_photos(root: Path, recursive: bool) -> PhotoSource:
    entries, refused = list_images(root, recursive=recursive)
    if not entries:
        raise EslmatchError(f"{root}: no file to index in the folder")
    desc = {"images": str(root.resolve())}
    return PhotoSource([e.path for e in entries], [e.id for e in entries], [e.rel for e in entries], refused, desc)


def load_pixels(
    src: PhotoSource, i0: int, i1: int, preprocess: Callable[[Any], Any]
) -> tuple[list[Any], list[int], list[tuple[str, str]]]:
    """Preprocessed pixels of files ``[i0, i1)`` of ``src``: ``(pixels, kept rows, skipped)``,
    ``skipped`` being ``(name, reason)`` of the files that could not be read."""
    pixels, kept, skipped = [], [], []
    for i in range(i0, i1):
        try:
            image = open_image(src.files[i])
        except SkipImage as exc:
            skipped.append((src.names[i], str(exc)))
            continue
        try:
            pixels.append(preprocess(image))
        except (OSError, ValueError, RuntimeError) as exc:  # PIL's lazy decoding, odd sizes
            skipped.append((src.names[i], f"cannot preprocess ({type(exc).__name__}: {exc})"))
            continue
        kept.append(i)
    return pixels, kept, skipped


def _array_source(
    arr: Any, img_dim: int, lengths: Any, grid: Sequence[int] | None, desc: dict[str, Any]
) -> ImageSource:
    try:
        import torch

        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(arr, np.ndarray) or arr.ndim != 3:
        shape = getattr(arr, "shape", type(arr).__name__)
        raise EslmatchError(f"region features must be an array (N, R, {img_dim}), got {shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise EslmatchError(f"region features must be floating point, got {arr.dtype}")
    n, r, d = arr.shape
    if n == 0 or r == 0:
        raise EslmatchError(f"region features are empty: shape {arr.shape}")
    if d != img_dim:
        raise EslmatchError(f"region features have width {d}, the model expects {img_dim}")
    return ImageSource(
        n,
        r,
        d,
        lambda i0, i1: np.array(arr[i0:i1], dtype=np.float32),
        _lengths(lengths, n, r),
        None,
        None,
        check_grid(grid, r),
        desc,
    )


def _lengths(lengths: Any, n: int, r: int) -> np.ndarray | None:
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


def caption_source(
    captions: Any, *, split: str = "test", images_dir: str | Path | None = None, captions_per_image: int = 5
) -> CaptionSource:
    """Captions from a list of strings, a ``.txt`` file (one per line), a precomp split
    (folder or :class:`PrecompSplit`: ids ``IMAGEID#j`` when the split has image ids), or a
    raw-image split: a Karpathy-split ``.json`` / captions ``.tsv`` with ``images_dir`` the
    folder of its images, or an :class:`~eslmatch.data.raw.ImageCaptionSplit` (ids
    ``IMAGEID#j``, paths the image files)."""
    if isinstance(captions, (str, Path)):
        path = Path(captions)
        if path.is_dir():
            captions = _open_split(path, split, None)
        elif is_split_file(path):
            captions = _split_file(path, images_dir, split, captions_per_image)
        elif path.is_file() and path.suffix == ".txt":
            return CaptionSource(read_lines(path, "captions"), None, None, {"features": str(path.resolve())})
        elif not path.exists():
            raise EslmatchError(f"{path}: no such dataset folder, split file or captions .txt file")
        else:
            raise EslmatchError(
                f"{path}: captions must come from a precomp dataset folder, a .txt file (one caption a line), "
                "or a Karpathy-split .json / captions .tsv"
            )
    if isinstance(captions, ImageCaptionSplit):
        r = captions
        k = r.captions_per_image
        ids: list[str] | None = [f"{r.ids[c // k]}#{c % k}" for c in range(r.n_captions)]
        paths: list[str] | None = [str(r.image_paths[c // k]) for c in range(r.n_captions)]
        desc = {"split_file": str(Path(r.source).resolve()), "split": r.name}
        return CaptionSource(list(r.captions), ids, paths, desc)
    if _is_split(captions):
        s = captions
        k = s.captions_per_image
        ids = [f"{s.ids[c // k]}#{c % k}" for c in range(s.n_captions)] if s.ids is not None else None
        img_paths = _resolve_split_paths(s.image_paths, Path(s.root))
        paths = [img_paths[c // k] for c in range(s.n_captions)] if img_paths is not None else None
        return CaptionSource(list(s.captions), ids, paths, {"features": str(Path(s.root).resolve()), "split": s.name})
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise EslmatchError(
            f"captions must be a list of strings, a .txt file or a dataset split, got {type(captions).__name__}"
        )
    out = []
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise EslmatchError(f"caption {i} is empty or not a string")
        out.append(" ".join(c.split()))
    if not out:
        raise EslmatchError("no captions to index")
    return CaptionSource(out, None, None, {"features": "list"})
