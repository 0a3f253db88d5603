"""Extraction under ``torchrun``: who does which chunk, and how the ranks agree.

:func:`eslmatch.extract.extract_folder` runs as one job of ``WORLD_SIZE`` processes when
torchrun launched it. The work is cut in the same chunks as a single process's (the unit of
resumption): the chunks not finished yet are dealt round-robin (on a fresh run, chunk ``i``
goes to rank ``i % world``); each rank writes whole chunk files into the shared chunk store;
rank 0 then assembles the final files exactly as one process would.

The ranks only talk through small object collectives on a gloo group (also on CUDA): after
each stage every rank reports success or its error (:meth:`ExtractJob.stage`), so an error on
one rank stops every rank with a non-zero exit, reported once by rank 0, instead of leaving
the others waiting. A rank that dies outright is caught by torchrun (which stops the others)
or, at the latest, by the collective timeout.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..distributed import env_world_size
from ..errors import EslmatchError
from ..utils import resolve_device

# Test-only hooks: stop a process after it saved N chunks ("exit": hard exit as if killed;
# "raise": an ordinary error). Used by tests/test_extract_torchrun.py.
STOP_AFTER_ENV = "ESLMATCH_TEST_STOP_AFTER_CHUNKS"
STOP_RANK_ENV = "ESLMATCH_TEST_STOP_RANK"
STOP_MODE_ENV = "ESLMATCH_TEST_STOP_MODE"
STOP_EXIT_CODE = 75


class JobFailed(EslmatchError):
    """A stage failed on at least one rank; every rank raises this.

    Attributes:
        reported: the message was already printed (by rank 0, through the extractor's
            ``log``), so the command line exits 1 without printing it again.
    """

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


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


class ExtractJob:
    """The processes extracting one folder together; a trivial job of one process alone.

    Attributes:
        rank, world: this process's rank and the number of processes.
        local_rank: its rank on this node (picks the GPU).
    """

    def __init__(
        self, rank: int = 0, world: int = 1, local_rank: int = 0, group: Any = None, owned: bool = False
    ) -> None:
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.group = group
        self._owned = owned  # this job created the default process group (and destroys it)

    @classmethod
    def join(cls, distributed: bool | None = None, timeout_minutes: float = 60.0) -> ExtractJob:
        """Join torchrun's job (``WORLD_SIZE > 1`` and ``distributed`` not ``False``), or run alone.

        The group is gloo whatever the device (only small objects travel); ``timeout_minutes``
        bounds every wait for the other ranks.
        """
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
        return cls(rank=rank, world=world, local_rank=local_rank, group=group, owned=owned)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device this rank extracts on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when
        CUDA is present (CPU otherwise for ``auto``); an explicit ``cuda:N`` or ``cpu`` as given."""
        if not self.distributed:
            return name
        dev = resolve_device(name, local_rank=self.local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return str(dev)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable), in rank order; ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @contextmanager
    def stage(self, name: str, log: Callable[[str], None]) -> Iterator[None]:
        """Run a stage on every rank, then agree on its outcome.

        Alone: errors pass through untouched. In a job: every rank reports success or its
        error line; if any failed, rank 0 prints the combined message with ``log`` and every
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
            log(f"eslmatch: error: {message}")
        dist.barrier(group=self.group)
        raise JobFailed(message if self.is_main else f"rank {self.rank}: stopped ({name}): {message}", True) from cause

    def close(self) -> None:
        """Leave the process group if this job created it."""
        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
            self._owned = False


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
