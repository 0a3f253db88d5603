"""torchrun: the one distributed context of eslmatch (see ``docs/distributed.md``).

Commands read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it everything runs in one process and nothing here
talks to other processes. A :class:`DistContext` is where this process stands in the job:

- training (:func:`init_distributed`) makes N ranks equal one process with the whole global
  batch: every rank takes a contiguous slice of it (:func:`rank_slice`); embeddings are
  all-gathered WITH gradients (:func:`gather_padded`), so the hinge loss and its hardest
  negatives are the global batch's; each rank's share of the loss is multiplied by the world
  size, which DDP's averaging divides back out; the region BatchNorm takes its statistics over
  every rank's valid rows (:func:`eslmatch.model.encoders.enable_sync_batchnorm`);
- jobs that deal work out (feature extraction, gallery builds; :meth:`DistContext.join`) talk
  only through small object collectives on a gloo group: work is cut in units (chunks,
  shards) dealt round-robin (:func:`deal`), and after each stage every rank reports success or
  its error (:meth:`DistContext.stage`), so an error on one rank stops every rank with a
  non-zero exit, reported once by rank 0.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .errors import EslmatchError, JobFailed
from .utils import resolve_device

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in the job.

    Attributes:
        world_size: number of processes (1 without torchrun).
        rank: this process's global rank (0 writes checkpoints and logs).
        local_rank: its rank on this node (picks the GPU).
        device: the device this process computes on.
        group: the process group used for the loss and BatchNorm collectives (separate
            from DDP's own, so their collectives never interleave); ``None`` when alone.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: ProcessGroup | None = None
    owned: bool = False  # this context created the default process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, distributed: bool | None = None, timeout_minutes: float = 60.0) -> DistContext:
        """Join torchrun's job for dealt-out work (``WORLD_SIZE > 1`` and ``distributed`` not
        ``False``), or run alone. The group is gloo whatever the device (only small objects
        travel); ``timeout_minutes`` bounds every wait for the other ranks."""
        world = env_world_size() if distributed is not False else 1
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise EslmatchError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group(backend="gloo", init_method="env://", world_size=world, rank=rank, timeout=timeout)
        group = dist.new_group(backend="gloo", timeout=timeout)
        return cls(world_size=world, rank=rank, local_rank=local_rank, group=group, owned=owned)

    def device_for(self, name: str) -> str:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA
        is present (CPU otherwise for ``auto``); an explicit ``cuda:N`` or ``cpu`` as given."""
        if not self.distributed:
            return name
        return str(_train_device(name, self.local_rank))

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (small, trusted in-job data), in rank order; ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size  # filled in by all_gather_object
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Run a stage on every rank, then agree on its outcome.

        Alone: errors pass through untouched. In a job: every rank reports success or its
        error line; if any failed, rank 0 logs the combined message as an error and every
        rank raises :class:`JobFailed` (after rank 0 printed, so torchrun stopping the
        others cannot cut the message off).
        """
        if not self.distributed:
            yield
            return
        mine: str | None = None
        cause: BaseException | None = None
        try:
            yield
        except Exception as exc:  # reported to every rank; KeyboardInterrupt passes through
            mine, cause = error_text(exc), exc
        message = combine_errors(self.gather(mine))
        if message is None:
            return
        if self.is_main:
            log.error(message)
        dist.barrier(group=self.group)
        raise JobFailed(message if self.is_main else f"rank {self.rank}: stopped ({name}): {message}", True) from cause

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise EslmatchError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from exc


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: float = 60.0) -> DistContext:
    """Join the torchrun job described by the environment, or run alone.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (each rank takes ``cuda:LOCAL_RANK``) ...
        backend: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"nccl"`` or ``"gloo"``.
        timeout_minutes: collective timeout (rank 0 validates while the others wait).
    """
    world = env_world_size()
    if world <= 1:
        return DistContext(device=_train_device(device, 0))
    if not dist.is_available():
        raise EslmatchError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _train_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise EslmatchError(f"dist_backend must be 'auto', 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise EslmatchError("the nccl backend needs CUDA devices; use dist_backend=gloo on CPU")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    group = dist.new_group(backend=backend)
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, device=dev, group=group)


def _train_device(device: str, local_rank: int) -> torch.device:
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def world_size(group: ProcessGroup | None = None) -> int:
    """Processes in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if this process joined one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.group)


def broadcast_value(ctx: DistContext, value: float) -> float:
    """Rank 0's ``value`` on every rank (a barrier as well)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0, group=ctx.group)
    return float(t.item())


def sum_value(ctx: DistContext, value: Tensor) -> Tensor:
    """Sum of a (detached) tensor over every rank; identity when alone."""
    if not ctx.distributed:
        return value
    t = value.detach().clone()
    dist.all_reduce(t, group=ctx.group)
    return t


def rank_slice(global_batch: int, ctx: DistContext) -> slice:
    """The contiguous share of a global batch that ``ctx.rank`` trains on."""
    if global_batch % ctx.world_size:
        raise EslmatchError(
            f"batch_size {global_batch} (the global batch) must be divisible by the {ctx.world_size} processes"
        )
    per = global_batch // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's ``(b, ...)`` along rows; backward: the sum over ranks of the
    gradient of this rank's rows (each rank's loss used them)."""

    @staticmethod
    def forward(fctx: Any, x: Tensor, group: Any, world: int, rank: int) -> Tensor:
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        fctx.group, fctx.world, fctx.rank, fctx.rows = group, world, rank, x.shape[0]
        return torch.cat(out)

    @staticmethod
    def backward(fctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad = grad.contiguous()
        b = fctx.rows
        if dist.get_backend(fctx.group) == "nccl":
            mine = torch.empty_like(grad[:b])
            dist.reduce_scatter_tensor(mine, grad, group=fctx.group)
        else:  # gloo has no reduce-scatter
            total = grad.clone()
            dist.all_reduce(total, group=fctx.group)
            mine = total[fctx.rank * b : (fctx.rank + 1) * b]
        return mine, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward: the sum over ranks of the gradients (every rank's loss
    depends on the total)."""

    @staticmethod
    def forward(fctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        fctx.group = group
        return out

    @staticmethod
    def backward(fctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=fctx.group)
        return out, None


def all_reduce_with_grad(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum of ``x`` over the ranks of ``group`` (default: all), differentiable."""
    return _AllReduceSum.apply(x, group if group is not None else dist.group.WORLD)


def gather_padded(x: Tensor, ctx: DistContext) -> Tensor:
    """All-gather ``x (b, *S)`` from every rank, with gradients, into ``(world * b, *S_max)``.

    Every rank must hold the same ``b``; they may differ along the other axes (regions,
    words): each is zero-padded to the largest first. Rank r's rows come at
    ``[r*b, (r+1)*b)``; the backward pass gives every rank the gradient of its own rows
    summed over all ranks.
    """
    if not ctx.distributed:
        return x
    if x.dim() > 1:
        sizes = torch.tensor(list(x.shape[1:]), dtype=torch.long, device=x.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=ctx.group)
        pad: list[int] = []
        for have, want in zip(reversed(x.shape[1:]), reversed(sizes.tolist())):
            pad += [0, int(want) - have]
        if any(pad):
            x = F.pad(x, pad)
    return _AllGatherRows.apply(x, ctx.group, ctx.world_size, ctx.rank)


def gather_lengths(lengths: Tensor, ctx: DistContext) -> Tensor:
    """All-gather a ``(b,)`` tensor without gradients -> ``(world * b,)``."""
    if not ctx.distributed:
        return lengths
    out = [torch.empty_like(lengths) for _ in range(ctx.world_size)]
    dist.all_gather(out, lengths.contiguous(), group=ctx.group)
    return torch.cat(out)


def free_port() -> int:
    """A TCP port free on this host now (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- dealt-out jobs
# Test-only hooks: stop a process after it saved N chunks ("exit": hard exit as if killed;
# "raise": an ordinary error). Used by tests/test_extract_torchrun.py.
STOP_AFTER_ENV = "ESLMATCH_TEST_STOP_AFTER_CHUNKS"
STOP_RANK_ENV = "ESLMATCH_TEST_STOP_RANK"
STOP_MODE_ENV = "ESLMATCH_TEST_STOP_MODE"
STOP_EXIT_CODE = 75


def error_text(exc: BaseException) -> str:
    """One line describing ``exc`` (the message alone for an :class:`EslmatchError`)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, EslmatchError):
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def combine_errors(errors: Sequence[str | None]) -> str | None:
    """The one message for every rank's outcome of a stage (``None``: all succeeded).

    ``errors[r]`` is rank ``r``'s error line or ``None``. The same error on every rank is
    given once, as is; otherwise each distinct error is prefixed with the ranks that hit it.
    """
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None
    distinct = list(dict.fromkeys(e for _, e in failed))
    if len(distinct) == 1 and len(failed) == len(errors):
        return distinct[0]
    parts = []
    for msg in distinct:
        ranks = [r for r, e in failed if e == msg]
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        parts.append(f"{who} of {len(errors)}: {msg}")
    return "; ".join(parts)


def deal(pending: Sequence[int], rank: int, world: int) -> list[int]:
    """The chunks of ``pending`` (sorted indices not finished yet) that ``rank`` extracts:
    every ``world``-th one, starting at its rank (chunk ``i`` -> rank ``i % world`` on a
    fresh run; a resumed run balances what is left)."""
    return list(pending[rank::world])


def stop_hook_for_tests(rank: int, saved: int) -> None:
    """Test-only: stop this process after it saved ``saved`` chunks when the environment
    asks for it (``ESLMATCH_TEST_STOP_AFTER_CHUNKS=N``, optionally ``ESLMATCH_TEST_STOP_RANK``
    and ``ESLMATCH_TEST_STOP_MODE=exit|raise``)."""
    after = os.environ.get(STOP_AFTER_ENV)
    if not after or saved != int(after):
        return
    only = os.environ.get(STOP_RANK_ENV)
    if only is not None and int(only) != rank:
        return
    if os.environ.get(STOP_MODE_ENV, "exit") == "raise":
        raise EslmatchError(f"test hook: rank {rank} stopped after {saved} chunk(s)")
    os._exit(STOP_EXIT_CODE)  # as if killed: no cleanup, no goodbye to the other ranks
