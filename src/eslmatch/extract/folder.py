"""A folder of images (and optionally a captions file) -> a precomp dataset split.

Writes into ``out_dir``:

- ``{split}_ims.npy``: ``(N, R, D)`` float32 region features, one row per usable image;
- ``{split}_ids.txt``: the image ids (file names without extension), one per row;
- ``{split}_images.txt``: the source image paths, one per row;
- ``{split}_caps.txt``: ``K`` captions per image, in row order (only with a captions file);
- ``extract_meta.json``: backbone, sizes, counts, skipped files with reasons.

Extraction is resumable: features are written every ``chunk`` files to
``out_dir/.extract_partial/{split}/chunk_XXXXX.npy`` with its record ``chunk_XXXXX.json``,
beside ``progress.json`` (the fingerprint), each file atomically; a rerun with the same file
list, backbone and sizes reuses the finished chunks. The final files are assembled
atomically and the partial folder is removed.

Under ``torchrun`` the chunks are shared out among the processes (see
:mod:`eslmatch.distributed`); rank 0 assembles the same files, byte for byte, as
one process would.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.files import (
    CaptionTable,
    ImageEntry,
    SkipImage,
    caption_lookup,
    fit_captions,
    list_images,
    listing_digest,
    open_image,
    parse_captions,
)
from ..distributed import DistContext, deal, stop_hook_for_tests
from ..errors import EslmatchError, InputError
from ..utils import atomic_path, atomic_write_text
from ..utils.choices import MEASURED_RUNTIMES, check_precision, check_runtime
from ..utils.chunks import ChunkStore
from ..utils.messages import note
from .backbones import Backbone, BackboneOptions, build_backbone

log = logging.getLogger(__name__)

META_NAME = "extract_meta.json"
PARTIAL_DIR = ".extract_partial"
META_FORMAT = "eslmatch-extract/1"
_LIST_LIMIT = 1000  # entries of a list kept in extract_meta.json
_PRINT_LIMIT = 20  # entries of a list printed


@dataclass
class ExtractConfig:
    """Options of :func:`extract_folder` (recorded in ``extract_meta.json``)."""

    backbone: str = "efficientnet-lite0"
    split: str = "test"
    captions: str | None = None
    captions_per_image: int = 5
    batch_size: int = 16
    device: str = "auto"
    weights: str | None = None
    image_size: int | None = None
    chunk: int = 256
    boxes: str | None = None
    max_boxes: int | None = None
    recursive: bool = True
    relative_paths: bool = False
    workers: int = 2
    progress: bool = True
    precision: str = "fp32"
    runtime: str = "torch"


# ---------------------------------------------------------------------------- small helpers
def _lines(values: Sequence[str]) -> str:
    return "".join(f"{v}\n" for v in values)


def _head(items: Sequence[Any], limit: int = _LIST_LIMIT) -> list[Any]:
    return list(items[:limit])


# ---------------------------------------------------------------------------- listing
def output_names(split: str) -> set[str]:
    """The files :func:`extract_folder` writes for ``split``."""
    return {f"{split}_ims.npy", f"{split}_caps.txt", f"{split}_ids.txt", f"{split}_images.txt", META_NAME}


# ---------------------------------------------------------------------------- captions
# ---------------------------------------------------------------------------- chunks
@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """cuDNN in deterministic mode while extracting (same image -> same features)."""
    if device.type != "cuda":
        yield
        return
    old = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def _prepare_one(backbone: Backbone, entry: ImageEntry) -> tuple[torch.Tensor | None, Any, str | None]:
    try:
        image = open_image(entry.path)
        tensor, extra = backbone.prepare(image, entry.rel)
        return tensor, extra, None
    except SkipImage as exc:
        return None, None, str(exc)


def _extract_chunk(
    backbone: Backbone,
    entries: Sequence[ImageEntry],
    batch_size: int,
    pool: ThreadPoolExecutor,
    tick: Callable[[int], None],
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Features ``(n_kept, R, D)`` of one chunk, the kept local indices, the skipped files.

    Files are read ``batch_size`` at a time on the thread pool (the next group is read
    while the backbone runs on the current one).
    """
    groups = [list(range(i, min(i + batch_size, len(entries)))) for i in range(0, len(entries), batch_size)]
    out = np.empty((len(entries), backbone.regions, backbone.dim), dtype=np.float32)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []

    def submit(group: list[int]) -> list[Any]:
        return [pool.submit(_prepare_one, backbone, entries[i]) for i in group]

    pending = submit(groups[0]) if groups else []
    for g, group in enumerate(groups):
        results = [f.result() for f in pending]
        pending = submit(groups[g + 1]) if g + 1 < len(groups) else []
        tensors, extras, rows = [], [], []
        for i, (tensor, extra, reason) in zip(group, results):
            if reason is not None:
                skipped.append((entries[i].rel, reason))
            else:
                tensors.append(tensor)
                extras.append(extra)
                rows.append(i)
        if tensors:
            feats = backbone.run(torch.stack(tensors), extras)
            if tuple(feats.shape) != (len(tensors), backbone.regions, backbone.dim):
                raise EslmatchError(
                    f"backbone {backbone.name} returned shape {tuple(feats.shape)}, expected "
                    f"({len(tensors)}, {backbone.regions}, {backbone.dim})"
                )
            n0 = len(kept)
            out[n0 : n0 + len(rows)] = feats.detach().float().cpu().numpy()
            kept.extend(rows)
        tick(len(group))
    return out[: len(kept)], kept, skipped


# ---------------------------------------------------------------------------- main entry
def extract_folder(
    images_dir: str | Path,
    out_dir: str | Path,
    backbone: str | Backbone = "efficientnet-lite0",
    captions: str | Path | None = None,
    *,
    split: str = "test",
    captions_per_image: int = 5,
    batch_size: int = 16,
    device: str = "auto",
    weights: str | None = None,
    image_size: int | None = None,
    chunk: int = 256,
    boxes: str | None = None,
    max_boxes: int | None = None,
    recursive: bool = True,
    relative_paths: bool = False,
    workers: int = 2,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    distributed: bool | None = None,
    dist_timeout_minutes: float = 60.0,
    precision: str = "fp32",
    runtime: str = "torch",
) -> dict[str, Any]:
    """Extract region features of every image in ``images_dir`` into a precomp split.

    Args:
        images_dir: folder of images (files that are not readable images are skipped and
            listed, never fatal).
        out_dir: dataset folder to write (created if needed).
        backbone: a registered name (``efficientnet-lite0``, ``resnet152``,
            ``efficientnet-lite0-boxes``) or a :class:`Backbone` instance.
        captions: ``image_name<TAB>caption`` file; when given, images without a caption are
            dropped and ``{split}_caps.txt`` holds ``captions_per_image`` captions per image
            (first ``K`` kept, fewer repeated cyclically). Without it only features are written.
        split: split name of the output files.
        batch_size: images per backbone call.
        device: ``auto`` / ``cpu`` / ``cuda[:N]`` (for a backbone given by name; under
            torchrun ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``).
        weights, image_size, boxes, max_boxes: see :class:`BackboneOptions`.
        chunk: files per resumable chunk.
        recursive: read sub-folders too (the default, as for index build and embed; ids keep
            the sub-folder: ``sub/name``); ``False`` reads the top folder only and lists each
            sub-folder among the skipped entries.
        relative_paths: write ``{split}_images.txt`` relative to ``out_dir`` (else absolute).
        workers: threads reading and resizing images.
        progress: show a tqdm progress bar (stderr; rank 0 only under torchrun).
        on_chunk: called as ``on_chunk(index, n_chunks)`` after each chunk this process saved.
        distributed: ``None`` (default): join torchrun's job when ``WORLD_SIZE > 1``; each
            process extracts its share of the chunks into the shared chunk store and rank 0
            writes the final files, identical to one process's. ``False``: never.
        dist_timeout_minutes: how long a rank waits for the others at most.
        precision: ``fp32`` (default: float32, as before), ``bf16`` (bf16 autocast,
            channels-last) or ``auto`` (bf16 where the device computes it natively); for a
            backbone given by name. Recorded in ``extract_meta.json``.
        runtime: ``torch`` (default: the reference), ``auto`` (on CPU in float32, ONNX Runtime
            where it is faster and agrees with float32 eager, measured once per machine:
            :mod:`eslmatch.export.runtime`) or ``onnxruntime``; under torchrun every rank runs
            what rank 0 chose.
    Returns:
        a summary dict (what ``extract_meta.json`` records for the split, plus ``files``).
        On a torchrun rank other than 0 only ``{"rank", "processes", "computed_images"}``.
    Raises:
        InputError, EslmatchError: as one process; under torchrun a failure on any rank
        raises :class:`~eslmatch.distributed.JobFailed` on every rank.
    """
    started = time.perf_counter()
    cfg = ExtractConfig(
        backbone=backbone if isinstance(backbone, str) else backbone.name,
        split=split,
        captions=None if captions is None else str(captions),
        captions_per_image=captions_per_image,
        batch_size=batch_size,
        device=device,
        weights=weights,
        image_size=image_size,
        chunk=chunk,
        boxes=boxes,
        max_boxes=max_boxes,
        recursive=recursive,
        relative_paths=relative_paths,
        workers=workers,
        progress=progress,
        precision=precision,
        runtime=runtime,
    )
    job = DistContext.join(distributed, dist_timeout_minutes)
    try:
        return _extract(job, cfg, Path(images_dir), Path(out_dir), backbone, on_chunk, started)
    finally:
        job.close()


def _extract(
    job: DistContext,
    cfg: ExtractConfig,
    src: Path,
    out: Path,
    backbone: str | Backbone,
    on_chunk: Callable[[int, int], None] | None,
    started: float,
) -> dict[str, Any]:
    """:func:`extract_folder`'s work, stage by stage (each stage agreed by every rank)."""
    with job.stage("setup"):
        _check_config(cfg)
        entries, refused, table, no_caption = _list_inputs(src, out, cfg)
        model = backbone if isinstance(backbone, Backbone) else _build(job, backbone, cfg)
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(cfg, entries, model)
    with job.stage("setup"):
        firsts = job.gather(fingerprint)
        differ = [r for r, f in enumerate(firsts) if f != firsts[0]]
        if differ:
            raise EslmatchError(
                f"rank {differ[0]} sees other inputs than rank 0 (file list, sizes, modification times or "
                f"backbone differ): every process must read the same --images folder"
            )

    store = ChunkStore(out / PARTIAL_DIR / cfg.split, fingerprint, PARTIAL_DIR)
    n_chunks = (len(entries) + cfg.chunk - 1) // cfg.chunk
    reused: list[int] = []
    with job.stage("resume"):
        if job.is_main:
            reused = _open_store(store, entries, cfg.chunk, n_chunks, model)
    reused = job.broadcast(reused)
    with job.stage("resume"):
        if not job.is_main and not store.attached():
            raise EslmatchError(
                f"{store.progress_path} written by rank 0 is not visible here: --out must be one folder "
                "shared by every process (a shared filesystem for several nodes)"
            )

    done = set(reused)
    pending = [i for i in range(n_chunks) if i not in done]
    mine = deal(pending, job.rank, job.world_size)
    computed, compute_seconds = 0, 0.0
    with job.stage("extract"):
        if job.distributed:
            bar = {"total": sum(_chunk_len(entries, cfg.chunk, i) for i in mine), "initial": 0}
            desc = f"extract (rank 0 of {job.world_size})"
        else:
            bar = {"total": len(entries), "initial": sum(_chunk_len(entries, cfg.chunk, i) for i in reused)}
            desc = "extract"
        computed, compute_seconds = _run_chunks(
            model, store, entries, cfg, mine, n_chunks, on_chunk, desc, cfg.progress and job.is_main, job.rank, **bar
        )
    stats = job.gather((computed, compute_seconds))
    if not job.is_main:
        with job.stage("write"):
            pass  # wait for rank 0's outcome: every rank exits non-zero if writing fails
        return {"rank": job.rank, "processes": job.world_size, "computed_images": computed}

    with job.stage("write"):
        missing = store.collect(pending, (model.regions, model.dim))
        if missing:
            raise EslmatchError(
                f"{len(missing)} chunk(s) reported done are missing from {store.folder} (first: "
                f"{store.chunk_path(missing[0]).name}): --out must be one folder shared by every process"
            )
        rows, skipped_all = _assemble_rows(store, entries, cfg.chunk, n_chunks, refused)
        if not rows:
            store.remove()
            first = f" (first: {skipped_all[0][0]}: {skipped_all[0][1]})" if skipped_all else ""
            raise InputError(f"{src}: no usable image: all {len(skipped_all)} files were skipped{first}")

        summary = _write_dataset(out, cfg.split, model, store, entries, cfg.chunk, n_chunks, rows, table, cfg, src)
        store.remove()
        computed = sum(c for c, _ in stats)
        compute_seconds = max(s for _, s in stats)  # the ranks ran side by side
        elapsed = time.perf_counter() - started
        summary.update(
            skipped=[{"file": f, "reason": r} for f, r in skipped_all],
            no_caption=no_caption,
            computed_images=computed,
            reused_chunks=len(reused),
            seconds=round(elapsed, 3),
            images_per_second=round(computed / compute_seconds, 3) if compute_seconds > 0 else None,
            device=str(model.device),
            processes=job.world_size,
        )
        _write_meta(out, summary)
    if no_caption:
        log.warning(
            f"{len(no_caption)} file(s) have no caption and were left out: "
            + ", ".join(no_caption[:_PRINT_LIMIT])
            + (" ..." if len(no_caption) > _PRINT_LIMIT else "")
        )
    return summary


def _build(job: DistContext, name: str, cfg: ExtractConfig) -> Backbone:
    """The backbone ``name``; under torchrun the other ranks run the runtime rank 0 chose."""

    def build(runtime: str) -> Backbone:
        options = BackboneOptions(
            image_size=cfg.image_size,
            weights=cfg.weights,
            device=job.device_for(cfg.device),
            boxes=cfg.boxes,
            max_boxes=cfg.max_boxes,
            precision=cfg.precision,
            runtime=runtime,
        )
        return build_backbone(name, options)

    model = build(cfg.runtime) if job.is_main or not job.distributed else None
    chosen = job.broadcast(model.runtime if model is not None else None) if job.distributed else None
    return model if model is not None else build(str(chosen))


def _chunk_len(entries: Sequence[ImageEntry], chunk: int, index: int) -> int:
    return len(entries[index * chunk : (index + 1) * chunk])


def _list_inputs(
    src: Path, out: Path, cfg: ExtractConfig
) -> tuple[list[ImageEntry], list[tuple[str, str]], CaptionTable | None, list[str]]:
    """The image files to extract (captioned ones only, with ``cfg.captions``), the files
    refused up front, the parsed captions and the files left out for want of a caption."""
    if not src.exists():
        raise InputError(f"{src}: no such image folder")
    if not src.is_dir():
        raise InputError(f"{src}: not a folder (--images takes a folder of images)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    exclude = [out / name for name in output_names(cfg.split)] + [out / PARTIAL_DIR]
    exclude += [Path(f) for f in (cfg.captions, cfg.boxes) if f is not None]  # inputs kept beside the images
    entries, refused = list_images(src, cfg.recursive, exclude)
    if not entries:
        raise InputError(
            f"{src}: no image files found (the folder is empty{'' if cfg.recursive else '; sub-folders are not read with --no-recursive'})"
        )
    # Captions first: images without one are not worth extracting.
    table: CaptionTable | None = None
    no_caption: list[str] = []
    if cfg.captions is not None:
        table = parse_captions(cfg.captions, caption_lookup(entries))
        no_caption = [e.rel for e in entries if e.id not in table.by_id]
        entries = [e for e in entries if e.id in table.by_id]
        if not entries:  # one line, the first refused line's reason in it, rather than a warning and an error
            first = f"; {len(table.bad_lines)} refused, first: line {table.bad_lines[0][0]}: {table.bad_lines[0][1]}"
            raise InputError(
                f"{cfg.captions}: no caption matches an image file in {src} ({table.n_lines} lines read"
                f"{first if table.bad_lines else ''})"
            )
        _report_bad_lines(table, Path(cfg.captions))
    return entries, refused, table, no_caption


def _fingerprint(cfg: ExtractConfig, entries: list[ImageEntry], model: Backbone) -> dict[str, Any]:
    """What finished chunks must match to be reused (and every rank must agree on)."""
    return {
        "format": META_FORMAT,
        "split": cfg.split,
        "chunk": cfg.chunk,
        "files": listing_digest(entries),
        "n_files": len(entries),
        **model.fingerprint(),
    }


def _open_store(store: ChunkStore, entries: list[ImageEntry], chunk: int, n_chunks: int, model: Backbone) -> list[int]:
    """Open the resumable chunk store; returns the indices of the chunks reused."""
    store.open((model.regions, model.dim))
    if store.discarded:
        note(log, f"partial results in {store.folder} are from a different file list or backbone; starting over")
    reused = sorted(i for i in store.chunks if i < n_chunks)
    reused_files = sum(_chunk_len(entries, chunk, i) for i in reused)
    if reused:
        log.info(f"resuming: {len(reused)} of {n_chunks} chunks ({reused_files} files) already extracted")
    return reused


def _run_chunks(
    model: Backbone,
    store: ChunkStore,
    entries: list[ImageEntry],
    cfg: ExtractConfig,
    indices: Sequence[int],
    n_chunks: int,
    on_chunk: Callable[[int, int], None] | None,
    desc: str,
    progress: bool,
    rank: int,
    total: int,
    initial: int,
) -> tuple[int, float]:
    """Extract the chunks ``indices``, saving each; returns (files computed, seconds).

    A chunk is read in groups of ``cfg.batch_size`` files from its own first file, whoever
    extracts it, so its features are those of a single-process run.
    """
    computed, compute_seconds, chunk = 0, 0.0, cfg.chunk
    bar = tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc=desc,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool, _deterministic(model.device):
            for saved, index in enumerate(indices, 1):
                part = entries[index * chunk : (index + 1) * chunk]
                t0 = time.perf_counter()
                feats, kept, skipped = _extract_chunk(model, part, cfg.batch_size, pool, bar.update)
                compute_seconds += time.perf_counter() - t0
                computed += len(part)
                store.save(index, feats, kept, skipped)
                if on_chunk is not None:
                    on_chunk(index, n_chunks)
                stop_hook_for_tests(rank, saved)
    finally:
        bar.close()
    return computed, compute_seconds


def _assemble_rows(
    store: ChunkStore, entries: list[ImageEntry], chunk: int, n_chunks: int, refused: list[tuple[str, str]]
) -> tuple[list[ImageEntry], list[tuple[str, str]]]:
    """The kept rows in file order and every skipped file with its reason."""
    rows: list[ImageEntry] = []
    skipped_all: list[tuple[str, str]] = list(refused)
    for index in range(n_chunks):
        rec = store.chunks[index]
        part = entries[index * chunk : (index + 1) * chunk]
        rows.extend(part[i] for i in rec["kept"])
        skipped_all.extend((s[0], s[1]) for s in rec["skipped"])
    return rows, skipped_all


def _check_config(cfg: ExtractConfig) -> None:
    if not cfg.split or any(c in cfg.split for c in "/\\\n") or cfg.split.startswith("."):
        raise InputError(f"--split {cfg.split!r}: not a valid split name")
    for name in ("captions_per_image", "batch_size", "chunk"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    check_precision(cfg.precision)
    check_runtime(cfg.runtime, MEASURED_RUNTIMES)
    if cfg.max_boxes is not None and cfg.max_boxes < 1:
        raise InputError(f"--max-boxes {cfg.max_boxes}: must be a positive integer")


def _report_bad_lines(table: CaptionTable, path: Path) -> None:
    if not table.bad_lines:
        return
    shown = "; ".join(f"line {n}: {why}" for n, why in table.bad_lines[:_PRINT_LIMIT])
    more = (
        f"; ... {len(table.bad_lines) - _PRINT_LIMIT} more in {META_NAME}"
        if len(table.bad_lines) > _PRINT_LIMIT
        else ""
    )
    log.warning(f"{path}: {len(table.bad_lines)} caption lines ignored: {shown}{more}")


def _write_dataset(
    out: Path,
    split: str,
    model: Backbone,
    store: ChunkStore,
    entries: Sequence[ImageEntry],
    chunk: int,
    n_chunks: int,
    rows: Sequence[ImageEntry],
    table: CaptionTable | None,
    cfg: ExtractConfig,
    src: Path,
) -> dict[str, Any]:
    """Write the split's files (features streamed from the chunks), each atomically."""
    k = cfg.captions_per_image
    caps: list[str] | None = None
    repeated = truncated = 0
    if table is not None:
        caps = []
        for e in rows:
            mine = table.by_id[e.id]
            repeated += len(mine) < k
            truncated += len(mine) > k
            caps.extend(fit_captions(mine, k))
        if repeated:
            log.warning(f"{repeated} image(s) have fewer than {k} captions; theirs were repeated cyclically")
        if k == 1 and len(rows) % 5 == 0:
            log.warning(
                "1 caption per image with a multiple of 5 images looks like the repeated "
                "SCAN layout to precomp readers; consider --captions-per-image 5"
            )

    ims_path = out / f"{split}_ims.npy"
    with atomic_path(ims_path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), model.regions, model.dim))
        at = 0
        for index in range(n_chunks):
            part = store.load(index)
            arr[at : at + len(part)] = part
            at += len(part)
        arr.flush()
        del arr
    if cfg.relative_paths:
        paths = [os.path.relpath(e.path, out.resolve()) for e in rows]
    else:
        paths = [str(e.path) for e in rows]
    atomic_write_text(out / f"{split}_ids.txt", _lines([e.id for e in rows]))
    atomic_write_text(out / f"{split}_images.txt", _lines(paths))
    caps_path = out / f"{split}_caps.txt"
    if caps is not None:
        atomic_write_text(caps_path, _lines(caps))
    elif caps_path.exists():
        caps_path.unlink()  # from an earlier run: it would not match these rows
        note(log, f"removed {caps_path} from an earlier run (no --captions given this time)")

    files = {
        "images": str(ims_path),
        "ids": str(out / f"{split}_ids.txt"),
        "image_paths": str(out / f"{split}_images.txt"),
    }
    if caps is not None:
        files["captions"] = str(caps_path)
    bad = table.bad_lines if table is not None else []
    return {
        "split": split,
        "backbone": model.name,
        "image_size": model.image_size,
        "dim": model.dim,
        "regions": model.regions,
        "precision": model.precision,
        "runtime": model.runtime,
        "shape": [len(rows), model.regions, model.dim],
        "backbone_info": model.describe(),
        "images_dir": str(src.resolve()),
        "n_files": len(entries),
        "n_images": len(rows),
        "captions_file": cfg.captions,
        "captions_per_image": k if caps is not None else None,
        "n_captions": len(caps) if caps is not None else 0,
        "captions_repeated": repeated,
        "captions_truncated": truncated,
        "bad_caption_lines": [{"line": n, "reason": why} for n, why in _head(bad)],
        "bad_caption_lines_total": len(bad),
        "config": asdict(cfg),
        "files": files,
    }


def _write_meta(out: Path, summary: dict[str, Any]) -> None:
    """``extract_meta.json``: this split's record under ``splits`` (other splits kept) and
    the backbone facts at the top level."""
    path = out / META_NAME
    meta: dict[str, Any] = {}
    if path.is_file():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        meta = {}
    splits = meta.get("splits", {}) if isinstance(meta.get("splits"), dict) else {}
    record = dict(summary)
    record["skipped"] = _head(record["skipped"])
    record["skipped_total"] = len(summary["skipped"])
    record["no_caption"] = _head(record["no_caption"])
    record["no_caption_total"] = len(summary["no_caption"])
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for name, other in splits.items():
        if name != summary["split"] and (other.get("backbone"), other.get("dim")) != (
            summary["backbone"],
            summary["dim"],
        ):
            log.warning(
                f"split {name!r} in {out} was extracted with {other.get('backbone')} "
                f"(dim {other.get('dim')}); {summary['split']!r} now uses {summary['backbone']} (dim {summary['dim']})"
            )
    splits[summary["split"]] = record
    meta = {
        "format": META_FORMAT,
        "eslmatch_version": __version__,
        "backbone": summary["backbone"],
        "image_size": summary["image_size"],
        "dim": summary["dim"],
        "regions": summary["regions"],
        "splits": splits,
    }
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
