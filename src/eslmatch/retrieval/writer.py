"""The one writer path: a :class:`~eslmatch.retrieval.sources.Source` encoded into a store's sink.

Both stores take items the same way. A *sink* cuts the source's positions into chunks (a file
store's shards, a Milvus store's batches), says which are written already (so a killed write
resumes) and takes the encoded items of a chunk. :func:`write_source` deals the pending chunks
over the ranks of a torchrun job (one process alone: all of them), encodes each and hands it
over. What the chunks become (shard files, Milvus entities) and when they are committed is the
sink's business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tqdm.auto import tqdm

from ..errors import EslmatchError
from .encoding import FP32, Encoded, Encoding
from .sources import CaptionSource, PhotoSource, Source

if TYPE_CHECKING:
    from ..distributed import DistContext
    from ..model.base import MatchingModel

log = logging.getLogger(__name__)

# Test hook: called with the chunk number after each chunk is complete (e.g. to simulate a kill).
AFTER_CHUNK: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Chunk:
    """Positions ``[start, stop)`` of the source, written together as chunk ``number``."""

    number: int
    start: int
    stop: int


class ChunkOut(Protocol):
    def put(self, items: Encoded) -> None: ...


class Sink(Protocol):
    """Where encoded items go (a file store's shard writer, a Milvus store's upserts)."""

    def chunks(self) -> list[Chunk]: ...

    def done(self) -> set[int]: ...

    def todo(self, chunk: Chunk) -> list[int]: ...

    def chunk(self, chunk: Chunk) -> AbstractContextManager[ChunkOut]: ...


@dataclass
class WriteReport:
    """What one write did: items encoded and stored by this process, files skipped."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0


def cut(count: int, size: int, base: int = 0) -> list[Chunk]:
    """Chunks of ``size`` positions covering ``count`` items, numbered from ``base``."""
    return [Chunk(base + i, a, min(count, a + size)) for i, a in enumerate(range(0, count, size))]


def _runs(positions: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``[a, b)`` of sorted positions."""
    if not positions:
        return
    a = prev = positions[0]
    for p in positions[1:]:
        if p != prev + 1:
            yield a, prev + 1
            a = p
        prev = p
    yield a, prev + 1


def write_source(
    model: MatchingModel,
    source: Source,
    sink: Sink,
    *,
    batch_size: int = 256,
    progress: bool = True,
    job: DistContext | None = None,
    how: Encoding = FP32,
) -> WriteReport:
    """Encode the items of ``source`` not yet in ``sink`` (as ``how`` says) and write them,
    chunk by chunk.

    Under torchrun (``job``) each rank encodes its share of the pending chunks; alone, all of
    them. Unreadable photos are skipped, reported (``report``) and counted."""
    from ..distributed import DistContext, deal, stop_hook_for_tests
    from .encode import encode_items

    job = job or DistContext()
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EslmatchError(f"batch size must be a positive integer, got {batch_size!r}")
    out = WriteReport()
    if isinstance(source, PhotoSource) and job.is_main:
        for name, why in source.refused:
            log.warning(f"skipping {name}: {why}")
        out.skipped += source.refused
    done = sink.done()
    pending = [c for c in sink.chunks() if c.number not in done]
    mine = [pending[i] for i in deal(list(range(len(pending))), job.rank, job.world_size)]
    total = sum(c.stop - c.start for c in mine)
    desc = f"{source.kind}s" + (f" (rank {job.rank} of {job.world_size})" if job.distributed else "")
    step = 16 * batch_size if isinstance(source, CaptionSource) else batch_size  # captions: length-batched inside
    with tqdm(total=total, desc=desc, disable=None if progress else True, leave=False, unit="item") as bar:
        for c in mine:
            with sink.chunk(c) as chunk_out:
                for a, b in _runs(sink.todo(c)):
                    for i0 in range(a, b, step):
                        i1 = min(b, i0 + step)
                        items = encode_items(model, source, i0, i1, batch_size, how)
                        for name, why in items.skipped or []:
                            log.warning(f"skipping {name}: {why}")
                        out.skipped += items.skipped or []
                        if items.positions:
                            chunk_out.put(items)
                            out.written += len(items.positions)
                        bar.update(i1 - i0)
            out.chunks += 1
            if AFTER_CHUNK is not None:
                AFTER_CHUNK(c.number)
            stop_hook_for_tests(job.rank, out.chunks)
    return out
