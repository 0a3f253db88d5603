"""A photo library mirrored by a gallery: its roots, stable ids, and what a sync does.

The store-neutral rules (both stores keep the same state through the small
:class:`~.search.GalleryStore` calls ``select``, ``update``, ``library`` and ``set_library``):

- **Roots.** A gallery built or extended from folders of photos records each folder (its
  absolute path and a label: the folder's name, made unique: ``photos``, ``photos-2``).
- **What an item records.** ``root`` (the label), ``file`` (its path under the root),
  ``file_size``, ``file_mtime`` (ns), ``file_sha256`` and ``folder`` (its directory under the root).
- **Ids.** A new file's id is its path under the root without the extension; under every root
  but the first, prefixed by the root's label (``cameraB/chelsea``). An id another item (or an
  excluded or gone file) holds gets ``~2``, ``~3``, ... An id never changes afterwards: a moved
  or renamed file keeps its id, its vector and its metadata.
- **Changed** files (size or mtime differ, and the sha256 too) are re-encoded under their id,
  keeping their user metadata. A file whose size and mtime are the same is not read.
- **Gone** files (not under their root any more) leave the results; their user metadata is
  kept until ``compact``, so a file that comes back (same place or same content) gets its id
  and metadata again: with the same content, its stored vector too where the store still
  holds it (the file store, until ``compact``; Milvus deletes are final, so there it is
  encoded anew), else it is encoded. A root that cannot be read (an unmounted disk) is
  left alone, with a warning.
- **Excluded** files: an item the user deletes while its file stays in a root. ``sync`` and
  ``add`` of its folder leave it out (and count it); :meth:`~.gallery.Gallery.restore` takes it back.
- Files that cannot be read as images are remembered (by size and mtime) and not tried again
  until they change.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..data.files import FileEntry, id_of, list_files
from ..errors import EslmatchError, counted
from ..utils.digest import sha256_stream
from .extractor import is_features_folder
from .metadata import Metadata, folder_of
from .policy import records_of
from .records import ExtractorRecord, LeftOutRecord, LibraryState, RootRecord
from .sources import AUTO_FIELDS, LIBRARY_FIELDS, PhotoSource, SourceOptions
from .store import GalleryStore, Record

if TYPE_CHECKING:
    from ..model.base import MatchingModel
    from .sources import SourceInput

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (root label, file under the root)
Found = tuple[str, FileEntry]  # (root label, the file as listed)


@dataclass(slots=True)
class FileState:
    """A file found under a root: ``root`` label, ``rel`` path, ``stem`` (``rel`` without the
    extension), absolute ``path``, ``size``, ``mtime`` (ns) and its ``sha256`` once read."""

    root: str
    rel: str
    stem: str
    path: str
    size: int
    mtime: int
    sha256: str = ""

    @property
    def key(self) -> Key:
        return (self.root, self.rel)

    def fields(self) -> Metadata:
        """What the item records of its file (:data:`~.sources.LIBRARY_FIELDS` and ``folder``)."""
        return {
            "root": self.root,
            "file": self.rel,
            "folder": folder_of(self.rel),
            "file_size": self.size,
            "file_mtime": self.mtime,
            "file_sha256": self.sha256,
        }


@dataclass
class Plan:
    """What a sync (or an add of a root) will do; ids are the gallery's."""

    unchanged: list[tuple[str, Found]] = field(default_factory=list)  # FileStates made only when needed
    touched: dict[str, FileState] = field(default_factory=dict)  # same content, new mtime
    changed: list[tuple[str, FileState]] = field(default_factory=list)
    moved: list[tuple[str, FileState]] = field(default_factory=list)
    new: list[tuple[str, FileState]] = field(default_factory=list)
    returned: list[tuple[str, FileState]] = field(default_factory=list)
    same: set[str] = field(default_factory=set)  # returned with the content they had: restorable
    gone: list[Record] = field(default_factory=list)
    excluded: int = 0  # files left out: the user deleted their items
    excluded_live: list[str] = field(default_factory=list)  # an interrupted delete to finish
    unreadable: int = 0  # files known not to be images, unchanged
    known_unreadable: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of those
    kept: dict[str, Metadata] = field(default_factory=dict)  # user metadata of changed / returned items
    unreachable: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.changed) + len(self.moved) + len(self.new) + len(self.returned) + len(self.gone)

    def counts(self) -> dict[str, int]:
        return {
            "new": len(self.new) + len(self.returned),
            "changed": len(self.changed),
            "moved": len(self.moved),
            "gone": len(self.gone),
            "unchanged": len(self.unchanged) + len(self.touched),
            "excluded": self.excluded,
            "unreadable": self.unreadable,
        }

    def line(self) -> str:
        """``12 new, 3 changed, 2 moved, 5 gone, 9,870 unchanged`` (and what was skipped)."""
        c = self.counts()
        out = f"{c['new']:,} new, {c['changed']:,} changed, {c['moved']:,} moved, {c['gone']:,} gone, {c['unchanged']:,} unchanged"
        if c["excluded"]:
            out += f"; {counted(c['excluded'], 'file')} you deleted left out (index restore brings them back)"
        if c["unreadable"]:
            out += f"; {counted(c['unreadable'], 'file')} that are not images skipped"
        if self.unreachable:
            out += f"; roots not readable, left as they are: {', '.join(self.unreachable)}"
        return out


def user_fields(metadata: Mapping[str, Any]) -> Metadata:
    """The fields the user gave (not the builtins, not what a photo records by itself)."""
    return {k: v for k, v in metadata.items() if k not in ("id", "path", "added") and k not in AUTO_FIELDS}


class Library:
    """The library state of a gallery store (``roots``, ``excluded``, ``gone``, ``unreadable``)."""

    def __init__(self, state: LibraryState | None = None) -> None:
        state = state or {}
        self.roots: list[RootRecord] = list(state.get("roots") or [])
        self.excluded: dict[str, LeftOutRecord] = dict(state.get("excluded") or {})
        self.gone: dict[str, LeftOutRecord] = dict(state.get("gone") or {})
        self.unreadable: dict[str, list[int | str]] = dict(state.get("unreadable") or {})  # key: [size, mtime, why]
        # numbered items (features or captions without ids): content digest -> [first id, count]
        self.numbered: dict[str, list[str | int]] = dict(state.get("numbered") or {})
        # a region model's gallery: what turns photos into its features (extractor.py)
        self.extractor: ExtractorRecord | None = state.get("extractor")

    def state(self) -> LibraryState:
        return {
            "roots": self.roots,
            "excluded": self.excluded,
            "gone": self.gone,
            "unreadable": self.unreadable,
            "numbered": self.numbered,
            "extractor": self.extractor,
        }

    @classmethod
    def load(cls, store: GalleryStore) -> Library:
        return cls(store.library())

    def save(self, store: GalleryStore) -> None:
        store.update({}, library=self.state())

    # ------------------------------------------------------------------ roots
    def root_of(self, folder: str | Path) -> RootRecord | None:
        path = str(Path(folder).resolve())
        return next((r for r in self.roots if r["path"] == path), None)

    def add_root(self, folder: str | Path) -> RootRecord:
        """The root of ``folder``, recorded now if it is new (label: its name, made unique)."""
        found = self.root_of(folder)
        if found is not None:
            return found
        path = Path(folder).resolve()
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.name) or "root"
        labels = {r["label"] for r in self.roots}
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        root: RootRecord = {"label": label, "path": str(path)}
        self.roots.append(root)
        return root

    def locate(self, path: Path) -> tuple[RootRecord, str] | None:
        """The root holding the file ``path`` and its path under it (``None``: in no root)."""
        full = path.resolve()
        for root in self.roots:
            try:
                return root, full.relative_to(root["path"]).as_posix()
            except ValueError:
                continue
        return None

    def entry(self, root: RootRecord, rel: str) -> Found:
        """One file under ``root`` as :meth:`scan` lists it."""
        path = f"{root['path']}/{rel}"
        st = os.stat(path)
        return root["label"], FileEntry(rel, path, id_of(rel), st.st_size, st.st_mtime_ns)

    def first_label(self) -> str | None:
        return self.roots[0]["label"] if self.roots else None

    def name_of(self, f: FileState) -> str:
        """A file as messages name it: its path under the first root, else ``label/path``."""
        return f.rel if f.root == self.first_label() else f"{f.root}/{f.rel}"

    # ------------------------------------------------------------------ scanning
    def scan(self, roots: Sequence[RootRecord]) -> tuple[list[Found], list[str]]:
        """The files under ``roots`` (``(root label, entry)``: size and mtime, none is read),
        and the labels of the roots that could not be read."""
        files: list[Found] = []
        unreachable: list[str] = []
        for root in roots:
            base = Path(root["path"])
            if not base.is_dir():
                log.warning(f"root {root['label']!r} ({base}) cannot be read: its items are left as they are")
                unreachable.append(root["label"])
                continue
            entries, refused = list_files(base, recursive=True)
            for rel, why in refused:
                log.warning(f"{root['label']}/{rel}: left out ({why})")
            label = root["label"]
            files.extend((label, e) for e in entries)
        return files, unreachable

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        files: Iterable[Found],
        records: Sequence[Record],
        roots: Sequence[str],
        hash_of: Callable[[str], str] = sha256_stream,
    ) -> Plan:
        """Compare ``files`` (found under the roots labelled ``roots``) with the stored
        ``records``: what is unchanged, changed, moved, new, back, gone (module doc)."""
        plan = Plan()
        scanned = set(roots)
        by_key: dict[Key, Record] = {}
        for r in records:
            m = r.metadata
            if "root" in m and "file" in m:
                by_key[(str(m["root"]), str(m["file"]))] = r
        excluded = {(e["root"], e["file"]): i for i, e in self.excluded.items()}
        gone_key = {(g["root"], g["file"]): i for i, g in self.gone.items()}
        gone_hash = {g.get("file_sha256"): i for i, g in self.gone.items()}
        held = {r.id for r in records}
        for gid in [g for g in self.gone if g in held]:  # came back before a kill: live again
            del self.gone[gid]
        held |= set(self.excluded) | set(self.gone)
        seen: set[Key] = set()
        fresh: list[FileState] = []
        for label, e in files:
            key = (label, e.rel)
            rec = by_key.get(key)
            if rec is None:
                fresh.append(state_of(label, e))
                continue
            seen.add(key)
            if key in excluded:
                plan.excluded_live.append(rec.id)
                continue
            m = rec.metadata
            if m.get("file_size") == e.size and m.get("file_mtime") == e.mtime_ns and rec.path == e.path:
                plan.unchanged.append((rec.id, (label, e)))
                continue
            f = state_of(label, e)
            f.sha256 = hash_of(f.path)
            if f.sha256 == m.get("file_sha256"):
                plan.touched[rec.id] = f
            else:
                plan.changed.append((rec.id, f))
        missing: dict[str, list[Record]] = {}
        for key, r in by_key.items():
            if key[0] in scanned and key not in seen:
                missing.setdefault(str(r.metadata.get("file_sha256")), []).append(r)
        first = self.first_label()
        for f in fresh:
            if f.key in excluded:
                plan.excluded += 1
                continue
            known = self.unreadable.get(f"{f.root}/{f.rel}")
            if known and known[:2] == [f.size, f.mtime]:
                plan.unreadable += 1
                plan.known_unreadable.append((self.name_of(f), str(known[2]) if len(known) > 2 else "not an image"))
                continue
            f.sha256 = hash_of(f.path)
            if missing.get(f.sha256):
                plan.moved.append((missing[f.sha256].pop().id, f))
                continue
            back = gone_key.get(f.key) or gone_hash.get(f.sha256)
            if back is not None and back in self.gone:
                g = self.gone.pop(back)
                plan.returned.append((back, f))
                plan.kept[back] = dict(g.get("metadata") or {})
                if g.get("file_sha256") == f.sha256:
                    plan.same.add(back)
                continue
            base = f.stem if f.root == first else f"{f.root}/{f.stem}"
            item_id, n = base, 1
            while item_id in held:
                n += 1
                item_id = f"{base}~{n}"
            held.add(item_id)
            plan.new.append((item_id, f))
        plan.gone = [r for rs in missing.values() for r in rs]
        return plan

    def remember_gone(self, records: Iterable[Record]) -> None:
        for r in records:
            m = r.metadata
            self.gone[r.id] = {  # an item of a root (Plan.gone): it records both
                "root": m["root"],
                "file": m["file"],
                "file_sha256": m.get("file_sha256"),
                "metadata": user_fields(m),
            }

    def exclude(self, records: Iterable[Record]) -> int:
        """Remember deleted items whose file is under a root (``sync`` / ``add`` leave them out)."""
        n = 0
        for r in records:
            m = r.metadata
            if "root" in m and "file" in m:
                self.excluded[r.id] = {
                    "root": m["root"],
                    "file": m["file"],
                    "file_sha256": m.get("file_sha256"),
                    "metadata": user_fields(m),
                }
                n += 1
        return n

    def file_of(self, entry: LeftOutRecord) -> Path:
        root = next((r for r in self.roots if r["label"] == entry["root"]), None)
        if root is None:
            raise EslmatchError(f"root {entry['root']!r} is no longer recorded")
        return Path(root["path"]) / str(entry["file"])


def state_of(label: str, e: FileEntry) -> FileState:
    return FileState(label, e.rel, e.id, e.path, e.size, e.mtime_ns)


def stat_file(root: str, rel: str, path: Path) -> FileState:
    """The :class:`FileState` of one file, read (its sha256)."""
    st = os.stat(path)
    return FileState(root, rel, id_of(rel), str(path.resolve()), st.st_size, st.st_mtime_ns, sha256_stream(path))


def library_folders(model: MatchingModel, source: SourceInput, options: SourceOptions) -> list[Path] | None:
    """The folders of photos ``source`` names for the library (a folder, or a list of them,
    no ids given; for a region model, folders that hold no features): each is a root.
    ``None``: not a library."""
    if options.get("ids") is not None or options.get("kind", "image") != "image":
        return None
    many = list(source) if isinstance(source, (list, tuple)) else [source]
    folders = [s for s in many if isinstance(s, (str, Path))]
    if not many or len(folders) < len(many) or not all(Path(s).is_dir() for s in folders):
        return None
    from ..model.base import takes_pixels

    if not takes_pixels(model) and any(is_features_folder(s) for s in folders):
        return None
    return [Path(s) for s in folders]


def new_library(folders: Sequence[Path]) -> tuple[Library, PhotoSource]:
    """A library of ``folders`` (its roots, in order) and the source of every file in them."""
    lib = Library()
    roots = [lib.add_root(f) for f in folders]
    files, _ = lib.scan(roots)
    plan = lib.plan(files, [], [r["label"] for r in roots])
    if not plan.new:
        raise EslmatchError(f"{', '.join(map(str, folders))}: no file to index in the folder")
    src = photo_source(plan.new, {}, ", ".join(r["path"] for r in roots), lib)
    return lib, src


def photo_source(
    items: Sequence[tuple[str, FileState]], kept: Mapping[str, Metadata], what: str, lib: Library
) -> PhotoSource:
    """The files ``items`` (``(id, file)``) to encode, recording their files' fields, with the
    user metadata ``kept`` for them."""
    ids = [i for i, _ in items]
    files = [Path(f.path) for _, f in items]
    src = PhotoSource(
        "image",
        ids,
        [str(p) for p in files],
        {"images": what},
        True,
        None,
        files=files,
        names=[lib.name_of(f) for _, f in items],
    )
    src.file_fields = {i: f.fields() for i, f in items}
    src.user_metadata = {i: dict(kept[i]) for i in ids if kept.get(i)}
    return src


def stored(store: GalleryStore) -> list[Record]:
    """Every live item with the fields :meth:`Library.plan` compares (a quick read)."""
    return store.select(fields=LIBRARY_FIELDS)


def complete(plan: Plan, store: GalleryStore) -> None:
    """Read the user metadata of the items a plan re-encodes or takes out (kept for them)."""
    ids = [i for i, _ in plan.changed] + [r.id for r in plan.gone]
    full = {r.id: r for r in records_of(store, ids)}
    for i, _ in plan.changed:
        plan.kept[i] = {**user_fields(full[i].metadata), **plan.kept.get(i, {})}
    plan.gone = [full.get(r.id, r) for r in plan.gone]


@contextlib.contextmanager
def hashing(progress: bool) -> Iterator[Callable[[str], str]]:
    """The sha256 of the files a plan reads (new, and changed by size or time), with a
    progress bar (on a terminal): a sync of many large new photos is not silent."""
    with tqdm(
        desc="reading new and changed files", unit="file", disable=None if progress else True, leave=False
    ) as bar:

        def hash_of(path: str) -> str:
            bar.update(1)
            return sha256_stream(path)

        yield hash_of
