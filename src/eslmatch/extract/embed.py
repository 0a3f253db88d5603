"""A model's index vectors for a folder of photos, region features or captions, to a file.

:func:`embed_to_file` writes the vectors whose inner product is the one-stage score (VSE,
ESL-CLIP) or ESL's first-stage global vectors: ``index_vectors_images(embed_images(x))`` and
``index_vectors_captions(embed_captions(ids, lengths))``, one row per item.

- ``OUT.npy``: float32 ``(N, K)``, the ids in ``OUT.ids.txt`` and what made them in
  ``OUT.meta.json`` beside it;
- ``OUT.parquet``: columns ``id`` (string) and ``vector`` (fixed-size list of float32), the
  same facts in the schema metadata (needs pyarrow).

The work is cut in chunks of ``chunk`` items, each written atomically into
``.OUT.partial/`` (``chunk_XXXXX.npy`` + ``chunk_XXXXX.json``) beside ``progress.json`` (the
fingerprint: model, inputs, precision, chunk size); a rerun with the same fingerprint
computes only the missing chunks, then the output is assembled atomically and the partial
folder removed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..distributed import stop_hook_for_tests
from ..errors import EslmatchError, InputError
from ..model.base import MatchingModel, takes_pixels
from ..model.identity import model_fingerprint
from ..retrieval.sources import CaptionSource, PhotoSource, RegionSource, Source, captions, photos, regions
from ..text import pad_ids, tokenize_each
from ..utils import atomic_path, atomic_write_text, encode_in, resolve_precision
from ..utils.choices import check_precision
from ..utils.chunks import ChunkStore
from ..utils.messages import note

log = logging.getLogger(__name__)
FORMAT = "eslmatch-embed/1"
FORMATS = (".npy", ".parquet")


def kind_of(source: Source) -> str:
    """``photos``, ``features`` or ``captions``: what ``source`` holds (and how it is encoded)."""
    if isinstance(source, PhotoSource):
        return "photos"
    return "features" if isinstance(source, RegionSource) else "captions"


# ---------------------------------------------------------------------------- sources
def photo_items(model: MatchingModel, folder: str | Path, recursive: bool = True) -> Source:
    """Every file of ``folder`` (:func:`eslmatch.retrieval.photos`: sorted relative paths, ids
    without extension) for a model that takes pixels; unreadable files are skipped and named."""
    root = Path(folder)
    if not takes_pixels(model):
        raise EslmatchError(
            f"{model.config.model_type} models take region features, not photos: run eslmatch extract on "
            f"{root} first and give --features"
        )
    if not root.is_dir():
        raise InputError(f"{root}: no such folder of photos")
    return photos(root)


def feature_items(model: MatchingModel, data: str | Path, split: str = "test") -> Source:
    """Region features ``(N, R, D)`` (:func:`eslmatch.retrieval.regions`): an ``.npy``, or
    ``{split}_ims.npy`` of a precomp folder (ids from ``{split}_ids.txt``, else row numbers)."""
    if takes_pixels(model):
        raise EslmatchError(f"{model.config.model_type} models take photos: give --images DIR, not --features")
    return regions(data, img_dim=int(model.config.img_dim), split=split)


def caption_items(model: MatchingModel, file: str | Path) -> Source:
    """Captions of a ``.txt`` (:func:`eslmatch.retrieval.captions`: the one captions-file rule,
    ``ID<TAB>caption`` names the id, else they are numbered from 0; blank lines left out)."""
    path = Path(file)
    if not path.is_file():
        raise InputError(f"{path}: no such captions file")
    return captions(path)


def load_items(model: MatchingModel, source: Source, i0: int, i1: int) -> tuple[Any, list[int], list[tuple[str, str]]]:
    """The model's inputs for items ``[i0, i1)``: ``(inputs, kept positions, skipped (name, reason))``."""
    if isinstance(source, PhotoSource):
        pixels, kept, skipped = source.load(i0, i1, model.preprocess_image)
        return (torch.stack(pixels) if pixels else None), kept, skipped
    if isinstance(source, RegionSource):
        x = torch.from_numpy(np.array(source.read(i0, i1), dtype=np.float32))
        if not torch.isfinite(x).all():
            raise InputError(f"{source.description.get('features')}: rows {i0}..{i1 - 1} hold NaN or infinite values")
        return x, list(range(i0, i1)), []
    assert isinstance(source, CaptionSource)
    seqs = tokenize_each(model.tokenize, source.texts[i0:i1], lambda j: source.where(i0 + j))
    return pad_ids([q.tolist() for q in seqs]), list(range(i0, i1)), []


# ---------------------------------------------------------------------------- vectors
def index_vectors(model: MatchingModel, kind: str, inputs: Any, precision: str = "fp32") -> torch.Tensor:
    """``(B, K)`` float32 index vectors of one batch (``kind``: photos, features, captions),
    computed in ``precision`` on the model's device."""
    dev = model.device

    def run() -> torch.Tensor:
        if kind == "captions":
            ids, lens = inputs[0].to(dev), inputs[1].to(dev)
            return model.index_vectors_captions(model.embed_captions(ids, lens), lens)
        x = inputs.to(dev)
        return model.index_vectors_images(model.embed_images(x), None)

    with torch.no_grad():
        return encode_in(precision, dev, run)


# ---------------------------------------------------------------------------- the job
def check_output(out: str | Path) -> Path:
    """``out`` ends in ``.npy`` or ``.parquet`` (pyarrow importable for the latter)."""
    path = Path(out)
    if path.suffix not in FORMATS:
        raise InputError(f"--out {path}: must end in .npy or .parquet")
    if path.is_dir():
        raise InputError(f"--out {path}: a folder is in the way")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise EslmatchError("--out *.parquet needs pyarrow: pip install 'eslmatch[parquet]'") from exc
    return path


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def ids_path(out: Path) -> Path:
    """``OUT.ids.txt`` beside an ``OUT.npy``."""
    return out.with_suffix(".ids.txt")


def embed_to_file(
    model: MatchingModel,
    source: Source,
    out: str | Path,
    *,
    precision: str = "fp32",
    batch_size: int = 64,
    chunk: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the index vectors of ``source``'s items to ``out`` (``.npy`` or ``.parquet``).

    Args:
        model: any family, used in eval mode on its device.
        source: from :func:`photo_items`, :func:`feature_items` or :func:`caption_items`.
        precision: ``fp32`` (default), ``bf16`` or ``auto`` (bf16 where the device computes it
            natively), see :mod:`eslmatch.utils.precision`.
        batch_size: items per encoder call; chunk: items per resumable chunk.
    Returns:
        a summary: ``out``, ``count``, ``dim``, ``precision``, ``reused_chunks``,
        ``computed``, ``skipped`` ``[(name, reason)]``, ``seconds``.
    """
    started = time.perf_counter()
    target = check_output(out)
    check_precision(precision)
    for name, value in (("batch_size", batch_size), ("chunk", chunk)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    used = resolve_precision(precision, model.device)
    model.eval()
    fingerprint = {
        "format": FORMAT,
        "kind": kind_of(source),
        "items": source.identity()["digest"],
        "count": source.count,
        "model": model_fingerprint(model),
        "precision": used,
        "chunk": chunk,
    }
    store = ChunkStore(partial_dir(target), fingerprint)
    store.open()
    if store.discarded:
        note(log, f"partial results in {store.folder} are from other inputs, model or precision; starting over")
    n_chunks = (source.count + chunk - 1) // chunk
    done = {i for i in store.chunks if i < n_chunks}
    if done:
        log.info(f"resuming: {len(done)} of {n_chunks} chunks already embedded in {store.folder}")
    bar = tqdm(
        total=source.count,
        initial=sum(len(range(i * chunk, min((i + 1) * chunk, source.count))) for i in done),
        unit=kind_of(source) if kind_of(source) != "features" else "img",
        desc="embed",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    computed = saved = 0
    try:
        for index in range(n_chunks):
            if index in done:
                continue
            i0, i1 = index * chunk, min((index + 1) * chunk, source.count)
            vectors, kept, skipped = _embed_chunk(model, source, i0, i1, batch_size, used, bar.update)
            store.save(index, vectors, kept, skipped)
            computed += i1 - i0
            saved += 1
            stop_hook_for_tests(0, saved)
    finally:
        bar.close()
    summary = _assemble(target, store, source, n_chunks, model, used)
    store.remove()
    summary.update(reused_chunks=n_chunks - saved, computed=computed, seconds=round(time.perf_counter() - started, 3))
    return summary


def _embed_chunk(
    model: MatchingModel,
    source: Source,
    i0: int,
    i1: int,
    batch_size: int,
    precision: str,
    tick: Callable[[int], Any],
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    parts: list[np.ndarray] = []
    kept_all: list[int] = []
    skipped_all: list[tuple[str, str]] = []
    for b0 in range(i0, i1, batch_size):
        b1 = min(b0 + batch_size, i1)
        inputs, kept, skipped = load_items(model, source, b0, b1)
        skipped_all.extend(skipped)
        if kept:
            parts.append(index_vectors(model, kind_of(source), inputs, precision).cpu().numpy().astype(np.float32))
            kept_all.extend(kept)
        tick(b1 - b0)
    vectors = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return vectors, kept_all, skipped_all


def _assemble(
    target: Path, store: ChunkStore, source: Source, n_chunks: int, model: MatchingModel, precision: str
) -> dict[str, Any]:
    records = [store.chunks[i] for i in range(n_chunks)]
    chunks = [store.load(i) for i in range(n_chunks)]
    kept = [k for rec in records for k in rec["kept"]]
    skipped = [tuple(s) for rec in records for s in rec["skipped"]]
    if not kept:
        raise InputError(f"no item could be embedded: all {len(skipped)} were skipped (first: {skipped[0]})")
    dim = next(int(c.shape[1]) for c in chunks if len(c))
    ids = [source.ids[i] for i in kept]
    meta = {
        "format": FORMAT,
        "eslmatch_version": __version__,
        "family": model.config.model_type,
        "kind": kind_of(source),
        "vectors": "index_vectors_images(embed_images(x))"
        if kind_of(source) != "captions"
        else "index_vectors_captions(embed_captions(ids, lengths))",
        "exact_index": bool(model.exact_index),
        "precision": precision,
        "count": len(kept),
        "dim": dim,
        "source": {**source.description, "refused": [list(r) for r in getattr(source, "refused", [])]},
        "skipped": [list(s) for s in skipped[:1000]],
        "skipped_total": len(skipped),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if target.suffix == ".npy":
        with atomic_path(target) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(kept), dim))
            at = 0
            for c in chunks:
                arr[at : at + len(c)] = c
                at += len(c)
            arr.flush()
            del arr
        atomic_write_text(ids_path(target), "".join(f"{i}\n" for i in ids))
        atomic_write_text(target.with_suffix(".meta.json"), json.dumps(meta, indent=2) + "\n")
        files = [str(target), str(ids_path(target)), str(target.with_suffix(".meta.json"))]
    else:
        _write_parquet(target, ids, [c for c in chunks if len(c)], dim, meta)
        files = [str(target)]
    return {
        "out": str(target),
        "files": files,
        "count": len(kept),
        "dim": dim,
        "precision": precision,
        "skipped": skipped,
    }


def _write_parquet(target: Path, ids: Sequence[str], chunks: Sequence[np.ndarray], dim: int, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks]).reshape(-1)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim)
    table = pa.table({"id": pa.array(list(ids), type=pa.string()), "vector": vectors})
    table = table.replace_schema_metadata({b"eslmatch": json.dumps(meta).encode()})
    with atomic_path(target) as tmp:
        pq.write_table(table, str(tmp))


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors (N, K) float32)`` of a file :func:`embed_to_file` wrote."""
    p = Path(path)
    if p.suffix == ".npy":
        return ids_path(p).read_text(encoding="utf-8").splitlines(), np.load(p, allow_pickle=False)
    import pyarrow.parquet as pq

    table = pq.read_table(str(p))
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32)
    ids = [str(x) for x in table.column("id").to_pylist()]
    return ids, vectors.reshape(len(ids), -1)
