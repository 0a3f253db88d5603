"""What ``index info`` shows of a gallery, computed here so that a Python caller gets it too:
:meth:`Gallery.describe <eslmatch.retrieval.gallery.Gallery.describe>` returns the facts (what
``index info --json`` prints) and :func:`format_description` the text. Nothing loads the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .encoding import default_encoding, describe_encoding, recorded_encoding
from .files.reader import FileReader
from .layout import STAGING

if TYPE_CHECKING:
    from .store import GalleryStore


class Encodings(TypedDict):
    """The encodings of a gallery's sources, the one queries get, whether they differ, and
    whether the gallery recorded its encoding at all."""

    gallery: list[str]
    queries: str
    mismatch: bool
    recorded: bool


def encodings(store: GalleryStore, device: str, precision: str | None = None, runtime: str = "torch") -> Encodings:
    """The gallery's recorded encoding(s) (one per source: a build and its adds may differ),
    the one queries get with ``precision`` (``None``: the gallery's) and ``runtime``, and
    whether they differ (``device``: where queries are encoded)."""
    from ..utils.precision import resolve_precision

    base = recorded_encoding(store.manifest.get("encoding"))
    sources = store.layout().get("sources") if isinstance(store, FileReader) else store.manifest.get("sources")
    used = [recorded_encoding(s.get("encoding")) if s.get("encoding") else base for s in sources or []] or [base]
    if runtime == "onnxruntime":
        query = {"runtime": "onnxruntime", "precision": "fp32"}
    elif precision is None:
        query = dict(default_encoding(store.manifest.get("encoding"), device).record())
    else:
        query = {"runtime": "torch", "precision": resolve_precision(precision, device)}
    return {
        "gallery": sorted({describe_encoding(e) for e in used}),
        "queries": describe_encoding(query),
        "mismatch": any(e != query for e in used),
        "recorded": bool(store.manifest.get("encoding")),
    }


def describe(store: GalleryStore, device: str, precision: str | None = None, runtime: str = "torch") -> dict[str, Any]:
    """The manifest with the live counts and fields, the photo library, the encodings
    (:func:`encodings`) and, for a file gallery, its layout, generation and the bytes an
    interrupted write left behind. JSON-ready (``index info --json``)."""
    out: dict[str, Any] = {k: v for k, v in store.manifest.items() if not k.startswith("_")}
    out.update(store.info())
    out.update(kind=store.kind, stages=store.stages, total_dim=store.total_dim, dtype=store.dtype, grid=store.grid)
    lib = store.library()
    out["where"], out["engine"] = store.where, "files" if isinstance(store, FileReader) else "milvus"
    out["library"] = {
        "roots": lib.get("roots", []),
        "extractor": lib.get("extractor"),
        "excluded": len(lib.get("excluded", {})),
        "gone": len(lib.get("gone", {})),
    }
    if isinstance(store, FileReader):
        layout = store.layout()
        out["layout"] = {k: v for k, v in layout.items() if k != "sources"}
        out["sources"] = layout.get("sources", [])
        out["generation"] = store.generation
        staging = Path(store.where) / STAGING
        out["staging_bytes"] = (
            sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) if staging.is_dir() else 0
        )
    out["encodings"] = encodings(store, device, precision, runtime)
    return out


def format_description(info: dict[str, Any], verified: bool = False) -> str:
    """:func:`describe`'s facts as ``index info`` prints them (``verified``: the gallery was
    opened with ``verify=True``)."""
    lines = [f"gallery    {info['where']}"]
    what = "regions" if info["kind"] == "image" else "words"
    deleted = f", {info['deleted']} deleted not yet compacted" if info.get("deleted") else ""
    if info["stages"] == 1:
        lines.append(
            f"kind       {info['kind']} ({info['count']} items{deleted}, one vector of {info['total_dim']} each)"
        )
        lines.append("stages     1 (exact: the inner product of the vectors is the model's score; no re-rank)")
    else:
        width = max((s["width"] for s in info.get("layout", {}).get("shards", [])), default=info.get("width", 0))
        lines.append(
            f"kind       {info['kind']} ({info['count']} items{deleted}, up to {width} {what}, "
            f"Dt={info['total_dim']}, {info['dtype']})"
        )
        lines.append("stages     2 (shortlist by the first stage, then the full ESL score re-ranks it)")
    first = (info.get("layout") or {}).get("faiss") or info.get("index") or {}
    options = {k: v for k, v in (first.get("options") or {}).items() if v is not None and k in _SHOWN_OPTIONS}
    lines.append(
        f"first      {first.get('kind')}{' (auto)' if first.get('auto') else ''}"
        + "".join(f" {k}={v}" for k, v in options.items())
    )
    model = info["model"]
    lines.append(f"model      {model.get('path') or '(not recorded)'} fingerprint {str(model.get('fingerprint'))[:16]}")
    lines += _encoding_lines(info["encodings"])
    lines.append(f"fields     {', '.join(f'{k} ({v})' for k, v in info['fields'].items())}")
    if info.get("grid"):
        lines.append(f"grid       {'x'.join(map(str, info['grid']))}")
    if "layout" in info:
        shards = info["layout"].get("shards", [])
        size = sum(r["bytes"] for s in shards for r in s["files"].values()) + int(first.get("bytes") or 0)
        lines.append(f"size       {size / 2**20:.1f} MiB in {len(shards)} shard(s), generation {info['generation']}")
    lines += _library_lines(info["library"])
    for src in info.get("sources", []):
        split = f" split {src['split']}" if src.get("split") else ""
        where = src.get("features") or src.get("images") or src.get("split_file") or src.get("uploads")
        skipped = f", {src['skipped']} unreadable files skipped" if src.get("skipped") else ""
        lines.append(f"source     {where}{split} ({src.get('count')} items{skipped})")
    if info.get("staging_bytes"):
        lines.append(
            f"staging    {info['staging_bytes'] / 2**20:.1f} MiB left by an interrupted write (killed?): the same add "
            "resumes from it, any other write removes it"
        )
    if verified and info["engine"] == "files":
        lines.append("verified   every file's sha256 matches the catalogue, and the catalogue is sound")
    elif verified:  # nothing of ours to check: Milvus keeps its own segments
        lines.append("verified   nothing: a Milvus collection's storage is Milvus's; the manifest and collections open")
    return "\n".join(lines)


_SHOWN_OPTIONS = ("nlist", "nprobe", "pq_m", "refine")


def _library_lines(lib: dict[str, Any]) -> list[str]:
    lines = [f"root       {root['label']}: {root['path']}" for root in lib["roots"]]
    if lib.get("extractor"):
        ex = lib["extractor"]
        size = f" at {ex['image_size']} px" if ex.get("image_size") else ""
        lines.append(
            f"extractor  {ex['backbone']}{size}, {ex.get('precision', 'fp32')} (photos added are made into regions)"
        )
    if lib["excluded"] or lib["gone"]:
        lines.append(
            f"library    {lib['excluded']} excluded (deleted by you, files kept; index restore), "
            f"{lib['gone']} gone from disk (metadata kept until compact)"
        )
    return lines


def _encoding_lines(enc: Encodings) -> list[str]:
    shown = " and ".join(enc["gallery"]) + ("" if enc["recorded"] else " (not recorded: written before eslmatch did)")
    if len(enc["gallery"]) > 1:
        shown = f"mixed: {shown} (its sources were encoded differently)"
    if enc["mismatch"]:
        return [
            f"encoded    {shown}",
            f"queries    {enc['queries']}: not the gallery's encoding (allowed; the scores differ slightly from "
            "those of matching encoders; pass --precision to search to choose)",
        ]
    return [f"encoded    {shown}", f"queries    {enc['queries']} (the gallery's)"]
