"""A living collection: :func:`open_gallery` / :func:`build_gallery` and the :class:`Gallery`.

The same operations on both stores (a folder: :class:`~.files.store.FileStore`; a Milvus
collection: :class:`~.milvus.store.MilvusStore`)::

    import eslmatch
    g = eslmatch.open_gallery("indexes/photos")                  # or (uri, collection="photos")
    g.search("two dogs on a beach", k=10, where='folder == "trips" and taken >= "2024-01-01"')
    g.similar("trips/IMG_0042", k=5)                             # image -> image
    g.add("more_photos/", metadata="tags.jsonl", on_duplicate="skip")
    g.delete(where='tag in ["blurry"]');  g.update({"trips/IMG_0042": {"starred": True}})
    g.compact();  len(g);  g.metadata("trips/IMG_0042")

A gallery loads the model its manifest records (or the one given) the first time it needs it
(a search or an add); deletes, updates and compaction never load it. Changes made by another
process are seen by the next call (a file gallery checks its catalogue's generation on every
call; a Milvus gallery reads Milvus).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, EslmatchError
from ..utils.choices import check_precision, check_runtime
from ..utils.digest import sha256_stream
from .encoding import Encoding, default_encoding
from .extractor import DEFAULT, checked_extractor, record_of, recorded_in
from .files.store import AddReport, BuildOptions, FileStore, build_files
from .filters import Filter, as_filter, check
from .library import (
    FileState,
    Library,
    Plan,
    complete,
    hashing,
    library_folders,
    new_library,
    photo_source,
    stat_file,
    state_of,
    stored,
    user_fields,
)
from .metadata import Metadata, MetadataError, merge_types, read_metadata
from .models import check_gallery_model, check_model, model_record
from .policy import check_on_duplicate, item_record, keep_user_metadata, records_of
from .sourcefiles import IMAGE_SUFFIXES, is_image_file
from .sources import PhotoSource, Source, SourceOptions, source_for
from .store import GalleryStore

if TYPE_CHECKING:  # torch: imported when a model is loaded, not before (a sync that finds nothing new needs none)
    import numpy as np
    from typing_extensions import Unpack

    from ..distributed import DistContext
    from ..extract.backbones import Backbone
    from ..model.base import MatchingModel
    from .search import Hit, Searcher
    from .sourcefiles import ImageInput
    from .sources import MetadataInput, SourceInput


class Gallery:
    """A gallery store with its model: search and the collection operations (module doc)."""

    def __init__(
        self,
        store: GalleryStore,
        model: MatchingModel | None = None,
        *,
        model_path: str | Path | None = None,
        text_model: str | Path | None = None,
        device: str = "cpu",
        precision: str | None = None,
        runtime: str = "torch",
        onnx: str | Path | None = None,
        encoding: Encoding | None = None,
    ) -> None:
        self.store = store
        self._model = model
        self._model_path, self._text_model, self._device = model_path, text_model, device
        self._precision, self._runtime, self._onnx = precision, check_runtime(runtime), onnx
        if precision is not None:
            check_precision(precision)
        self._searcher: Searcher | None = None
        self._encoding: Encoding | None = encoding
        self._extractor: Backbone | None = None  # photos -> regions (region models; extractor.py)

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> MatchingModel:
        """The gallery's model (loaded from the manifest's record on first use)."""
        if self._model is None:
            from ..factory import load_recorded

            record = dict(self.store.manifest["model"])  # factory.load_recorded takes a plain dict
            self._model = load_recorded(record, self._model_path, self._text_model, self._device, what=self.store.where)
            self._model.eval()
        return self._model

    @property
    def encoding(self) -> Encoding:
        """How queries (and added items) are encoded: the ``precision`` / ``runtime`` the
        gallery was opened with, else the precision it records (loads the model)."""
        if self._encoding is None:
            from .encode import encoding_for

            model_path = self._model_path or self.store.manifest["model"].get("path")
            self._encoding = encoding_for(
                self.model,
                self._precision,
                self._runtime,
                self._onnx,
                model_path,
                default_encoding(self.store.manifest.get("encoding"), self.model.device),
            )
        return self._encoding

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            from .search import Searcher

            self._searcher = Searcher(self.model, self.store, encoding=self.encoding)
        return self._searcher

    @property
    def kind(self) -> str:
        return self.store.kind

    @property
    def stages(self) -> int:
        return self.store.stages

    @property
    def device(self) -> str:
        """Where the model runs (or will, once loaded)."""
        return str(self._model.device) if self._model is not None else self._device

    def describe(self, precision: str | None = None, runtime: str = "torch") -> dict[str, Any]:
        """What ``index info --json`` prints (:func:`~.describe.describe`); loads no model."""
        from .describe import describe

        return describe(self.store, self.device, precision, runtime)

    def __len__(self) -> int:
        return int(self.store.info()["count"])

    def __repr__(self) -> str:
        return f"Gallery({self.store.where!r}, kind={self.kind}, stages={self.stages}, count={len(self)})"

    # ------------------------------------------------------------------ search
    def search(
        self, query: str | ImageInput, k: int = 10, where: str | Filter | None = None, rerank_k: int | None = 100
    ) -> list[Hit]:
        """Best items for one query: a sentence (``str``: text -> images), or an image (a
        :class:`~pathlib.Path` to a photo, a PIL image, pixels or region features: image ->
        images on an image gallery, image -> captions on a caption index)."""
        if isinstance(query, str):
            if Path(query).suffix.lower() in IMAGE_SUFFIXES and Path(query).is_file():
                raise EslmatchError(
                    f"{query!r} is an image file, but a str query is searched as text: pass Path({query!r}) to "
                    "search with the photo"
                )
            return self.searcher.texts([query], k, rerank_k, where)[0]
        return self.searcher.images([query], k, rerank_k, where)[0]

    def search_texts(
        self,
        texts: Sequence[str],
        k: int = 10,
        where: str | Filter | None = None,
        rerank_k: int | None = 100,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """:meth:`search` for many sentences (encoded and shortlisted in batches)."""
        return self.searcher.texts(texts, k, rerank_k, where, timings)

    def similar(self, item_id: str, k: int = 10, where: str | Filter | None = None) -> list[Hit]:
        """Items most like the stored item ``item_id`` (itself excluded)."""
        return self.searcher.similar([item_id], k, where)[0]

    def attention(self, text: str, item_id: str) -> tuple[list[str], np.ndarray, tuple[int, int] | None]:
        """Word-by-region attention of ``text`` over item ``item_id`` (two-stage image galleries)."""
        return self.searcher.attention(text, item_id)

    # ------------------------------------------------------------------ items
    def metadata(self, item_id: str) -> Metadata:
        """``id``, ``path``, ``added`` and the metadata fields of a live item."""
        return item_record(self.store, item_id).fields()

    def ids(self) -> list[str]:
        return [r.id for r in self.store.select(fields=())]

    def fields(self) -> dict[str, str]:
        """Fields a filter may name, with their types."""
        return dict(self.store.info()["fields"])

    def check_filter(self, where: str | Filter) -> Filter:
        flt = as_filter(where)
        assert flt is not None
        return check(flt, self.fields())

    # ------------------------------------------------------------------ changes
    def add(
        self,
        source: SourceInput,
        metadata: MetadataInput | None = None,
        on_duplicate: str = "skip",
        *,
        options: BuildOptions | None = None,
        **source_options: Unpack[SourceOptions],
    ) -> AddReport:
        """Add items (a :class:`Source`, or what :func:`~.sources.source_for` takes: a folder of
        photos, features, captions); ``metadata``: ``{id: fields}`` or a JSON Lines / CSV file;
        ``on_duplicate``: ``skip`` (default), ``replace`` or ``error`` for ids already stored;
        a replaced item keeps its user metadata unless ``metadata`` gives the field anew.

        A folder of photos becomes (or is) one of the gallery's roots (:mod:`~.library`): its
        new files are added, changed ones re-encoded, moved ones followed, excluded ones left out."""
        check_on_duplicate(on_duplicate)
        # Every store refuses another model's vectors here, before anything is read or encoded.
        check_model(self.store.manifest["model"], self.stages, self.model, self.store.where)
        path = Path(source) if isinstance(source, (str, Path)) else None
        if path is not None and path.is_file() and self.kind == "image" and path.suffix.lower() in IMAGE_SUFFIXES:
            lib = Library.load(self.store)
            found = lib.locate(path)
            if found is not None:
                return self._add_root(Path(found[0]["path"]), metadata, on_duplicate, options, found[1])
            if lib.roots:
                raise EslmatchError(
                    f"{source} is in none of the gallery's folders ({', '.join(r['path'] for r in lib.roots)}): "
                    "add its folder (--images DIR)"
                )
        folders = library_folders(self.model, source, source_options) if self.kind == "image" else None
        if folders:
            rep = AddReport()
            for folder in folders:
                rep = self._add_root(folder, metadata if folder == folders[-1] else None, on_duplicate, options)
            return rep
        src = self._source(source, metadata, **source_options)
        if src.given_ids:
            if on_duplicate == "replace":
                keep_user_metadata(self.store, src)
            return self._write(src, on_duplicate, options)
        # numbered items have no id to be found by: the same content added again is a duplicate
        lib, digest = Library.load(self.store), src.content_digest()
        if digest in lib.numbered:
            first, n = lib.numbered[digest]
            if on_duplicate != "skip":
                raise EslmatchError(
                    f"{self.store.where}: these {n} items were added already (ids {first}..): give them ids to "
                    "replace them, or delete those first"
                )
            return AddReport(duplicates=src.count, count=len(self))
        rep = self._write(src, on_duplicate, options)
        lib = Library.load(self.store)
        lib.numbered[digest] = [src.ids[0], src.count]
        lib.save(self.store)
        return rep

    def _write(self, src: Source, on_duplicate: str, options: BuildOptions | None) -> AddReport:
        check_model(self.store.manifest["model"], self.stages, self.model, self.store.where)
        options = options or BuildOptions()
        if options.encoding is None:
            from .encode import encoding_for

            options.encoding = (
                self.encoding
                if options.precision is None and options.runtime == "torch"
                else encoding_for(self.model, options.precision, options.runtime, options.onnx, self._model_path)
            )
        record = model_record(
            self.model, self.store.manifest["model"].get("path"), self.store.manifest["model"].get("text_model")
        )
        return self.store.add(self.model, src, record, on_duplicate, options)

    # ------------------------------------------------------------------ the photo library
    def _add_root(
        self,
        folder: Path,
        metadata: MetadataInput | None,
        on_duplicate: str,
        options: BuildOptions | None,
        only: str | None = None,
    ) -> AddReport:
        """Add a folder of photos (a root), or ``only`` the file at that path under it."""
        lib = Library.load(self.store)
        root = lib.add_root(folder)
        if only is None:
            lib.save(self.store)
            files, _ = lib.scan([root])
        else:  # one file, named by the user: brought back if it was excluded
            back = [i for i, e in lib.excluded.items() if (e["root"], e["file"]) == (root["label"], only)]
            if back:
                return self.restore(back, options)
            files = [lib.entry(root, only)]
        with hashing((options or BuildOptions()).progress) as hash_of:
            plan = lib.plan(files, stored(self.store), [root["label"]] if only is None else [], hash_of)
        complete(plan, self.store)
        known = [(i, state_of(*found)) for i, found in plan.unchanged] + list(plan.touched.items())
        if known and on_duplicate == "error":
            raise Conflict(
                f"{self.store.where}: {len(known) + len(plan.changed)} files of {folder} are in the gallery already, "
                f"e.g. {known[0][1].rel!r} (id {known[0][0]!r})"
            )
        if on_duplicate == "replace":  # re-encode every known file, keeping its user metadata
            records = {r.id: r for r in records_of(self.store, [i for i, _ in known])}
            for item_id, f in known:
                f.sha256 = f.sha256 or sha256_stream(f.path)
                plan.changed.append((item_id, f))
                plan.kept[item_id] = user_fields(records[item_id].metadata)
            plan.unchanged, plan.touched = [], {}
        if metadata is not None:
            self._merge_metadata(plan, metadata)
        rep = self._apply(lib, plan, options, remove_gone=False, what=f"index add {root['path']}")
        rep.duplicates = len(plan.unchanged) + len(plan.touched)
        return rep

    def _photo_extractor(self, lib: Library) -> Backbone | None:
        """What turns photos into this gallery's input: nothing for a model that takes pixels,
        else the extractor the gallery records (opened once)."""
        from ..model.base import takes_pixels

        if takes_pixels(self.model):
            return None
        if lib.extractor is None:
            raise EslmatchError(
                f"{self.store.where} holds region features and records no extractor to make them from photos: "
                "run `eslmatch extract --images DIR --out DATA`, then `index add --features DATA --images DIR`"
            )
        if self._extractor is None:
            self._extractor = checked_extractor(self.model, lib.extractor, str(self.model.device))
        return self._extractor

    def _merge_metadata(self, plan: Plan, metadata: MetadataInput) -> None:
        """Metadata given with an add of a root: on top of what the items keep; for items
        already stored and unchanged, an update."""
        if isinstance(metadata, (str, Path)):
            metadata = read_metadata(metadata, self.fields())
        written = {i for i, _ in (*plan.changed, *plan.returned, *plan.new)}
        stored = {i for i, _ in (*plan.unchanged, *plan.moved)} | set(plan.touched)
        unknown = [i for i in metadata if i not in written and i not in stored]
        if unknown:
            raise MetadataError(
                f"metadata names {len(unknown)} id(s) not among the files of the folder, e.g. {unknown[0]!r}"
            )
        merge_types(self.fields(), ({"id": k, **v} for k, v in metadata.items()))
        for i, fields in metadata.items():
            if i in written:
                plan.kept[i] = {**plan.kept.get(i, {}), **fields}
        updates = {i: dict(v) for i, v in metadata.items() if i in stored}
        if updates:
            self.store.update(updates)

    def _apply(self, lib: Library, plan: Plan, options: BuildOptions | None, remove_gone: bool, what: str) -> AddReport:
        """Carry out ``plan``, one atomic store operation after another (a kill between two
        leaves a gallery a later sync completes)."""
        store = self.store
        same = [(i, f) for i, f in plan.returned if i in plan.same]
        moves = {**dict(plan.moved), **plan.touched, **dict(same)}
        if moves:
            fields = {i: {**plan.kept.get(i, {}), **f.fields()} for i, f in moves.items()}
            store.update(fields, {i: f.path for i, f in moves.items()}, restore=list(dict(same)))
        back = {r.id for r in records_of(store, list(dict(same)))} if same else set()  # not encoded again
        if remove_gone and (plan.gone or plan.excluded_live):
            lib.remember_gone(plan.gone)
            lib.save(store)  # before the delete: a kill between the two keeps the metadata
            store.delete([r.id for r in plan.gone] + plan.excluded_live)
        items = [*plan.changed, *((i, f) for i, f in plan.returned if i not in back), *plan.new]
        rep = AddReport(count=len(self))
        if items:
            src = photo_source(items, plan.kept, what, lib)
            src.extractor = self._photo_extractor(lib)
            rep = self._write(src, "replace", options)
            files = {lib.name_of(f): f for _, f in items}
            why = {name: reason for name, reason in rep.unreadable if name in files}
            for name, reason in why.items():
                f = files[name]
                lib.unreadable[f"{f.root}/{f.rel}"] = [f.size, f.mtime, reason]
            plan.new = [(i, f) for i, f in plan.new if lib.name_of(f) not in why]
            plan.unreadable += len(why)
        rep.unreadable = [*rep.unreadable, *plan.known_unreadable]
        if remove_gone or plan.returned or len(rep.unreadable) > len(plan.known_unreadable):
            lib.save(store)  # a sync always ends with a write: it removes a killed write's staging
        rep.added, rep.replaced = len(plan.new) + len(plan.returned), len(plan.changed)
        rep.changed, rep.moved, rep.excluded = len(plan.changed), len(plan.moved), plan.excluded
        return rep

    def sync(self, dry_run: bool = False, options: BuildOptions | None = None) -> Plan:
        """Bring the gallery in line with its roots (:mod:`~.library`): add new files,
        re-encode changed ones, follow moved ones, take gone ones out. Returns what it found
        (``dry_run``: and changes nothing). Loads the model only when something is encoded."""
        lib = Library.load(self.store)
        if not lib.roots:
            raise EslmatchError(
                f"{self.store.where} records no folder of photos to sync: build or add it with --images FOLDER"
            )
        files, unreachable = lib.scan(lib.roots)
        live = [r["label"] for r in lib.roots if r["label"] not in unreachable]
        with hashing((options or BuildOptions()).progress) as hash_of:
            plan = lib.plan(files, stored(self.store), live, hash_of)
        complete(plan, self.store)
        plan.unreachable = unreachable
        if not dry_run:
            self._apply(lib, plan, options, remove_gone=True, what="index sync")
        return plan

    def restore(self, ids: Sequence[str], options: BuildOptions | None = None) -> AddReport:
        """Bring back excluded items (deleted by the user, their files still in a root):
        encoded again from their files, with the metadata they had."""
        lib = Library.load(self.store)
        unknown = [i for i in ids if i not in lib.excluded]
        if unknown:
            raise EslmatchError(
                f"{self.store.where}: {unknown[0]!r} is not an excluded item ({len(lib.excluded)} are; "
                "`eslmatch index info` counts them)"
            )
        items: list[tuple[str, FileState]] = []
        for i in ids:
            e = lib.excluded[i]
            path = lib.file_of(e)
            if not path.is_file():
                raise EslmatchError(f"{self.store.where}: the file of {i!r} ({path}) is not there any more")
            items.append((i, stat_file(e["root"], e["file"], path)))
        plan = Plan(returned=items, kept={i: dict(lib.excluded[i].get("metadata") or {}) for i in ids})
        plan.same = {i for i, f in items if f.sha256 == lib.excluded[i].get("file_sha256")}
        for i, f in items:  # gone until written: a kill in between leaves it for sync to bring back
            e = lib.excluded.pop(i)
            lib.gone[i] = {"root": f.root, "file": f.rel, "file_sha256": f.sha256, "metadata": e.get("metadata") or {}}
        lib.save(self.store)
        for i, _ in items:
            lib.gone.pop(i, None)
        return self._apply(lib, plan, options, remove_gone=False, what="index restore")

    def _source(
        self, source: SourceInput, metadata: MetadataInput | None, **source_options: Unpack[SourceOptions]
    ) -> Source:
        if self.kind == "caption":
            source_options.setdefault("kind", "caption")
        src = source_for(self.model, source, **source_options)
        if src.kind != self.kind:
            raise EslmatchError(
                f"{self.store.where} is a{'n' if self.kind == 'image' else ''} {self.kind} gallery: add {self.kind}s"
            )
        # Numbered items (captions, features without ids) get the ids they will be stored under
        # now, so metadata is keyed by those ("5", "6", ... after five items), as documented.
        src.number_from(self.store.info()["numbered"])
        if metadata is not None:
            if isinstance(metadata, (str, Path)):
                metadata = read_metadata(metadata, self.fields())
            src.with_metadata(metadata)
        return src

    def delete(self, ids: Sequence[str] | None = None, where: str | Filter | None = None) -> int:
        """Delete items by id and / or filter; returns how many. An unknown id is an error."""
        if ids is None and where is None:
            raise EslmatchError("delete needs ids or a filter (where=)")
        flt = None if where is None else self.check_filter(where)
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids) if ids is not None else None
        lib = Library.load(self.store)
        if lib.roots:  # remember deleted library photos, so that sync and add leave them out
            records = records_of(self.store, ids) if ids else []
            if ids and len({r.id for r in records}) < len(set(ids)):
                return self.store.delete(ids, flt)  # it names the unknown id, deleting nothing
            if flt is not None:
                records += self.store.select(flt)
            if lib.exclude(records):
                lib.save(self.store)
        return self.store.delete(ids, flt)

    def update(self, metadata_by_id: Mapping[str, Metadata] | str | Path) -> int:
        """Set metadata fields of items (``None`` clears one); a file is read as ``metadata``."""
        if isinstance(metadata_by_id, (str, Path)):
            metadata_by_id = read_metadata(metadata_by_id, self.fields())
        return self.store.update(metadata_by_id)

    def compact(self) -> dict[str, int]:
        """Reclaim the space of deleted items (and merge small shards); forget the metadata
        of library files that are gone."""
        out = self.store.compact()
        lib = Library.load(self.store)
        if lib.gone:
            lib.gone = {}
            lib.save(self.store)
        return out

    def close(self) -> None:
        self.store.close()


# ---------------------------------------------------------------------- opening and building
def open_gallery(
    target: str | Path,
    collection: str | None = None,
    *,
    model: MatchingModel | str | Path | None = None,
    text_model: str | Path | None = None,
    device: str = "cpu",
    verify: bool = False,
    timeout: float = 30.0,
    token: str | None = None,
    precision: str | None = None,
    runtime: str = "torch",
    onnx: str | Path | None = None,
) -> Gallery:
    """Open a gallery: a folder (``target``), or a Milvus collection (``target`` its URI,
    ``collection`` its name). ``model``: the model (or a path to it) instead of the recorded one.

    ``precision`` (``auto``, ``fp32``, ``bf16``; default: the one the gallery records) and
    ``runtime`` (``torch``, or ``onnxruntime`` with the model's export at ``onnx`` or in
    ``MODEL/onnx``): how queries and added items are encoded; the scores keep the engine's
    precision."""
    if precision is not None:
        check_precision(precision)
    check_runtime(runtime)
    store: GalleryStore
    if collection is not None:
        from .milvus.store import MilvusStore

        store = MilvusStore.open(str(target), collection, timeout=timeout, token=token)
    else:
        store = FileStore.open(target, verify=verify)
    how: dict[str, Any] = {"precision": precision, "runtime": runtime, "onnx": onnx}
    if model is not None and not isinstance(model, (str, Path)):  # a MatchingModel
        return Gallery(store, model, device=device, **how)
    return Gallery(store, model_path=model, text_model=text_model, device=device, **how)


def build_gallery(
    model: MatchingModel,
    source: SourceInput,
    target: str | Path,
    collection: str | None = None,
    *,
    metadata: MetadataInput | None = None,
    options: BuildOptions | None = None,
    model_path: str | Path | None = None,
    text_model: str | Path | None = None,
    job: DistContext | None = None,
    milvus: Mapping[str, Any] | None = None,
    **source_options: Unpack[SourceOptions],
) -> Gallery | None:
    """Build a gallery of ``source`` (a :class:`Source`, or what :func:`~.sources.source_for`
    takes) at ``target`` (a folder; or a Milvus URI with ``collection``; ``milvus``: its
    ``overwrite``, ``shards``, ``replicas``, ``timeout``, ``token``). Returns the opened
    gallery (``None`` on torchrun ranks other than 0)."""
    from ..distributed import DistContext
    from ..model.base import takes_pixels
    from .encode import encoding_for

    check_gallery_model(model)
    job = job or DistContext()
    options = options or BuildOptions()
    options.check()
    if options.encoding is None:
        options.encoding = encoding_for(model, options.precision, options.runtime, options.onnx, model_path)
    folders = library_folders(model, source, source_options)
    lib: Library | None = None
    src: Source
    if folders:
        lib, src = new_library(folders)
        if not takes_pixels(model):  # photos -> regions by the default extractor, recorded
            assert isinstance(src, PhotoSource)
            src.extractor = checked_extractor(model, DEFAULT, str(model.device))
            lib.extractor = record_of(src.extractor)
    else:
        src = source_for(model, source, **source_options)
        found = recorded_in(source, source_options.get("split", "test")) if isinstance(source, (str, Path)) else None
        if found is not None and not takes_pixels(model):
            lib = Library({"extractor": found})
    if metadata is not None:
        src.with_metadata(read_metadata(metadata) if isinstance(metadata, (str, Path)) else metadata)
    record = model_record(model, model_path, text_model)
    if not src.given_ids:  # numbered items: found again by their content (Gallery.add)
        lib = lib or Library()
        lib.numbered[src.content_digest()] = [src.ids[0], src.count]
    store: GalleryStore
    if collection is not None:
        from .milvus.store import build_milvus

        store = build_milvus(model, src, str(target), collection, options, record, **dict(milvus or {}))
        if lib is not None:
            lib.save(store)
    else:  # the library state is written with the items (no second write, no lock file)
        out = build_files(model, src, Path(target), options, record, job, lib.state() if lib else None)
        if not job.is_main:
            return None
        store = FileStore.open(out)
    return Gallery(store, model, encoding=options.encoding)


__all__ = ["Gallery", "build_gallery", "is_image_file", "open_gallery"]
