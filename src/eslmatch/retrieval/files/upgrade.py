"""Indexes of format versions 1-3 (written before version 4) upgraded to version 4.

Versions 1 (two-stage, one folder of arrays), 2 (one-stage vectors) and 3 (two-stage in
shards) keep ids, paths and captions in text files and their state in the manifest. The
upgrade hard-links the arrays into ``shards/`` (version 3's shards as they are; versions 1-2
as one shard), the FAISS file into ``faiss/``, builds the catalogue from the text files and
writes a version 4 manifest, in a new folder that replaces the old one (a journaled
replacement: a kill leaves the old or the new index). Nothing is re-encoded: searches give the
same results.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ... import __version__
from ...utils import atomic_dir
from ...utils.messages import note
from ..layout import (
    FAISS_DIR,
    FORMAT,
    MANIFEST,
    GalleryIndexError,
    faiss_name,
    link_or_copy,
    read_json,
    shard_files,
    shard_name,
    write_json,
)
from ..records import FileChecks, ShardFile, ShardRecord
from .catalog import CATALOG, Catalog

log = logging.getLogger(__name__)

LEGACY_VERSIONS = (1, 2, 3)


def _lines(path: Path, count: int) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryIndexError(f"{path}: unreadable ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != count:
        raise GalleryIndexError(f"{path}: {len(lines)} lines, the index holds {count} items")
    return lines


def _legacy_stages(m: dict[str, Any]) -> int:
    if m["version"] == 1:
        return 1 if (m.get("model") or {}).get("stages") == 1 else 2
    return 2 if m["version"] == 3 else int(m["stages"])


def upgrade_legacy(path: Path) -> None:
    """Upgrade the index at ``path`` (format 1-3) to format 4 in place (see the module doc)."""
    m = read_json(path / MANIFEST, "an eslmatch gallery index")
    if m.get("format") != FORMAT or m.get("version") not in LEGACY_VERSIONS:
        raise GalleryIndexError(
            f"{path / MANIFEST}: index format version {m.get('version')!r} is not supported by this eslmatch; rebuild it"
        )
    stages, count = _legacy_stages(m), int(m["count"])
    dtype = m["dtype"] if stages == 2 else "float32"
    names = shard_files(stages == 2, dtype)
    ids = _lines(path / "ids.txt", count)
    paths = _lines(path / "paths.txt", count)
    captions = _lines(path / "captions.txt", count) if m["kind"] == "caption" else None
    with atomic_dir(path) as tmp:  # the old index stays readable until the replacement
        shards = []
        if m["version"] == 3:
            for i, rec in enumerate(m["shards"]):
                shards.append(
                    _link_shard(path / rec["dir"], tmp, i, names, int(rec["rows"]), int(m["width"]), rec["files"])
                )
        else:
            records = {n: m["files"][n] for n in names if n in m.get("files", {})}
            width = int(m["width"]) if stages == 2 else 1
            shards.append(_link_shard(path, tmp, 0, names, count, width, records))
        (tmp / FAISS_DIR).mkdir()
        link_or_copy(path / "faiss.index", tmp / faiss_name(1))
        faiss = m["faiss"]
        faiss_rec = {
            "file": faiss_name(1),
            "kind": faiss["kind"],
            "auto": False,
            "options": faiss.get("options", {}),
            "trained_on": int(faiss.get("trained_on", count)),
            "rows": count,
            **m["files"]["faiss.index"],
        }
        layout = {
            "rows": count,
            "shards": shards,
            "next_shard": len(shards),
            "numbered": count,
            "faiss": faiss_rec,
            "sources": m.get("sources", []),
        }
        catalog = Catalog(tmp / CATALOG, create=True)
        with catalog.write():
            catalog.insert(range(count), ids, paths, [{}] * count, str(m.get("created", "")), captions)
            catalog.set_layout(layout)
        catalog.close()
        model = dict(m["model"])
        model.setdefault("stages", stages)
        manifest = {
            "format": FORMAT,
            "version": 4,
            "kind": m["kind"],
            "stages": stages,
            "created": m.get("created"),
            "upgraded": {"from_version": m["version"], "eslmatch_version": __version__},
            "eslmatch_version": m.get("eslmatch_version"),
            "model": model,
            "total_dim": int(m["total_dim"]),
            "dtype": dtype,
            "grid": m.get("grid"),
            "shard_rows": int(m.get("shard_rows") or max(count, 1)),
        }
        write_json(tmp / MANIFEST, manifest)
    note(log, f"upgraded {path} from index format {m['version']} to 4 (files linked, nothing re-encoded)")


def _link_shard(
    src: Path, tmp: Path, i: int, names: tuple[str, ...], rows: int, width: int, records: FileChecks
) -> ShardRecord:
    folder = tmp / shard_name(i)
    folder.mkdir(parents=True)
    for name in names:
        link_or_copy(src / name, folder / name)
    missing = [n for n in names if n not in records]
    if missing:
        raise GalleryIndexError(f"{src}: the manifest records no checksum of {missing[0]}")
    rec: ShardFile = {"rows": rows, "width": width, "files": {n: records[n] for n in names}}
    (folder / "shard.json").write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"dir": shard_name(i), **rec}


__all__ = ["LEGACY_VERSIONS", "upgrade_legacy"]
