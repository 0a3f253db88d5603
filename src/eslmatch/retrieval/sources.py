"""What a gallery is built from or extended with: a :class:`Source`.

Three kinds, each with ids, paths and metadata per item:

- :class:`RegionSource`: region features ``(N, R, D)`` (a precomp split, an ``.npy``, an array)
  for models of region features (ESL, VSE);
- :class:`PhotoSource`: image files (a folder, recursively, or a raw-image split) for models
  that take pixels (ESL-CLIP); a file that cannot be read is skipped then and named;
- :class:`CaptionSource`: captions (a caption index, for image -> text search).

:func:`source_for` picks the kind from the model and the inputs (what the CLI calls);
``Source.with_metadata`` attaches user metadata (checked against the source's ids).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeGuard, Union

import numpy as np

from ..data.files import SkipImage, list_images, open_image
from ..data.precomp import open_split
from ..errors import EslmatchError
from .layout import open_array
from .metadata import Metadata, MetadataError, exif_taken, folder_of, merge_types
from .records import SourceIdentity
from .sourcefiles import (
    caption_file,
    check_grid,
    check_lengths,
    clean_line,
    is_split_file,
    make_ids,
    make_paths,
    read_grid,
    resolve_split_paths,
    split_file,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..data.precomp import PrecompSplit
    from ..data.raw import ImageCaptionSplit
    from ..model.base import MatchingModel
    from .sourcefiles import Lengths

    # What a source is made from: region features, photos or captions (each kind refuses,
    # in one line, what it cannot read)
    SourceInput = Union[
        "Source", str, Path, Sequence[Union[str, Path]], "PrecompSplit", "ImageCaptionSplit", np.ndarray, "torch.Tensor"
    ]
    MetadataInput = Union[Mapping[str, Metadata], str, Path]  # {id: fields}, or a JSON Lines / CSV file


class Hasher(Protocol):
    """What :meth:`Source.identity` feeds (a ``hashlib`` hash)."""

    def update(self, data: bytes, /) -> None: ...


class SourceOptions(TypedDict, total=False):
    """What :func:`source_for` takes besides the model and the inputs (``Gallery.add``'s keywords)."""

    kind: str
    split: str
    images_dir: str | Path | None
    lengths: Lengths | None
    ids: Sequence[str] | None
    paths: Sequence[str | None] | None
    grid: Sequence[int] | None


LIBRARY_FIELDS = ("root", "file", "file_size", "file_mtime", "file_sha256")  # a library photo's file (library.py)
AUTO_FIELDS = ("folder", "taken", *LIBRARY_FIELDS)  # fields a photo records by itself (Source.auto_metadata)


@dataclass
class Source:
    """Items to add: ``count`` of them with ``ids``, ``paths`` (``""`` when unknown) and
    ``description`` (where they came from, for the manifest). ``given_ids``: the ids came from
    the caller or the data (else they are numbers, renumbered by :meth:`number_from`)."""

    kind: str
    ids: list[str]
    paths: list[str]
    description: dict[str, str]  # features / images / split_file / uploads, split
    given_ids: bool = True
    root: Path | None = None  # the folder relative to which ``folder`` is recorded
    user_metadata: dict[str, Metadata] = field(default_factory=dict)
    file_fields: dict[str, Metadata] = field(default_factory=dict)  # id -> folder + LIBRARY_FIELDS

    @property
    def count(self) -> int:
        return len(self.ids)

    def number_from(self, start: int) -> None:
        """Give numbered ids ``str(start + i)`` when the data named none (``index add``); user
        metadata attached to them follows its items."""
        if not self.given_ids:
            new = [str(start + i) for i in range(self.count)]
            renamed = dict(zip(self.ids, new))
            self.user_metadata = {renamed[k]: v for k, v in self.user_metadata.items()}
            self.ids = new

    def with_metadata(self, metadata: Mapping[str, Metadata] | None) -> Source:
        """Attach user metadata ``{id: {field: value}}``; an id not in this source is refused."""
        if not metadata:
            return self
        known = set(self.ids)
        unknown = [i for i in metadata if i not in known]
        if unknown:
            raise MetadataError(
                f"metadata names {len(unknown)} id(s) not among the {self.count} items added, e.g. {unknown[0]!r}"
            )
        merge_types({}, ({"id": k, **v} for k, v in metadata.items()))
        self.user_metadata = {k: dict(v) for k, v in metadata.items()}
        return self

    def auto_metadata(self, position: int) -> Metadata:
        """What the item records by itself (:data:`AUTO_FIELDS`): ``folder`` (under
        :attr:`root`) and ``taken``."""
        path = self.paths[position]
        out: Metadata
        if self.ids[position] in self.file_fields:  # a library photo (library.py)
            out = dict(self.file_fields[self.ids[position]])
        elif self.root is None or not path:
            return {}
        else:
            try:
                rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
            except ValueError:
                return {}
            out = {"folder": folder_of(rel)}
        taken = exif_taken(path)
        if taken is not None:
            out["taken"] = taken
        return out

    def metadata(self, positions: Sequence[int]) -> list[Metadata]:
        """The metadata of items ``positions``: auto fields, then the user's on top."""
        return [{**self.auto_metadata(i), **self.user_metadata.get(self.ids[i], {})} for i in positions]

    def identity(self) -> SourceIdentity:
        """What identifies these items (to resume an interrupted write of the same ones)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.description, self.count], sort_keys=True, default=str).encode())
        h.update("\n".join(self.ids).encode() + b"\0" + "\n".join(self.paths).encode())
        h.update(json.dumps([self.user_metadata, self.file_fields], sort_keys=True).encode())
        self._identity_more(h)
        return {"source": self.description, "count": self.count, "digest": h.hexdigest()}

    def content_digest(self) -> str:
        """What the items are, whatever their ids and origin: the same features or captions
        added twice share it (numbered items carry no id to find them by)."""
        h = hashlib.sha256(json.dumps([self.kind, self.count, self.paths]).encode())
        self._identity_more(h)
        return h.hexdigest()

    def _identity_more(self, h: Hasher) -> None:
        pass


@dataclass
class RegionSource(Source):
    """Region features: ``read(i0, i1)`` -> float32 ``(i1 - i0, R, D)``; ``lengths (N,)`` real
    regions or ``None`` (all ``regions``); ``grid`` (h, w) when the regions form one."""

    regions: int = 0
    dim: int = 0
    read: Callable[[int, int], np.ndarray] = field(default=lambda i0, i1: np.zeros(0), repr=False)
    lengths: np.ndarray | None = None
    grid: tuple[int, int] | None = None

    @classmethod
    def stream(
        cls, count: int, regions: int, dim: int, read: Callable[[int, int], np.ndarray], description: dict[str, str]
    ) -> RegionSource:
        """Features made chunk by chunk (``read(i0, i1)`` -> ``(i1 - i0, regions, dim)``), numbered ids."""
        return cls(
            "image",
            [str(i) for i in range(count)],
            [""] * count,
            description,
            False,
            None,
            regions=regions,
            dim=dim,
            read=read,
        )

    def _identity_more(self, h: Hasher) -> None:
        h.update(f"{self.regions}|{self.dim}".encode())
        for i in (0, max(0, self.count - 1)):
            h.update(np.ascontiguousarray(self.read(i, i + 1), dtype=np.float32).tobytes())
        if self.lengths is not None:
            h.update(np.asarray(self.lengths, dtype=np.int64).tobytes())


@dataclass
class PhotoSource(Source):
    """Image files (absolute ``files``), named in messages by ``names``; ``refused``: files left
    out before reading (missing from a split, a second file with the same id)."""

    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    # for a model of region features: the extractor (eslmatch.extract.Backbone) that turns
    # each photo into regions, as the gallery records it (retrieval/extractor.py)
    extractor: Any = field(default=None, repr=False)

    @property
    def grid(self) -> tuple[int, int] | None:
        grid = getattr(self.extractor, "grid", None)
        return (int(grid[0]), int(grid[1])) if grid else None

    @property
    def regions(self) -> int:
        """Regions per photo (its extractor's), or 1 (one vector per photo)."""
        return int(self.extractor.regions) if self.extractor is not None else 1

    def load(
        self, i0: int, i1: int, preprocess: Callable[[Image.Image], torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[int], list[tuple[str, str]]]:
        """Preprocessed pixels of files ``[i0, i1)``: ``(pixels, kept positions, skipped (name, reason))``."""
        pixels, kept, skipped = [], [], []
        for i in range(i0, i1):
            try:
                image = open_image(self.files[i])
            except SkipImage as exc:
                skipped.append((self.names[i], str(exc)))
                continue
            try:
                pixels.append(preprocess(image))
            except (OSError, ValueError, RuntimeError) as exc:  # PIL's lazy decoding, odd sizes
                skipped.append((self.names[i], f"cannot preprocess ({type(exc).__name__}: {exc})"))
                continue
            kept.append(i)
        return pixels, kept, skipped

    def _identity_more(self, h: Hasher) -> None:
        for f in self.files:
            try:
                st = f.stat()
                h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}|missing\n".encode())


@dataclass
class CaptionSource(Source):
    """Captions (one item each), with the path of each caption's image when known."""

    texts: list[str] = field(default_factory=list)
    lines: list[int] | None = None  # each caption's line in its .txt (messages)

    def where(self, i: int) -> str:
        """Item ``i`` named for a message: its file and line, or its id."""
        if self.lines is not None:
            return f"{self.description.get('features')}: line {self.lines[i]}"
        return f"caption {self.ids[i]!r}"

    def _identity_more(self, h: Hasher) -> None:
        h.update("\n".join(self.texts).encode())


# ---------------------------------------------------------------------- region features
def _region_split(x: SourceInput) -> TypeGuard[PrecompSplit]:
    """A precomp split of region features (or what reads like one)."""
    return hasattr(x, "read_images") and hasattr(x, "n_regions")


def _caption_split(x: SourceInput) -> TypeGuard[PrecompSplit]:
    """A precomp split's captions (or what reads like one)."""
    return hasattr(x, "captions") and hasattr(x, "image_of_caption")


def _as_features(arr: SourceInput, img_dim: int) -> np.ndarray:
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
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
    return arr


def regions(
    features: SourceInput,
    *,
    img_dim: int,
    split: str = "test",
    lengths: Lengths | None = None,
    ids: Sequence[str] | None = None,
    paths: Sequence[str | None] | None = None,
    images_dir: str | Path | None = None,
    grid: Sequence[int] | None = None,
) -> RegionSource:
    """Region features from a precomp split (folder or :class:`PrecompSplit`), an ``.npy``
    ``(N, R, D)``, an array / tensor, or a :class:`RegionSource` (returned as it is)."""
    if isinstance(features, RegionSource):
        if features.dim != img_dim:
            raise EslmatchError(f"region features have width {features.dim}, the model expects {img_dim}")
        return features
    found_ids: list[str] | None = None
    found_paths: list[str] | None = None
    root: Path | None = Path(images_dir) if images_dir is not None else None
    if isinstance(features, (str, Path)):
        path = Path(features)
        if path.is_dir():
            features = open_split(path, split, img_dim=img_dim, captions=False)
        elif path.suffix == ".npy" and path.is_file():
            arr = _as_features(open_array(path), img_dim)
            found_grid = check_grid(grid, arr.shape[1]) if grid is not None else read_grid(path.parent, arr.shape[1])
            return _array_source(arr, lengths, ids, paths, images_dir, found_grid, {"features": str(path.resolve())})
        elif not path.exists():
            raise EslmatchError(f"{path}: no such features folder or .npy file")
        else:
            raise EslmatchError(f"{path}: features must be a precomp dataset folder or an .npy (N, R, D) array")
    if _region_split(features):
        s = features
        if s.img_dim != img_dim:
            raise EslmatchError(f"{s.images_path}: features have width {s.img_dim}, the model expects {img_dim}")
        found_ids = list(s.ids) if s.ids is not None else None
        found_paths = resolve_split_paths(s.image_paths, Path(s.root))
        found = check_grid(grid, s.n_regions) if grid is not None else read_grid(Path(s.root), s.n_regions, s.name)
        item_ids, named = make_ids(ids, found_ids, s.n_images)
        item_paths = make_paths(paths, found_paths, s.n_images, images_dir, item_ids)
        if root is None and found_paths is not None:
            root = Path(s.root)
        return RegionSource(
            "image",
            item_ids,
            item_paths,
            {"features": str(Path(s.root).resolve()), "split": s.name},
            named,
            root,
            regions=s.n_regions,
            dim=s.img_dim,
            read=lambda i0, i1: s.read_images(slice(i0, i1)),
            lengths=check_lengths(lengths, s.n_images, s.n_regions),
            grid=found,
        )
    arr = _as_features(features, img_dim)
    return _array_source(arr, lengths, ids, paths, images_dir, check_grid(grid, arr.shape[1]), {"features": "array"})


def _array_source(
    arr: np.ndarray,
    lengths: Lengths | None,
    ids: Sequence[str] | None,
    paths: Sequence[str | None] | None,
    images_dir: str | Path | None,
    grid: tuple[int, int] | None,
    desc: dict[str, str],
) -> RegionSource:
    n, r, d = arr.shape
    item_ids, named = make_ids(ids, None, n)
    return RegionSource(
        "image",
        item_ids,
        make_paths(paths, None, n, images_dir, item_ids if named else None),
        desc,
        named,
        Path(images_dir) if images_dir is not None else None,
        regions=r,
        dim=d,
        read=lambda i0, i1: np.array(arr[i0:i1], dtype=np.float32),
        lengths=check_lengths(lengths, n, r),
        grid=grid,
    )


# ---------------------------------------------------------------------- photos
def photos(
    source: SourceInput,
    *,
    images_dir: str | Path | None = None,
    split: str = "test",
    ids: Sequence[str] | None = None,
    captions_per_image: int = 5,
) -> PhotoSource:
    """Image files for a model that takes pixels: a folder of photos (every regular file in
    it, recursively, in sorted relative-path order; ids are relative paths without extension),
    a Karpathy-split JSON or an ``image<TAB>caption`` TSV (``split`` of it, images under
    ``images_dir``), an :class:`~eslmatch.data.raw.ImageCaptionSplit`, or a :class:`PhotoSource`."""
    if isinstance(source, PhotoSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _folder_photos(path, ids)
        if is_split_file(path):
            source = split_file(path, images_dir, split, captions_per_image)
        elif not path.exists():
            raise EslmatchError(f"{path}: no such folder of photos or split file")
        else:
            raise EslmatchError(
                f"{path}: this model takes images: give a folder of photos, or a Karpathy-split .json / "
                "captions .tsv with the folder of its images"
            )
    from ..data.raw import ImageCaptionSplit

    if isinstance(source, ImageCaptionSplit):
        files = [Path(p) for p in source.image_paths]
        item_ids, _ = make_ids(ids, list(source.ids), len(files))
        desc = {"split_file": str(Path(source.source).resolve()), "split": source.name}
        refused = [(m, "missing: the split names it, the image folder lacks it") for m in source.missing]
        root, names = Path(images_dir) if images_dir is not None else None, [str(f) for f in files]
        return PhotoSource("image", item_ids, names, desc, True, root, files=files, names=list(names), refused=refused)
    raise EslmatchError(
        f"this model takes images: give a folder of photos or a split file, not {type(source).__name__}"
    )


def _folder_photos(root: Path, ids: Sequence[str] | None) -> PhotoSource:
    entries, refused = list_images(root, recursive=True)
    if not entries:
        raise EslmatchError(f"{root}: no file to index in the folder")
    item_ids, _ = make_ids(ids, [e.id for e in entries], len(entries))
    files = [e.path for e in entries]
    return PhotoSource(
        "image",
        item_ids,
        [str(f) for f in files],
        {"images": str(root.resolve())},
        True,
        root,
        files=files,
        names=[e.rel for e in entries],
        refused=refused,
    )


# ---------------------------------------------------------------------- captions
def captions(
    texts: SourceInput,
    *,
    split: str = "test",
    images_dir: str | Path | None = None,
    ids: Sequence[str] | None = None,
    paths: Sequence[str | None] | None = None,
    captions_per_image: int = 5,
) -> CaptionSource:
    """Captions from a list of strings, a ``.txt`` file (one per line), a precomp split (ids
    ``IMAGEID#j`` when the split has image ids), or a raw-image split (a Karpathy-split
    ``.json`` / captions ``.tsv`` with ``images_dir``, or an ``ImageCaptionSplit``)."""
    if isinstance(texts, CaptionSource):
        return texts
    found_ids: list[str] | None = None
    found_paths: list[str] | None = None
    if isinstance(texts, (str, Path)):
        path = Path(texts)
        if path.is_dir():
            texts = open_split(path, split, img_dim=None)
        elif is_split_file(path):
            texts = split_file(path, images_dir, split, captions_per_image)
        elif path.is_file() and path.suffix == ".txt":
            found_ids, lines, numbers = caption_file(path)
            src = _caption_source(lines, ids, paths, found_ids, None, {"features": str(path.resolve())})
            src.lines = numbers
            return src
        elif not path.exists():
            raise EslmatchError(f"{path}: no such dataset folder, split file or captions .txt file")
        else:
            raise EslmatchError(
                f"{path}: captions must come from a precomp dataset folder, a .txt file (one caption a line), "
                "or a Karpathy-split .json / captions .tsv"
            )
    from ..data.raw import ImageCaptionSplit

    if isinstance(texts, ImageCaptionSplit):
        r, k = texts, texts.captions_per_image
        found_ids = [f"{r.ids[c // k]}#{c % k}" for c in range(r.n_captions)]
        found_paths = [str(r.image_paths[c // k]) for c in range(r.n_captions)]
        desc = {"split_file": str(Path(r.source).resolve()), "split": r.name}
        return _caption_source(list(r.captions), ids, paths, found_ids, found_paths, desc)
    if _caption_split(texts):
        s, k = texts, texts.captions_per_image
        found_ids = [f"{s.ids[c // k]}#{c % k}" for c in range(s.n_captions)] if s.ids is not None else None
        img_paths = resolve_split_paths(s.image_paths, Path(s.root))
        found_paths = [img_paths[c // k] for c in range(s.n_captions)] if img_paths is not None else None
        desc = {"features": str(Path(s.root).resolve()), "split": s.name}
        return _caption_source(list(s.captions), ids, paths, found_ids, found_paths, desc)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise EslmatchError(
            f"captions must be a list of strings, a .txt file or a dataset split, got {type(texts).__name__}"
        )
    return _caption_source(list(texts), ids, paths, None, None, {"features": "list"})


def _caption_source(
    texts: Sequence[object],  # checked: each a non-empty str
    ids: Sequence[str] | None,
    paths: Sequence[str | None] | None,
    found_ids: list[str] | None,
    found_paths: list[str] | None,
    desc: dict[str, str],
) -> CaptionSource:
    clean = []
    for i, c in enumerate(texts):
        if not isinstance(c, str) or not c.strip():
            raise EslmatchError(f"caption {i} is empty or not a string")
        clean.append(clean_line(" ".join(c.split()), "caption", i))
    if not clean:
        raise EslmatchError("no captions to index")
    item_ids, named = make_ids(ids, found_ids, len(clean))
    item_paths = make_paths(paths, found_paths, len(clean), None, item_ids)
    return CaptionSource("caption", item_ids, item_paths, desc, named, None, texts=clean)


def subset(source: Source, positions: Sequence[int]) -> Source:
    """The items ``positions`` of ``source`` (e.g. without the ids a gallery holds already)."""
    pos = list(positions)
    common: dict[str, Any] = dict(
        kind=source.kind,
        ids=[source.ids[i] for i in pos],
        paths=[source.paths[i] for i in pos],
        description=source.description,
        given_ids=source.given_ids,
        root=source.root,
        user_metadata=dict(source.user_metadata),
        file_fields=dict(source.file_fields),
    )
    if isinstance(source, RegionSource):
        base, where = source, np.asarray(pos, dtype=np.int64)

        def read(i0: int, i1: int) -> np.ndarray:
            return np.stack([base.read(int(p), int(p) + 1)[0] for p in where[i0:i1]]).astype(np.float32)

        lengths = None if source.lengths is None else source.lengths[where]
        return RegionSource(
            **common, regions=source.regions, dim=source.dim, read=read, lengths=lengths, grid=source.grid
        )
    if isinstance(source, PhotoSource):
        return PhotoSource(
            **common,
            files=[source.files[i] for i in pos],
            names=[source.names[i] for i in pos],
            refused=source.refused,
            extractor=source.extractor,
        )
    if isinstance(source, CaptionSource):
        lines = None if source.lines is None else [source.lines[i] for i in pos]
        return CaptionSource(**common, texts=[source.texts[i] for i in pos], lines=lines)
    raise EslmatchError(f"not a gallery source: {type(source).__name__}")


# ---------------------------------------------------------------------- choosing
def source_for(
    model: MatchingModel,
    inputs: SourceInput,
    *,
    kind: str = "image",
    split: str = "test",
    images_dir: str | Path | None = None,
    lengths: Lengths | None = None,
    ids: Sequence[str] | None = None,
    paths: Sequence[str | None] | None = None,
    grid: Sequence[int] | None = None,
) -> Source:
    """The source of ``inputs`` for ``model``: captions for ``kind="caption"``, photos for a
    model that takes pixels, else region features (see :func:`regions`, :func:`photos`,
    :func:`captions`)."""
    if isinstance(inputs, Source):
        return inputs
    if kind == "caption":
        return captions(inputs, split=split, images_dir=images_dir, ids=ids, paths=paths)
    if kind != "image":
        raise EslmatchError(f"kind must be 'image' or 'caption', got {kind!r}")
    if model.inputs == "pixels":
        return photos(inputs, images_dir=images_dir, split=split, ids=ids)
    return regions(
        inputs,
        img_dim=int(model.config.img_dim),
        split=split,
        lengths=lengths,
        ids=ids,
        paths=paths,
        images_dir=images_dir,
        grid=grid,
    )
