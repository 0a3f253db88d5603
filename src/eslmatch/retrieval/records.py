"""The JSON records of a gallery, one typed definition each (see :mod:`.layout` for where each
lives): the manifest, the catalogue's layout with its shard and FAISS records, the staging
spec of a resumable write, the photo library's state and its extractor.

Each is a ``TypedDict``: the value read from disk is the record, written back as it was read
(same keys, same order of writing), so typing them changes no byte of any file. Readers of
older files use ``.get`` for the keys marked optional (absent in galleries written before
them).
"""

from __future__ import annotations

from typing import Any, TypedDict

from .metadata import Metadata


class FileCheck(TypedDict):
    """The size and sha256 of one file (a shard's array, the FAISS file)."""

    bytes: int
    sha256: str


FileChecks = dict[str, FileCheck]  # file name -> its check


FaissOptionsRecord = dict[str, int | None]  # :meth:`~.ann.FaissOptions.to_dict`


class FaissRecord(TypedDict):
    """The FAISS file a layout uses: ``faiss/GGGGGG.index`` over rows ``[0, rows)``."""

    file: str
    kind: str
    auto: bool  # chosen from the size, re-chosen as the gallery grows
    options: FaissOptionsRecord
    trained_on: int
    rows: int
    bytes: int
    sha256: str


class ShardFile(TypedDict):
    """``shard.json``: the rows, width and file checks of one shard."""

    rows: int
    width: int
    files: FileChecks


class ShardRecord(ShardFile):
    """A shard as a layout names it (``dir``: ``shards/NNNNN``)."""

    dir: str


class StagedShard(ShardRecord):
    """A complete shard of an unfinished write: also the source positions ``[first, first +
    count)`` it covers and those ``skipped`` (unreadable files)."""

    first: int
    count: int
    skipped: list[int]


# Where items came from (a source's description: ``images``, ``features``, ``captions``, ...,
# whatever it names) with ``count``, ``encoding`` and the files skipped: keys vary by source.
SourceRecord = dict[str, Any]


class _LayoutBase(TypedDict):
    rows: int
    shards: list[ShardRecord]


class Layout(_LayoutBase, total=False):
    """The catalogue's layout: the files of the committed generation (a new catalogue holds
    ``{}`` until its build commits the first)."""

    next_shard: int
    numbered: int  # the next number of a numbered item (never reused)
    faiss: FaissRecord | None
    sources: list[SourceRecord]


class SourceIdentity(TypedDict):
    """What identifies a source's items (:meth:`~.sources.Source.identity`)."""

    source: dict[str, Any]  # its description
    count: int
    digest: str


class _SpecBase(TypedDict):
    fingerprint: str
    stages: int
    dtype: str
    shard_rows: int
    total_dim: int | None
    source: dict[str, Any]
    count: int
    digest: str
    action: str  # build / add
    encoding: dict[str, str]  # Encoding.record()


class BuildSpec(_SpecBase, total=False):
    """What a write's shards depend on: a resumed write keeps only shards of the same spec."""

    base: int  # an add: its first shard's number
    replace: list[int]  # an add: the rows it replaces


class StagingRecord(TypedDict):
    """``build.json`` of a staging folder: the write's spec and its writer's pid."""

    spec: BuildSpec
    pid: int


class _ModelBase(TypedDict):
    path: str | None  # absolute: a search loads the model from it
    text_model: str | None
    fingerprint: str
    config: dict[str, str | int | None]  # model_type, strategy, embed_size, ... (None: the model has none)
    stages: int


class ModelRecord(_ModelBase, total=False):
    """A gallery's model (:func:`~.models.model_record`); galleries built before weight digests
    and photo models recorded no ``weights`` / ``inputs``."""

    weights: dict[str, str] | None  # MatchingModel.weights_digest: format, sha256
    inputs: str  # regions / pixels


class _GalleryBase(TypedDict):
    model: ModelRecord


class GalleryManifest(_GalleryBase, total=False):
    """What every store's manifest records: its model (and how its items were encoded)."""

    encoding: dict[str, str]  # how its items were encoded: Encoding.record()
    sources: list[SourceRecord]  # Milvus keeps them here; a file gallery in its layout


class _ManifestBase(GalleryManifest):
    format: str
    version: int
    kind: str
    stages: int
    total_dim: int
    dtype: str


class Manifest(_ManifestBase, total=False):
    """``manifest.json`` of a file gallery (format, version 4; checked by :func:`~.layout.read_manifest`)."""

    created: str | None
    eslmatch_version: str | None
    grid: list[int] | None
    shard_rows: int
    upgraded: dict[str, Any]  # an index of version 1-3 upgraded: from which version, by which eslmatch


class _ExtractorBase(TypedDict):
    backbone: str


class ExtractorRecord(_ExtractorBase, total=False):
    """The extractor a region gallery's photo features come from (:mod:`~.extractor`)."""

    image_size: int | None
    precision: str
    weights: str | None
    weights_sha256: str | None


class RootRecord(TypedDict):
    """A folder of photos the library mirrors: its label and absolute path."""

    label: str
    path: str


class LeftOutRecord(TypedDict):
    """An excluded (deleted by the user) or gone (file missing) library item: its file, and
    the user metadata it gets back."""

    root: str
    file: str
    file_sha256: str | None
    metadata: Metadata


class LibraryState(TypedDict, total=False):
    """The photo library's state (:class:`~.library.Library`), kept beside the items."""

    roots: list[RootRecord]
    excluded: dict[str, LeftOutRecord]
    gone: dict[str, LeftOutRecord]
    unreadable: dict[str, list[int | str]]  # "label/file": [size, mtime, why]
    numbered: dict[str, list[str | int]]  # content digest of numbered items: [first id, count]
    extractor: ExtractorRecord | None


class StoreInfo(TypedDict):
    """:meth:`~.store.GalleryStore.info`: live ``count``, ``deleted`` rows not compacted, ``rows``
    stored, the next ``numbered`` id and the filterable ``fields`` with their types."""

    count: int
    deleted: int
    rows: int
    numbered: int
    fields: dict[str, str]


class MilvusManifest(GalleryManifest, total=False):
    """A Milvus gallery's manifest (a property of its collection; :mod:`~.milvus.conn`)."""

    format: str
    version: int
    kind: str
    stages: int
    state: str  # building / complete
    created: str
    eslmatch_version: str
    total_dim: int | None
    width: int
    dtype: str
    grid: list[int] | None
    index: dict[str, Any]  # the first stage: kind, auto, milvus, options
    levels: dict[str, Any] | None  # the side collection: collection, chunk, field
    build: dict[str, Any]  # id, signature, total
    fields: dict[str, str]
    sources: list[SourceRecord]
    adding: dict[str, Any] | None  # an add not committed yet: signature, start, total
    deleted: int
    next_row: int
    modified: str
    library: LibraryState
    _fields: dict[str, Any]  # the collection's schema fields, as read (never written)
