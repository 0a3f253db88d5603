"""Image files and caption files: listing a folder, opening an image, reading captions.

Shared by feature extraction (``eslmatch extract``) and the raw-image datasets
(:mod:`eslmatch.data.raw`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError

_FLICKR_SUFFIX = re.compile(r"^(.*)#\d+$")


class SkipImage(Exception):
    """An image that cannot be used (the reason is recorded, extraction goes on)."""


@dataclass(frozen=True)
class ImageEntry:
    """One candidate file: absolute ``path``, ``rel`` (path relative to the folder, ``/``
    separated) and ``id`` (``rel`` without its extension)."""

    path: Path
    rel: str
    id: str


@dataclass
class CaptionTable:
    """Parsed captions file: captions per image id, and the lines that were refused."""

    by_id: dict[str, list[str]] = field(default_factory=dict)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    n_lines: int = 0


def listing_digest(entries: Sequence[ImageEntry]) -> str:
    """A sha256 of a listing: each file's relative path, size and modification time (what
    identifies the files of an interrupted run when it resumes)."""
    h = hashlib.sha256()
    for e in entries:
        st = e.path.stat()
        h.update(f"{e.rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def id_of(rel: str) -> str:
    """A file's id: its relative path without the extension (``trips/a.jpg`` -> ``trips/a``)."""
    name = rel.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return rel[: len(rel) - len(name)] + stem


class FileEntry(NamedTuple):
    """One candidate file as :func:`list_files` finds it: ``rel`` (``/`` separated), the
    absolute ``path`` (text), ``id`` (``rel`` without its extension), ``size`` and ``mtime_ns``."""

    rel: str
    path: str
    id: str
    size: int
    mtime_ns: int


def list_images(
    images_dir: Path, recursive: bool = True, exclude: Sequence[Path] = ()
) -> tuple[list[ImageEntry], list[tuple[str, str]]]:
    """Candidate files of ``images_dir`` sorted by relative path (hidden files ignored).

    Every regular file is a candidate (whether it is an image is found out when it is
    opened). Sub-folders are read too (the one rule of every command: extract, index build,
    embed, index sync); with ``recursive=False`` each sub-folder is named among the refused
    entries instead of being passed over silently. Returns the entries and ``(rel, reason)``
    for what is refused up front (a second file with the same id, a name holding a line
    break, a sub-folder left unread).
    """
    files, refused = list_files(images_dir, recursive, exclude)
    return [ImageEntry(Path(f.path), f.rel, f.id) for f in files], refused


def list_files(
    images_dir: Path, recursive: bool = True, exclude: Sequence[Path] = ()
) -> tuple[list[FileEntry], list[tuple[str, str]]]:
    """:func:`list_images` with each file's size and mtime, in plain text: one ``stat`` per
    file and no path objects (100,000 files listed in about a second)."""
    images_dir = Path(images_dir)
    excluded = {p.resolve() for p in exclude}
    found: list[tuple[str, str, os.stat_result]] = []
    unread: list[tuple[str, str]] = []
    if recursive:
        walker: Any = os.walk(images_dir)
    else:
        names = os.listdir(images_dir)
        subs = [n for n in names if (images_dir / n).is_dir() and not n.startswith(".")]
        unread = [(f"{n}/", "a sub-folder, not read (recursion is off)") for n in sorted(subs)]
        unread = [u for u in unread if (images_dir / u[0]).resolve() not in excluded]
        walker = [(str(images_dir), [], names)]
    base = str(images_dir.resolve()).rstrip("/")
    for root, dirs, names in walker:
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(root, d).resolve() not in excluded)
        top = os.path.relpath(root, images_dir)
        prefix = "" if top == "." else top.replace(os.sep, "/") + "/"
        for name in names:
            full = f"{root}/{name}"
            if name.startswith(".") or (excluded and Path(full).resolve() in excluded):
                continue
            try:
                st = os.stat(full)
            except OSError:  # a broken link, or removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((prefix + name, f"{base}/{prefix}{name}", st))
    found.sort(key=lambda t: t[0])
    entries: list[FileEntry] = []
    refused: list[tuple[str, str]] = unread
    seen: dict[str, str] = {}
    for rel, path, st in found:
        if "\n" in rel or "\r" in rel:
            refused.append((rel, "its name holds a line break"))
            continue
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:  # ids and paths go into UTF-8 files (manifests, ids.txt)
            refused.append((os.fsencode(rel).decode("utf-8", "backslashreplace"), "its name is not valid UTF-8"))
            continue
        image_id = id_of(rel)
        if image_id in seen:
            refused.append((rel, f"same id {image_id!r} as {seen[image_id]}"))
            continue
        seen[image_id] = rel
        entries.append(FileEntry(rel, path, image_id, st.st_size, st.st_mtime_ns))
    return entries, refused


def open_image(path: Path) -> Any:
    """The image at ``path`` as 8-bit RGB PIL image (EXIF orientation applied).

    Raises:
        SkipImage: not an image, truncated, corrupt or too large, with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:
        raise SkipImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise SkipImage(f"too large ({exc})") from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise SkipImage(f"unreadable image ({type(exc).__name__}: {str(exc).strip() or 'corrupt data'})") from None


def to_rgb(image: Any) -> Any:
    """A PIL image as 8-bit RGB: grayscale/palette/CMYK converted, alpha composited on white,
    16-bit and float images rescaled, the EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is no reason to drop the pixels
        pass
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255.0:
            arr = arr * (255.0 / (65535.0 if top <= 65535.0 else top))
        image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def caption_lookup(entries: Sequence[ImageEntry]) -> dict[str, str]:
    """Names a captions file may use for each image -> image id: the relative path with
    or without extension, and the bare file name with or without extension."""
    table: dict[str, str] = {}
    for e in entries:
        name = e.rel.rsplit("/", 1)[-1]
        for key in (e.rel, e.id):
            table.setdefault(key, e.id)
        for key in (name, e.id.rsplit("/", 1)[-1]):
            table.setdefault(key, e.id)
    return table


def caption_lines(path: str | Path) -> list[tuple[int, str | None, str | None]]:
    """The one reading of a captions file (extract, index build / add, embed): UTF-8 (a BOM
    allowed), lines split on ``\\n`` / ``\\r``, blank lines left out; ``KEY<TAB>caption`` names
    the caption's image or id (``KEY`` stripped), a line without a tab has ``None``; the
    caption's whitespace is collapsed. Returns ``(line number from 1, key, caption)``; a line
    that is not UTF-8 has caption ``None`` (the caller refuses or reports it)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read captions file ({exc.strerror or exc})") from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out: list[tuple[int, str | None, str | None]] = []
    for n, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            out.append((n, None, None))
            continue
        if not text.strip():
            continue
        key, tab, caption = text.partition("\t")
        out.append((n, key.strip(), " ".join(caption.split())) if tab else (n, None, " ".join(text.split())))
    return out


def parse_captions(path: str | Path, lookup: Mapping[str, str]) -> CaptionTable:
    """Read ``image_name<TAB>caption`` lines (:func:`caption_lines`); several lines per image
    are allowed.

    ``image_name`` is looked up in ``lookup`` (see :func:`caption_lookup`); a Flickr30k
    style ``name.jpg#2`` is accepted too. Refused lines (no tab, empty name or caption,
    unknown image, not UTF-8) are returned with 1-based line numbers.
    """
    table = CaptionTable()
    lines = caption_lines(path)
    table.n_lines = lines[-1][0] if lines else 0
    for n, name, caption in lines:
        if caption is None:
            table.bad_lines.append((n, "not valid UTF-8"))
        elif name is None:
            table.bad_lines.append((n, "no tab between image name and caption"))
        elif not name:
            table.bad_lines.append((n, "empty image name"))
        elif not caption:
            table.bad_lines.append((n, f"empty caption for {name!r}"))
        else:
            image_id = lookup.get(name)
            if image_id is None:
                m = _FLICKR_SUFFIX.match(name)
                image_id = lookup.get(m.group(1)) if m else None
            if image_id is None:
                table.bad_lines.append((n, f"unknown image {name!r}"))
                continue
            table.by_id.setdefault(image_id, []).append(caption)
    return table


def fit_captions(captions: Sequence[str], k: int) -> list[str]:
    """Exactly ``k`` captions: the first ``k``, or all of them repeated cyclically."""
    if not captions:
        raise ValueError("no captions to fit")
    return [captions[i % len(captions)] for i in range(k)]
