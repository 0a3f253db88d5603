"""The on-disk gallery index: file names, manifest, checksums, model fingerprints.

An index is a directory (see ``docs/retrieval.md``)::

    manifest.json   format, version, stages, kind, model path + fingerprint, shapes, dtype,
                    faiss settings, grid, and the size + sha256 of every file below
    side.npy        engine-ready tensors: image side (N, R, Dt) or caption features (M, W, Dt)
                    (two-stage indexes only)
    lengths.npy     (N,) int64 real regions / words of each item (two-stage indexes only)
    global.npy      (N, Dt) float32 index vectors: the first stage of a two-stage index, the
                    whole content of a one-stage index
    faiss.index     the FAISS index over global.npy
    ids.txt         one id per line
    paths.txt       one image path per line (empty lines when unknown)
    captions.txt    the caption texts (caption index only)

Two-stage indexes (ESL: shortlist, then re-rank with the stored sides) are format version 1.
One-stage indexes (models whose score IS the inner product of their index vectors:
``exact_index``) are version 2 with ``"stages": 1`` and hold no side or lengths; a version 1
manifest whose model record says ``"stages": 1`` (written by eslmatch before version 2)
is a one-stage index that still carries a side of one vector per item.

It is always written into a temporary directory beside the target and renamed into place,
so readers never see a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EslmatchError
from .ann import FAISS_KINDS

FORMAT = "eslmatch-gallery-index"
VERSION = 1  # two-stage indexes (and every index written before one-stage ones had their own layout)
ONE_STAGE_VERSION = 2  # one-stage indexes: vectors only
SUPPORTED_VERSIONS = (1, 2)
KINDS = ("image", "caption")
DTYPES = ("float32", "float16")

MANIFEST = "manifest.json"
SIDE = "side.npy"
LENGTHS = "lengths.npy"
GLOBAL = "global.npy"
FAISS = "faiss.index"
IDS = "ids.txt"
PATHS = "paths.txt"
CAPTIONS = "captions.txt"
ARRAY_FILES = (SIDE, LENGTHS, GLOBAL)


def data_files(kind: str, side: bool = True) -> tuple[str, ...]:
    """Every file of an index of ``kind`` except the manifest (``side=False``: a one-stage
    index, which stores no side and no lengths)."""
    files = (*(ARRAY_FILES if side else (GLOBAL,)), FAISS, IDS, PATHS)
    return (*files, CAPTIONS) if kind == "caption" else files


def manifest_stages(manifest: dict[str, Any]) -> int:
    """1 (one-stage, exact) or 2 (shortlist + re-rank) for a checked manifest."""
    if manifest.get("version") == VERSION:
        model = manifest.get("model")
        return 1 if isinstance(model, dict) and model.get("stages") == 1 else 2
    return int(manifest["stages"])


def manifest_has_side(manifest: dict[str, Any]) -> bool:
    """Whether the index stores ``side.npy`` and ``lengths.npy`` (every version 1 index does)."""
    return manifest.get("version") == VERSION or manifest_stages(manifest) == 2


class GalleryIndexError(EslmatchError):
    """A gallery index that is damaged, of an unknown version, or built by another model."""


# ---------------------------------------------------------------------- checksums
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_records(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of files in ``directory``."""
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names}


def check_files(directory: Path, manifest: dict[str, Any], verify: bool) -> None:
    """Every listed file exists with its recorded size (and sha256 when ``verify``)."""
    records = manifest.get("files")
    if not isinstance(records, dict):
        raise GalleryIndexError(f"{directory / MANIFEST}: no 'files' table")
    for name in data_files(manifest["kind"], manifest_has_side(manifest)):
        path = directory / name
        rec = records.get(name)
        if not isinstance(rec, dict) or "bytes" not in rec or "sha256" not in rec:
            raise GalleryIndexError(f"{directory / MANIFEST}: no size/checksum recorded for {name}")
        if not path.is_file():
            raise GalleryIndexError(f"{path}: missing file of the index (rebuild it with 'eslmatch index build')")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise GalleryIndexError(
                f"{path}: {size} bytes, the manifest records {rec['bytes']} (truncated or modified)"
            )
        if verify and sha256_file(path) != rec["sha256"]:
            raise GalleryIndexError(f"{path}: sha256 differs from the manifest (the file was modified or corrupted)")


# ---------------------------------------------------------------------- model fingerprint
_SAMPLES_PER_TENSOR = 1024
_IGNORED_CONFIG_KEYS = ("extra", "text_model")


def model_fingerprint(model: Any) -> str:
    """A content fingerprint of a model: its configuration and a sample of every weight.

    The configuration (without free-form ``extra`` and the text model's *location*), the
    name, shape and dtype of every tensor of the state dict and up to 1,024 evenly spaced
    values of each (all values of small tensors) are hashed. It is the same for a model
    saved and reloaded, moved or copied, and differs for another training run or any
    changed layer. Costs a few milliseconds even for BERT-base.
    """
    import torch

    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    tokens = getattr(getattr(model, "tokenizer", None), "tokens", None)
    if isinstance(tokens, list):  # a WordVocab is part of a GRU model
        h.update(json.dumps(tokens).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue  # training bookkeeping, no effect on scores
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() > _SAMPLES_PER_TENSOR:
                idx = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR, device=flat.device).long()
                flat = flat[idx]
            h.update(flat.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- text files
def write_lines(path: Path, items: Sequence[str]) -> None:
    path.write_text("".join(f"{s}\n" for s in items), encoding="utf-8")


def read_lines(path: Path, count: int) -> list[str]:
    """Exactly ``count`` lines of ``path`` (empty lines kept)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryIndexError(f"{path}: unreadable ({exc})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise GalleryIndexError(f"{path}: {len(lines)} lines, the index holds {count} items")
    return lines


def clean_line(value: Any, what: str, i: int) -> str:
    s = "" if value is None else str(value)
    if "\n" in s or "\r" in s:
        raise EslmatchError(f"{what} {i} contains a line break: {s!r}")
    return s


# ---------------------------------------------------------------------- manifest
def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and check the manifest's format, version and kind."""
    if not directory.exists():
        raise GalleryIndexError(f"{directory}: no such index directory")
    if not directory.is_dir():
        raise GalleryIndexError(f"{directory}: an index is a directory (built by 'eslmatch index build')")
    path = directory / MANIFEST
    if not path.is_file():
        raise GalleryIndexError(f"{path}: missing (not an eslmatch gallery index, or a damaged one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GalleryIndexError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GalleryIndexError(f"{path}: not an eslmatch gallery index manifest (format != {FORMAT!r})")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise GalleryIndexError(
            f"{path}: index format version {version!r} is not supported by this eslmatch "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); rebuild the index"
        )
    stages = manifest.get("stages")
    if version == ONE_STAGE_VERSION and (isinstance(stages, bool) or stages not in (1, 2)):
        raise GalleryIndexError(f"{path}: 'stages' must be 1 or 2, got {stages!r}")
    if manifest.get("kind") not in KINDS:
        raise GalleryIndexError(f"{path}: kind {manifest.get('kind')!r} is not one of {', '.join(KINDS)}")
    for key, typ in (
        ("count", int),
        ("total_dim", int),
        ("width", int),
        ("dtype", str),
        ("model", dict),
        ("faiss", dict),
    ):
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise GalleryIndexError(f"{path}: missing or invalid {key!r}")
    if manifest["dtype"] not in DTYPES:
        raise GalleryIndexError(f"{path}: dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    if manifest["count"] < 1 or manifest["total_dim"] < 1 or manifest["width"] < 1:
        raise GalleryIndexError(f"{path}: count, total_dim and width must be positive")
    if manifest["faiss"].get("kind") not in FAISS_KINDS:
        raise GalleryIndexError(
            f"{path}: faiss kind {manifest['faiss'].get('kind')!r} is not one of {', '.join(FAISS_KINDS)}"
        )
    grid = manifest.get("grid")
    if grid is not None and not (
        isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
    ):
        raise GalleryIndexError(f"{path}: grid must be null or [h, w], got {grid!r}")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def open_array(path: Path) -> np.ndarray:
    """Memory-map an ``.npy`` file (no pickles); failures name the file."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GalleryIndexError(f"{path}: not a readable .npy array ({exc})") from exc
    return arr


# ---------------------------------------------------------------------- atomic directories
def check_target(out: Path) -> None:
    """Refuse to replace anything but an existing index (or an empty directory)."""
    if out.is_file():
        raise EslmatchError(f"{out}: a file is in the way (an index is a directory)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise EslmatchError(f"{out}: a non-empty directory that is not an index; choose another --out")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
