"""The all-pairs scoring engine: every caption against every image, tiled, memory-bounded.

The image side is transformed once per image (``Z_l = Y_l @ D_l^T``, width Dt, see
:meth:`eslmatch.model.esl.ESLModel.prepare_images`) and each caption's levels once per
caption, so one matrix product per tile covers every level and nothing is recomputed per
pair. Captions are sorted by length and cut into chunks of (nearly) equal length, so padding
costs almost nothing; images are cut into tiles. A tile's affinities ``(m, W, n, R)`` are
pooled right after their product, so the ``N x M x W x R`` tensor never exists whole and a
tile's working set stays within ``budget_bytes``.

Three paths compute the same scores (see ``docs/scoring.md``):

- no autograd (evaluation, retrieval): products into reused buffers and in-place pooling
  (:func:`eslmatch.scoring.pooling.pool_tile_`), with cache-sized tiles on CPU;
- autograd (training): out-of-place pooling (:func:`eslmatch.scoring.pooling.pool_tile`);
- CUDA: the out-of-place pooling compiled by ``torch.compile`` into fused kernels, with the
  plain paths as fallback.

How it runs (memory budget, product precision, CPU workers, compilation) is a
:class:`~eslmatch.scoring.options.ScoringOptions` passed to each call.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import InputError
from .options import PoolingParams, ScoringOptions
from .pooling import padding_bias, pool_tile, pool_tile_
from .tiles import AUTOGRAD_BUFFERS, INPLACE_BUFFERS, TilePlan, check_lengths, plan_tiles

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

# On CPU, tiles sized so the three in-place buffers stay in the last-level cache (measured on
# a 2-core Zen 4 with 32 MiB L3, see benchmarks/results/); elsewhere only the budget limits.
_CPU_TILE_ELEMENTS = 1 << 20
_CPU_TILE_COLUMNS = 2304


def score_tiles(
    caption_feats: Tensor,
    caption_lengths: Tensor,
    image_side: Tensor,
    image_lengths: Tensor,
    pooling: PoolingParams,
    options: ScoringOptions | None = None,
) -> Tensor:
    """Scores of every (image, caption) pair.

    With autograd enabled and any input requiring grad, the out-of-place path runs and the
    result is differentiable; otherwise the in-place fast path runs.

    Args:
        caption_feats: caption level features ``(M, W, Dt)``.
        caption_lengths: ``(M,)`` real tokens per caption (>= 1).
        image_side: transformed image level features ``(N, R, Dt)`` (see
            :meth:`eslmatch.model.correspondence.Correspondence.image_side`).
        image_lengths: ``(N,)`` real regions per image (>= 1).
        pooling: softmax scale, leaky slope and l2 epsilon of the pooling.
        options: how the engine runs (``None``: the defaults).
    Returns:
        ``(N, M)`` scores, rows images, columns captions.
    """
    opt = options or ScoringOptions()
    scale, slope, eps = pooling
    if caption_feats.dim() != 3 or image_side.dim() != 3:
        raise InputError(
            f"expected caption features (M, W, Dt) and image features (N, R, Dt), got "
            f"{tuple(caption_feats.shape)} and {tuple(image_side.shape)}"
        )
    m_caps, w_all, dt = caption_feats.shape
    n_img, r_all, dt_img = image_side.shape
    if dt != dt_img:
        raise InputError(f"caption features have width {dt} but image features {dt_img}")
    if m_caps == 0 or n_img == 0:
        raise InputError(f"nothing to score: {n_img} images and {m_caps} captions")
    check_lengths(caption_lengths, w_all, "caption")
    check_lengths(image_lengths, r_all, "image")
    if image_side.dtype != caption_feats.dtype:
        raise InputError(f"caption features are {caption_feats.dtype} but image features {image_side.dtype}")

    device = caption_feats.device
    grad = torch.is_grad_enabled() and (
        caption_feats.requires_grad or image_side.requires_grad or (isinstance(scale, Tensor) and scale.requires_grad)
    )
    pool_fn = _compiled_pooling(opt.compile, device)
    on_cpu = device.type == "cpu"
    plan = plan_tiles(
        caption_lengths,
        image_lengths,
        opt.budget_bytes,
        caption_feats.element_size(),
        buffers=AUTOGRAD_BUFFERS if grad else INPLACE_BUFFERS,
        tile_elements=opt.tile_elements if opt.tile_elements is not None else (_CPU_TILE_ELEMENTS if on_cpu else None),
        tile_columns=_CPU_TILE_COLUMNS if on_cpu else None,
    )
    inputs = _Inputs.build(
        caption_feats, caption_lengths.to(device), image_side, image_lengths.to(device), plan, opt.precision, grad
    )
    workers = opt.workers
    with _matmul_precision(opt.precision, device):
        if grad:
            return _score_autograd(inputs, plan, scale, slope, eps, pool_fn or pool_tile)
        with torch.no_grad():
            if not on_cpu or pool_fn is not None:
                workers = 1
            elif workers is None:
                workers = torch.get_num_threads()
            return _score_inplace(
                inputs, plan, float(scale), slope, eps, pool_fn, fast_tanh=opt.precision == "bf16", workers=workers
            )


def score_tiles_distributed(
    caption_feats: Tensor,
    caption_lengths: Tensor,
    image_side: Tensor,
    image_lengths: Tensor,
    pooling: PoolingParams,
    options: ScoringOptions | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    """:func:`score_tiles` with the images split across the ranks of ``torch.distributed``.

    Every rank passes the same inputs; rank ``k`` scores the ``k``-th contiguous slice of
    images and the blocks are all-gathered, so every rank returns the full ``(N, M)`` matrix
    (equal to one process's). Evaluation only: the result carries no gradient. Without an
    initialised process group this is :func:`score_tiles` under ``no_grad``.

    Args:
        group: process group (``None``: the default group).
    Returns:
        ``(N, M)`` scores on every rank.
    """
    with torch.no_grad():
        if not (dist.is_available() and dist.is_initialized()):
            return score_tiles(caption_feats, caption_lengths, image_side, image_lengths, pooling, options)
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        n_img, m_caps = image_side.shape[0], caption_feats.shape[0]
        per_rank = math.ceil(n_img / world)
        i0, i1 = min(rank * per_rank, n_img), min((rank + 1) * per_rank, n_img)
        block = caption_feats.new_zeros(per_rank, m_caps)
        if i1 > i0:
            block[: i1 - i0] = score_tiles(
                caption_feats, caption_lengths, image_side[i0:i1], image_lengths[i0:i1], pooling, options
            )
        parts = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(parts, block, group=group)
        return torch.cat(parts)[:n_img]


# ---------------------------------------------------------------------------- internals
@dataclass
class _Inputs:
    """Per-call tensors shared by the tiles (padded regions zeroed, product dtype chosen)."""

    captions: Tensor  # (M, W, Dt)
    caption_lengths: Tensor  # (M,) long
    images: Tensor  # (N, R, Dt), padded regions zero, possibly bf16
    image_lengths: Tensor  # (N,) long
    gemm_dtype: torch.dtype

    @classmethod
    def build(
        cls,
        captions: Tensor,
        caption_lengths: Tensor,
        image_side: Tensor,
        image_lengths: Tensor,
        plan: TilePlan,
        precision: str,
        grad: bool,
    ) -> _Inputs:
        r = plan.regions
        z = image_side[:, :r]
        if bool((image_lengths < r).any()):
            valid = torch.arange(r, device=z.device)[None, :] < image_lengths[:, None]
            z = z * valid[..., None].to(z.dtype) if grad else z.masked_fill(~valid[..., None], 0.0)
        gemm_dtype = torch.bfloat16 if precision == "bf16" else captions.dtype
        z = z.to(gemm_dtype).contiguous()
        return cls(captions, caption_lengths, z, image_lengths, gemm_dtype)

    def chunk(self, idx: Tensor, w: int, padded: bool, grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Captions ``idx`` padded to ``w`` words: ``(m*w, Dt)`` rows, ``(m, 1)`` lengths, bias."""
        lens = self.caption_lengths[idx]
        x = self.captions[idx, :w]
        bias = None
        if padded:
            valid = torch.arange(w, device=x.device)[None, :] < lens[:, None]
            x = x * valid[..., None].to(x.dtype) if grad else x.masked_fill_(~valid[..., None], 0.0)
            bias = padding_bias(valid, self.captions.dtype)[:, :, None, None]
        x = x.reshape(-1, x.shape[-1]).to(self.gemm_dtype)
        return x, lens.to(self.captions.dtype)[:, None], bias

    def tile(self, i0: int, i1: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Images ``i0:i1``: ``(n*R, Dt)`` rows, ``(1, n)`` lengths, softmax padding bias."""
        z = self.images[i0:i1]
        lens = self.image_lengths[i0:i1]
        r = z.shape[1]
        bias = None
        if bool((lens < r).any()):
            valid = torch.arange(r, device=z.device)[None, :] < lens[:, None]
            bias = padding_bias(valid, self.captions.dtype)[None, None]
        return z.reshape(-1, z.shape[-1]), lens.to(self.captions.dtype)[None, :], bias


def _score_inplace(
    inp: _Inputs,
    plan: TilePlan,
    scale: float,
    slope: float,
    eps: float,
    pool_fn: Callable[..., Tensor] | None,
    fast_tanh: bool,
    workers: int = 1,
) -> Tensor:
    """No-autograd scoring; ``workers > 1`` runs that many single-threaded CPU workers."""
    device = inp.captions.device
    n_img, m_caps = inp.images.shape[0], inp.captions.shape[0]
    size = plan.max_tile_elements()
    tiles = [inp.tile(i0, i1) for i0, i1 in plan.image_tiles]
    chunks = [
        (plan.caption_order[c0:c1].to(device), w, pad)
        for (c0, c1), w, pad in zip(plan.caption_chunks, plan.chunk_widths, plan.chunk_padded)
    ]
    out_sorted = torch.empty(m_caps, n_img, dtype=inp.captions.dtype, device=device)
    items = [(ci, ti) for ci in range(len(chunks)) for ti in range(len(tiles))]
    workers = max(1, min(workers, len(items)))

    def run(queue: Iterator[tuple[int, int]]) -> None:
        bufs = _Workspace(size, inp, pool_fn is None)
        current = -1
        chunk: tuple[Tensor, Tensor, Tensor | None] | None = None
        for ci, ti in queue:
            if ci != current:
                current, chunk = ci, inp.chunk(*chunks[ci], grad=False)
            assert chunk is not None
            x, word_len, word_bias = chunk
            z, region_len, region_bias = tiles[ti]
            (c0, c1), (i0, i1) = plan.caption_chunks[ci], plan.image_tiles[ti]
            shape = (c1 - c0, chunks[ci][1], i1 - i0, plan.regions)
            a = bufs.product(x, z, shape)
            if pool_fn is not None:
                s = pool_fn(a, word_len, region_len, scale, slope, eps, word_bias, region_bias)
            else:
                t, e = bufs.work(shape)
                s = pool_tile_(a, t, e, word_len, region_len, scale, slope, eps, word_bias, region_bias, fast_tanh)
            out_sorted[c0:c1, i0:i1] = s

    if workers == 1:
        run(iter(items))
    else:
        _run_workers(run, items, workers)
    return _unsort(out_sorted, plan.caption_order)


class _Workspace:
    """Flat buffers reused by every tile of one worker (no allocation per tile)."""

    def __init__(self, size: int, inp: _Inputs, work: bool) -> None:
        dtype, device = inp.captions.dtype, inp.captions.device
        self.a = torch.empty(size, dtype=dtype, device=device)
        self.low = torch.empty(size, dtype=inp.gemm_dtype, device=device) if inp.gemm_dtype != dtype else None
        self.t = torch.empty(size, dtype=dtype, device=device) if work else None
        self.e = torch.empty(size, dtype=dtype, device=device) if work else None

    def product(self, x: Tensor, z: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """``x @ z^T`` into the product buffer, viewed as ``shape`` ``(m, W, n, R)``."""
        count = x.shape[0] * z.shape[0]
        a = self.a[:count].view(x.shape[0], z.shape[0])
        _product(x, z, a, None if self.low is None else self.low[:count].view_as(a))
        return a.view(shape)

    def work(self, shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
        count = math.prod(shape)
        assert self.t is not None and self.e is not None
        return self.t[:count].view(shape), self.e[:count].view(shape)


def _run_workers(run: Callable[[Iterator[tuple[int, int]]], None], items: list[tuple[int, int]], workers: int) -> None:
    """Run ``run`` in ``workers`` threads, each single-threaded, pulling items in order.

    Independent single-threaded workers beat one multi-threaded op stream on CPU: no
    fork/join per elementwise pass, and a busy core delays only its own worker.
    """
    lock = threading.Lock()
    failed = threading.Event()
    source = iter(items)

    def pull() -> Iterator[tuple[int, int]]:
        while not failed.is_set():
            with lock:
                item = next(source, None)
            if item is None:
                return
            yield item

    def worker() -> None:
        torch.set_num_threads(1)
        try:
            run(pull())
        except BaseException:
            failed.set()  # the others stop at their next tile
            raise

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(threads)


def _score_autograd(
    inp: _Inputs,
    plan: TilePlan,
    scale: Tensor | float,
    slope: float,
    eps: float,
    pool_fn: Callable[..., Tensor],
) -> Tensor:
    dtype = inp.captions.dtype
    order = plan.caption_order.to(inp.captions.device)
    tiles = [inp.tile(i0, i1) for i0, i1 in plan.image_tiles]
    rows = []
    for (c0, c1), w, pad in zip(plan.caption_chunks, plan.chunk_widths, plan.chunk_padded):
        x, word_len, word_bias = inp.chunk(order[c0:c1], w, pad, grad=True)
        blocks = []
        for (i0, i1), (z, region_len, region_bias) in zip(plan.image_tiles, tiles):
            a = (x @ z.t()).to(dtype).view(c1 - c0, w, i1 - i0, plan.regions)
            blocks.append(pool_fn(a, word_len, region_len, scale, slope, eps, word_bias, region_bias))
        rows.append(torch.cat(blocks, dim=1))
    return _unsort(torch.cat(rows), plan.caption_order)


def _unsort(out_sorted: Tensor, order: Tensor) -> Tensor:
    """``(M, N)`` rows in length order -> ``(N, M)`` columns in the callers' order."""
    inverse = torch.argsort(order).to(out_sorted.device)
    return out_sorted.t()[:, inverse]  # one gather, contiguous (N, M)


def _product(x: Tensor, z: Tensor, out: Tensor, low: Tensor | None) -> None:
    """``out = x @ z^T``; with reduced-precision inputs the product goes through ``low``."""
    if low is None:
        torch.mm(x, z.t(), out=out)
        return
    if x.is_cuda:
        try:
            out.copy_(torch.mm(x, z.t(), out_dtype=out.dtype))  # fp32 output, no bf16 rounding
            return
        except (RuntimeError, TypeError):
            pass
    torch.mm(x, z.t(), out=low)
    out.copy_(low)


@contextmanager
def _matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Allow TF32 products on CUDA for the duration of one call (restored afterwards)."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):
        old = mm.fp32_precision
        mm.fp32_precision = "tf32"
        try:
            yield
        finally:
            mm.fp32_precision = old
    else:
        old_flag = mm.allow_tf32
        mm.allow_tf32 = True
        try:
            yield
        finally:
            mm.allow_tf32 = old_flag


# Compiled pooling functions per device type; a failed compilation is remembered as None.
_COMPILED: dict[str, Callable[..., Tensor] | None] = {}


def _compiled_pooling(mode: str, device: torch.device) -> Callable[..., Tensor] | None:
    """The pooling compiled by ``torch.compile`` when ``mode`` asks for it, else ``None``."""
    if mode == "never" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    key = device.type
    if key not in _COMPILED:
        try:
            compiled = torch.compile(pool_tile, dynamic=True)
        except Exception as exc:  # noqa: BLE001 - any backend problem means: use the plain path
            warnings.warn(f"torch.compile is unavailable ({exc}); using the plain pooling", stacklevel=3)
            compiled = None
        _COMPILED[key] = None if compiled is None else _guarded(compiled, key)
    return _COMPILED[key]


def _guarded(compiled: Callable[..., Tensor], key: str) -> Callable[..., Tensor]:
    """Run ``compiled``; if a call fails, warn once and use the plain pooling from then on."""
    state = {"failed": False}

    def run(*args: Any) -> Tensor:
        if not state["failed"]:
            try:
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - compiler/toolchain failures are not user errors
                warnings.warn(
                    f"compiled pooling failed ({type(exc).__name__}: {exc}); using the plain pooling", stacklevel=2
                )
                state["failed"] = True
                _COMPILED[key] = None
        return pool_tile(*args)

    return run
