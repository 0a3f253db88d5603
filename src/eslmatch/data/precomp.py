"""Opening a split of a "precomp" dataset: memory-mapped region features plus captions.

Layout (spec section 6): a folder holding, per split (``train``, ``dev``, ``test``, ``testall``):

- ``{split}_ims.npy``: region features ``(rows, R, D)``, float (float32 usually, float16 and
  float64 accepted); opened memory-mapped, never read whole (MS-COCO's train file is ~32 GB);
- ``{split}_caps.txt``: one caption per line, UTF-8, captions of one image consecutive;
- ``{split}_ids.txt`` (optional): one id per image row;
- ``{split}_images.txt`` (optional, written by ``eslmatch extract``): one image path per row.

How rows and captions pair up (the "layout"), from the two counts alone:

- ``rows == captions`` and ``rows % 5 == 0``: the *repeated* layout of the SCAN/VSE files,
  each image row stored once per caption; 5 captions per image, every 5th row is kept (a
  strided view of the memory map, nothing is copied);
- otherwise ``captions == k * rows`` for an integer ``k >= 1``: ``k`` captions per image, one
  row per image (``k = 5`` for the usual files; ``rows == captions`` with ``rows % 5 != 0``
  therefore means one caption per image);
- anything else is an error naming both files and both counts.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EslmatchError

SPLITS = ("train", "dev", "test", "testall")
DATA_FOLDERS = ("f30k_precomp", "coco_precomp", "f30k/precomp", "coco/precomp")
REPEATED_CAPTIONS_PER_IMAGE = 5
SAMPLED_CHECK_ROWS = 256
_FULL_CHECK_CHUNK_BYTES = 64 << 20


def split_files(folder: Path, split: str) -> dict[str, Path]:
    """The file names of ``split`` inside a precomp ``folder``."""
    return {
        "images": folder / f"{split}_ims.npy",
        "captions": folder / f"{split}_caps.txt",
        "ids": folder / f"{split}_ids.txt",
        "image_paths": folder / f"{split}_images.txt",
    }


def find_precomp_folder(path: str | Path, split: str, data_name: str | None = None) -> Path:
    """The folder holding ``{split}_ims.npy`` / ``{split}_caps.txt`` for ``path``.

    ``path`` is the precomp folder itself or a parent holding exactly one of
    ``f30k_precomp``, ``coco_precomp``, ``f30k/precomp``, ``coco/precomp``; ``data_name``
    (a folder name such as ``"coco_precomp"`` or ``"coco"``) picks one when several exist.
    """
    root = Path(path)
    if not root.exists():
        raise EslmatchError(f"{root}: no such data folder")
    if not root.is_dir():
        raise EslmatchError(f"{root}: the data path must be a folder")
    files = split_files(root, split)
    if data_name is None and (files["images"].exists() or files["captions"].exists()):
        return root
    if data_name is not None:
        for cand in (root / data_name, root / data_name / "precomp", root / f"{data_name}_precomp"):
            if cand.is_dir() and (
                split_files(cand, split)["images"].exists() or split_files(cand, split)["captions"].exists()
            ):
                return cand
        if (root / data_name).is_dir():
            return root / data_name  # the missing-file check names what it looked for
        raise EslmatchError(
            f"{root}: no data folder {data_name!r} (looked for {data_name}, {data_name}/precomp, {data_name}_precomp)"
        )
    found = [name for name in DATA_FOLDERS if (root / name).is_dir()]
    if len(found) == 1:
        return root / found[0]
    if not found:
        raise EslmatchError(
            f"{root}: no {split}_ims.npy / {split}_caps.txt here and none of the folders {', '.join(DATA_FOLDERS)}"
        )
    raise EslmatchError(
        f"{root} holds several datasets ({', '.join(found)}): choose one with "
        f"data_name= (CLI: --data-name), e.g. {found[0]!r}"
    )


def read_lines(path: Path, what: str) -> list[str]:
    """Stripped UTF-8 lines of ``path``; an undecodable or empty line is an error naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EslmatchError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise EslmatchError(f"{path}: line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if not text:
            raise EslmatchError(f"{path}: line {n} is empty (every line must hold one {what[:-1]})")
        out.append(text)
    return out


def open_memmap(path: Path) -> np.ndarray:
    """Memory-map an ``.npy`` file without unpickling; any failure names the file."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise EslmatchError(f"{path}: not a readable .npy array (truncated or corrupt?): {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise EslmatchError(f"{path}: not a single .npy array")
    return arr


def check_region_features(mm: np.ndarray, path: Path, img_dim: int | None = None) -> np.ndarray:
    """``mm`` after checking it holds region features ``(rows, R, D)``: 3-D, floating point,
    non-empty, of width ``img_dim`` when given (errors name ``path``)."""
    if mm.ndim != 3:
        raise EslmatchError(f"{path}: expected a 3-D array (rows, regions, dim), got shape {mm.shape}")
    if not np.issubdtype(mm.dtype, np.floating):
        raise EslmatchError(f"{path}: region features must be floating point, got {mm.dtype}")
    if mm.shape[1] == 0 or mm.shape[2] == 0:
        raise EslmatchError(f"{path}: empty feature array of shape {mm.shape}")
    if img_dim is not None and mm.shape[2] != img_dim:
        raise EslmatchError(f"{path}: features have width {mm.shape[2]}, the model expects {img_dim}")
    return mm


def detect_layout(n_rows: int, n_captions: int, images_path: Path, captions_path: Path) -> tuple[int, int]:
    """``(row_step, captions_per_image)`` for the two counts (see the module docstring)."""
    if n_rows == 0:
        raise EslmatchError(f"{images_path}: holds no image rows")
    if n_captions == 0:
        raise EslmatchError(f"{captions_path}: holds no captions")
    if n_rows == n_captions and n_rows % REPEATED_CAPTIONS_PER_IMAGE == 0:
        return REPEATED_CAPTIONS_PER_IMAGE, REPEATED_CAPTIONS_PER_IMAGE
    if n_captions % n_rows == 0:
        return 1, n_captions // n_rows
    raise EslmatchError(
        f"{captions_path} has {n_captions} captions but {images_path} has {n_rows} image rows: "
        f"need one row per caption (a multiple of {REPEATED_CAPTIONS_PER_IMAGE}) or "
        f"captions = k x rows"
    )


def _declared_captions_per_image(folder: Path, split: str) -> int | None:
    """Captions per image recorded by ``eslmatch extract`` in ``extract_meta.json``, if any."""
    meta = folder / "extract_meta.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("splits", {}).get(split, {}).get("captions_per_image")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value >= 1 else None


class PrecompSplit:
    """One split of a precomp dataset.

    Attributes:
        name: the split (``"test"``...).
        root: the precomp folder.
        images: memory-mapped ``(N_img, R, D)`` float array, one row per image (a lazy view:
            indexing reads only the rows asked for).
        captions: ``captions_per_image * N_img`` captions; caption ``c`` belongs to image
            ``c // captions_per_image``.
        captions_per_image: captions per image (5 for the standard files).
        row_step: 5 in the repeated layout (every 5th file row kept), else 1.
        ids: one id per image or ``None``.
        image_paths: one source image path per image or ``None``.
    """

    def __init__(
        self,
        name: str,
        root: Path,
        captions: list[str],
        captions_per_image: int,
        row_step: int,
        n_images: int,
        ids: list[str] | None = None,
        image_paths: list[str] | None = None,
        offset: int = 0,
    ) -> None:
        self.name = name
        self.root = Path(root)
        files = split_files(self.root, name)
        self.images_path = files["images"]
        self.captions_path = files["captions"]
        self.captions = captions
        self.captions_per_image = captions_per_image
        self.row_step = row_step
        self._n_images = n_images
        self.ids = ids
        self.image_paths = image_paths
        self.offset = offset  # first kept image of the file (a slice of a split: :meth:`images_between`)
        self._images: np.ndarray | None = None

    # ------------------------------------------------------------------ images, lazily
    @property
    def images(self) -> np.ndarray:
        """``(N_img, R, D)`` memory-mapped view (re-opened after unpickling in a worker)."""
        if self._images is None:
            mm = open_memmap(self.images_path)
            self._images = mm[:: self.row_step][self.offset : self.offset + self._n_images]
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap view would copy the data; DataLoader workers re-open the file.
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def n_images(self) -> int:
        return self._n_images

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.images.shape[2])

    @property
    def layout(self) -> str:
        """``"repeated"`` (one file row per caption) or ``"per-image"``."""
        return "repeated" if self.row_step > 1 else "per-image"

    def image_of_caption(self, c: int) -> int:
        """Index of the image caption ``c`` describes."""
        return c // self.captions_per_image

    def captions_of_image(self, i: int) -> range:
        """Caption indices of image ``i``."""
        k = self.captions_per_image
        return range(i * k, (i + 1) * k)

    def read_images(self, index: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of :attr:`images` as a new float32 array ``(n, R, D)`` (reads only those rows)."""
        return np.array(self.images[index], dtype=np.float32)

    def head(self, n_images: int) -> PrecompSplit:
        """The first ``n_images`` images and their captions (a view; e.g. the 1K dev subset)."""
        return self.images_between(0, max(1, min(int(n_images), self.n_images)))

    def images_between(self, start: int, stop: int) -> PrecompSplit:
        """Images ``start .. stop - 1`` and their captions (a view; e.g. a held-out slice)."""
        if not 0 <= start < stop <= self.n_images:
            raise EslmatchError(f"images {start}..{stop} do not lie within the {self.n_images} images of {self.name}")
        k = self.captions_per_image
        sub = PrecompSplit(
            self.name,
            self.root,
            self.captions[start * k : stop * k],
            k,
            self.row_step,
            stop - start,
            None if self.ids is None else self.ids[start:stop],
            None if self.image_paths is None else self.image_paths[start:stop],
            self.offset + start,
        )
        if self._images is not None:
            sub._images = self._images[start:stop]
        return sub

    def check_finite(self, full: bool = False) -> None:
        """Refuse NaN/inf features, naming the first bad image row.

        The default samples up to 256 rows spread evenly (first and last included), reading
        about ``256 * R * D * itemsize`` bytes (~75 MB for BUTD float32 features). ``full``
        scans every kept row in chunks of ~64 MB: one pass over the file (a fifth of it in
        the repeated layout).
        """
        images = self.images
        n = self.n_images
        row_bytes = max(1, int(np.prod(images.shape[1:])) * images.dtype.itemsize)
        if full:
            step = max(1, _FULL_CHECK_CHUNK_BYTES // row_bytes)
            chunks: list[np.ndarray] = [np.arange(i, min(i + step, n)) for i in range(0, n, step)]
        else:
            chunks = [np.unique(np.linspace(0, n - 1, min(n, SAMPLED_CHECK_ROWS)).round().astype(np.int64))]
        for rows in chunks:
            block = images[int(rows[0]) : int(rows[-1]) + 1] if full else images[rows]
            bad = ~np.isfinite(np.asarray(block)).reshape(len(rows), -1).all(axis=1)
            if bad.any():
                image = int(rows[int(np.argmax(bad))])
                raise EslmatchError(
                    f"{self.images_path}: image {image} (file row {image * self.row_step}) holds "
                    f"non-finite values (NaN or inf)"
                )

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape)
        return (
            f"PrecompSplit({self.name!r}, root={str(self.root)!r}, images={shape} {self.images.dtype}, "
            f"captions={self.n_captions}, layout={self.layout})"
        )


def _per_image(values: list[str], path: Path, n_rows: int, step: int, n_images: int, k: int) -> list[str]:
    """One entry per image from a file with one line per row, per image or per caption."""
    if len(values) == n_rows:
        return values[::step][:n_images]
    if len(values) == n_images:
        return values
    if len(values) == n_images * k:
        return values[::k]
    raise EslmatchError(
        f"{path} has {len(values)} lines; expected {n_images} (one per image) or {n_rows} (one per image row)"
    )


def open_split(
    path: str | Path,
    split: str,
    img_dim: int | None = None,
    data_name: str | None = None,
    full_check: bool = False,
    captions: bool = True,
) -> PrecompSplit:
    """Open ``split`` of a precomp dataset, checking it (every failure names the file).

    Args:
        path: a precomp folder or a parent holding ``f30k_precomp``, ``coco_precomp``,
            ``f30k/precomp`` or ``coco/precomp``.
        split: ``"train"``, ``"dev"``, ``"test"``, ``"testall"`` (any name with files).
        img_dim: expected feature width ``D`` (the model's ``img_dim``), checked if given.
        data_name: which dataset folder under ``path`` when it holds several.
        full_check: scan every image row for NaN/inf (one pass over the file) instead of
            a sample of 256 rows.
        captions: whether the split must have captions; ``False`` also opens a features-only
            folder (``eslmatch extract`` without a captions file: one row per image, no
            ``{split}_caps.txt``) with no captions, as a gallery's source of images.
    Returns:
        a :class:`PrecompSplit` with memory-mapped images ``(N_img, R, D)``.
    """
    if not split or os.sep in split or "/" in split:
        raise EslmatchError(f"invalid split name {split!r}")
    folder = find_precomp_folder(path, split, data_name)
    files = split_files(folder, split)
    features_only = not captions and files["images"].is_file() and not files["captions"].is_file()
    needed = ("images",) if features_only else ("images", "captions")
    missing = [p.name for key, p in files.items() if key in needed and not p.is_file()]
    if missing:
        raise EslmatchError(
            f"{folder}: missing {' and '.join(missing)} (split {split!r} needs "
            f"{files['images'].name} and {files['captions'].name})"
        )
    mm = check_region_features(open_memmap(files["images"]), files["images"], img_dim)
    texts = [] if features_only else read_lines(files["captions"], "captions")
    n_rows = int(mm.shape[0])
    declared = _declared_captions_per_image(files["images"].parent, split)
    if features_only:
        step, k = 1, 0  # one row per image, no captions
    elif declared and len(texts) == declared * n_rows:
        step, k = 1, declared  # written by `eslmatch extract`: one row per image, no guessing
    else:
        step, k = detect_layout(n_rows, len(texts), files["images"], files["captions"])
    n_images = n_rows if features_only else len(texts) // k
    ids = image_paths = None
    if files["ids"].is_file():
        ids = _per_image(read_lines(files["ids"], "ids"), files["ids"], n_rows, step, n_images, k)
    if files["image_paths"].is_file():
        image_paths = _per_image(
            read_lines(files["image_paths"], "image paths"), files["image_paths"], n_rows, step, n_images, k
        )
    result = PrecompSplit(split, folder, texts, k, step, n_images, ids, image_paths)
    result._images = mm[::step][:n_images]
    result.check_finite(full=full_check)
    return result
