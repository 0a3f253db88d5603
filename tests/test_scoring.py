"""The all-pairs scoring engine against the literal reference scorer, its tiling, autograd,
refusals and the distributed split."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from _models import tiny_gru_model
from _wait import HUNG
from eslmatch.errors import InputError
from eslmatch.scoring import PoolingParams, ScoringOptions, plan_tiles, score_tiles, score_tiles_distributed
from eslmatch.scoring.engine import _compiled_pooling
from eslmatch.scoring.pooling import padding_bias, pool_pair, pool_tile, pool_tile_
from eslmatch.scoring.tiles import AUTOGRAD_BUFFERS as _AUTOGRAD_BUFFERS
from eslmatch.scoring.tiles import INPLACE_BUFFERS as _INPLACE_BUFFERS

VOCAB = 15  # tiny_vocab() ids are below this


def _score(cap, cl, side, il, scale, **options):
    """The engine with the pooling's default slope and epsilon and ``options`` as ScoringOptions."""
    return score_tiles(cap, cl, side, il, PoolingParams(scale), ScoringOptions(**options))


def _score_dist(cap, cl, side, il, scale, **options):
    return score_tiles_distributed(cap, cl, side, il, PoolingParams(scale), ScoringOptions(**options))


def reference_similarity(model, *args):
    return model.reference_similarity(*args)


def pair_affinity(model, x, y):
    return model.pair_affinity(x, y)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def make_inputs(n, r, m, w, seed, img_dim=16, pad_images=True, pad_captions=True, min_len=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, r, img_dim, generator=g)
    il = torch.randint(1, r + 1, (n,), generator=g) if pad_images else torch.full((n,), r)
    il[0] = r
    cl = torch.randint(min_len, w + 1, (m,), generator=g) if pad_captions else torch.full((m,), w)
    cl[0] = w
    caps = torch.zeros(m, w, dtype=torch.long)
    for j, n_tok in enumerate(cl.tolist()):
        caps[j, :n_tok] = torch.randint(1, VOCAB, (n_tok,), generator=g)
    return images, il, caps, cl


# 24 configurations: (strategy, embed_size, kernel_size, num_levels, n, R, m, W)
CONFIGS = [
    (strategy, e, k, lv, n, r, m, w)
    for strategy in ("adaptive", "heuristic")
    for (e, k, lv) in ((32, 2, 3), (48, 2, 4), (54, 3, 3), (64, 4, 2))
    for (n, r, m, w) in ((3, 5, 4, 6), (4, 9, 6, 11), (2, 3, 7, 4))
]


@pytest.mark.parametrize("seed,strategy,e,k,lv,n,r,m,w", [(i, *c) for i, c in enumerate(CONFIGS)])
def test_engine_equals_reference(seed, strategy, e, k, lv, n, r, m, w):
    model = tiny_gru_model(strategy, embed_size=e, kernel_size=k, num_levels=lv, seed=seed).eval()
    images, il, caps, cl = make_inputs(n, r, m, w, seed)
    ref = reference_similarity(model, images, il, caps, cl)
    with torch.no_grad():
        fast = model.similarity(images, il, caps, cl)
    assert fast.shape == (n, m)
    assert rel_err(fast, ref) <= 1e-5
    slow = model.similarity(images, il, caps, cl)  # autograd path
    assert slow.requires_grad
    assert rel_err(slow.detach(), ref) <= 1e-5
    # fp32 rounding alone moves both scorers by up to ~1e-5 on these deliberately
    # ill-conditioned random models; in float64 the engine must agree to rounding level.
    model = model.double()
    images = images.double()
    ref64 = reference_similarity(model, images, il, caps, cl)
    with torch.no_grad():
        fast64 = model.similarity(images, il, caps, cl)
    assert rel_err(fast64, ref64) <= 1e-11


@pytest.fixture(scope="module")
def tiny():
    model = tiny_gru_model("adaptive", embed_size=32, num_levels=3, seed=3).eval()
    images, il, caps, cl = make_inputs(7, 6, 11, 9, seed=5)
    with torch.no_grad():
        img = model.embed_images(images, il)
        cap = model.embed_captions(caps, cl)
        side = model.prepare_images(img)
    ref = reference_similarity(model, images, il, caps, cl)
    return dict(
        model=model,
        images=images,
        il=il,
        caps=caps,
        cl=cl,
        img=img,
        cap=cap,
        side=side,
        ref=ref,
        scale=model.pooling.scale().detach(),
    )


def engine(t, **kw):
    return _score(t["cap"], t["cl"], t["side"], t["il"], t["scale"], **kw)


@pytest.mark.parametrize("elements_per_tile", [None, 1, 100, 600, 5000])
@pytest.mark.parametrize("workers", [1, 2])
def test_tile_sizes_and_workers(tiny, elements_per_tile, workers):
    threads = torch.get_num_threads()
    with torch.no_grad():
        out = engine(tiny, tile_elements=elements_per_tile, workers=workers)
    assert rel_err(out, tiny["ref"]) <= 1e-5
    assert torch.get_num_threads() == threads  # workers restore the thread count


@pytest.mark.parametrize("factor", [1, 2, 3, 10, 1000])
def test_tiny_budgets_force_many_tiles(tiny, factor):
    w, r = int(tiny["cl"].max()), int(tiny["il"].max())
    for grad, buffers in ((False, _INPLACE_BUFFERS), (True, _AUTOGRAD_BUFFERS)):
        budget = w * r * 4 * buffers * factor
        plan = plan_tiles(tiny["cl"], tiny["il"], budget, 4, buffers=buffers)
        if factor == 1:  # one image per tile, chunks no longer than the longest caption
            assert len(plan.image_tiles) == tiny["il"].numel()
            assert all((c1 - c0) * cw <= w for (c0, c1), cw in zip(plan.caption_chunks, plan.chunk_widths))
        with torch.set_grad_enabled(grad):
            side = tiny["side"].clone().requires_grad_(grad)
            out = _score(tiny["cap"], tiny["cl"], side, tiny["il"], tiny["scale"], budget_bytes=budget)
        assert out.requires_grad == grad
        assert rel_err(out.detach(), tiny["ref"]) <= 1e-5


def test_plan_covers_everything_within_budget():
    g = torch.Generator().manual_seed(0)
    cl = torch.randint(1, 30, (200,), generator=g)
    il = torch.randint(1, 37, (50,), generator=g)
    budget = 4 * _INPLACE_BUFFERS * 30 * 36 * 40
    plan = plan_tiles(cl, il, budget, 4)
    order = plan.caption_order.tolist()
    covered = [c for c0, c1 in plan.caption_chunks for c in order[c0:c1]]
    assert sorted(covered) == list(range(200))
    assert [i for i0, i1 in plan.image_tiles for i in range(i0, i1)] == list(range(50))
    assert plan.regions == int(il.max())
    for (c0, c1), w, padded in zip(plan.caption_chunks, plan.chunk_widths, plan.chunk_padded):
        lens = cl[plan.caption_order[c0:c1]]
        assert int(lens.max()) == w
        assert padded == bool((lens < w).any())
        assert (c1 - c0) * w - int(lens.sum()) <= 0.125 * (c1 - c0) * w  # little padding
    assert plan.max_tile_elements() * 4 * _INPLACE_BUFFERS <= budget


def test_edge_cases_one_image_one_caption_one_token_one_region():
    model = tiny_gru_model("heuristic", seed=11).eval()
    cases = [
        make_inputs(1, 5, 4, 6, seed=1),  # one image
        make_inputs(3, 5, 1, 6, seed=2),  # one caption
        make_inputs(1, 1, 1, 1, seed=3),  # one image of one region, one one-token caption
        make_inputs(3, 1, 4, 1, seed=4),  # one-region images, one-token captions
        make_inputs(3, 4, 5, 3, seed=5, pad_images=False, pad_captions=False),  # no padding
    ]
    images, il, caps, cl = make_inputs(2, 6, 5, 7, seed=6)
    cl[1:] = 1  # one-token captions among longer ones
    caps[1:, 1:] = 0
    cases.append((images, il, caps, cl))
    for images, il, caps, cl in cases:
        ref = reference_similarity(model, images, il, caps, cl)
        with torch.no_grad():
            out = model.similarity(images, il, caps, cl)
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= 1e-5


def test_refusals(tiny):
    cl = tiny["cl"].clone()
    cl[2] = 0
    with pytest.raises(InputError, match="caption 2 has length 0"):
        _score(tiny["cap"], cl, tiny["side"], tiny["il"], tiny["scale"])
    il = tiny["il"].clone()
    il[4] = 0
    with pytest.raises(InputError, match="image 4 has length 0"):
        _score(tiny["cap"], tiny["cl"], tiny["side"], il, tiny["scale"])
    with pytest.raises(InputError, match="too small for a single tile"):
        engine(tiny, budget_bytes=100)
    w, r = int(tiny["cl"].max()), int(tiny["il"].max())
    side = tiny["side"].clone().requires_grad_(True)  # the autograd path needs more per tile
    with pytest.raises(InputError, match="too small for a single tile"):
        _score(tiny["cap"], tiny["cl"], side, tiny["il"], tiny["scale"], budget_bytes=w * r * 4 * _INPLACE_BUFFERS)
    with pytest.raises(InputError, match="precision"):
        engine(tiny, precision="fp8")
    with pytest.raises(InputError, match="width"):
        _score(tiny["cap"][..., :-1], tiny["cl"], tiny["side"], tiny["il"], tiny["scale"])
    with pytest.raises(InputError, match="all-padding"):
        tiny["model"].score(tiny["img"], tiny["il"], tiny["cap"], cl)


def test_fast_path_equals_autograd_path(tiny):
    with torch.no_grad():
        fast = engine(tiny)
    cap = tiny["cap"].clone().requires_grad_(True)
    slow = _score(cap, tiny["cl"], tiny["side"], tiny["il"], tiny["scale"])
    assert slow.requires_grad
    assert rel_err(slow.detach(), fast) <= 1e-6


@pytest.mark.parametrize("scale", [14.29, 60.0])
def test_pool_kernels_agree_with_pair_pooling(scale):
    """In-place and out-of-place tile pooling equal the literal per-pair pooling, also when
    the softmax needs its max shift (large scale) and with padding on both sides."""
    g = torch.Generator().manual_seed(1)
    m, w, n, r = 3, 5, 4, 6
    wl, rl = torch.tensor([5, 3, 1]), torch.tensor([6, 2, 6, 1])
    a = 3 * torch.randn(m, w, n, r, generator=g, dtype=torch.float64)
    wv = torch.arange(w)[None, :] < wl[:, None]
    rv = torch.arange(r)[None, :] < rl[:, None]
    a = a * wv[:, :, None, None] * rv[None, None]
    wb = padding_bias(wv, a.dtype)[:, :, None, None]
    rb = padding_bias(rv, a.dtype)[None, None]
    s = torch.tensor(scale, dtype=a.dtype)
    expect = torch.stack([torch.stack([pool_pair(a[i, : wl[i], j, : rl[j]], s) for j in range(n)]) for i in range(m)])
    wlf, rlf = wl[:, None].to(a.dtype), rl[None, :].to(a.dtype)
    inplace = pool_tile_(a, torch.empty_like(a), torch.empty_like(a), wlf, rlf, scale, 0.1, 1e-8, wb, rb)
    outplace = pool_tile(a, wlf, rlf, s, 0.1, 1e-8, wb, rb)
    assert rel_err(inplace, expect) <= 1e-12
    assert rel_err(outplace, expect) <= 1e-12


def test_gradcheck_engine_float64():
    g = torch.Generator().manual_seed(2)
    m, w, n, r, dt = 3, 4, 3, 5, 6
    cap = torch.randn(m, w, dt, generator=g, dtype=torch.float64, requires_grad=True)
    side = torch.randn(n, r, dt, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    cl, il = torch.tensor([4, 2, 1]), torch.tensor([5, 3, 1])

    def f(c, z, s):
        return _score(c, cl, z, il, s, budget_bytes=w * r * 8 * _AUTOGRAD_BUFFERS * 2)

    assert torch.autograd.gradcheck(f, (cap, side, scale), eps=1e-6, atol=1e-6)


def test_gradients_match_literal_pairs_and_reach_every_parameter():
    model = tiny_gru_model("heuristic", seed=7).double().train()
    images, il, caps, cl = make_inputs(3, 5, 4, 6, seed=8)
    images = images.double()
    model.eval()  # fixed BatchNorm statistics so both computations see the same features
    scores = model.similarity(images, il, caps, cl)
    loss = (scores * torch.linspace(-1, 1, scores.numel(), dtype=scores.dtype).view_as(scores)).sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    # the literal form: one pair at a time, no padding, no tiles
    img = [model.embed_images(images[i : i + 1, : il[i]])[0] for i in range(3)]
    cap = [model.embed_captions(caps[j : j + 1, : cl[j]], [int(cl[j])])[0] for j in range(4)]
    s = model.pooling.scale()
    lit = torch.stack([torch.stack([pool_pair(pair_affinity(model, x, y), s) for x in cap]) for y in img])
    lit_loss = (lit * torch.linspace(-1, 1, lit.numel(), dtype=lit.dtype).view_as(lit)).sum()
    lit_grads = torch.autograd.grad(lit_loss, list(params.values()), allow_unused=True)
    reached = 0
    for (name, _p), ge, gl in zip(params.items(), grads, lit_grads):
        if gl is None:
            assert ge is None or float(ge.abs().max()) == 0.0, name
            continue
        assert ge is not None, f"no gradient reaches {name}"
        assert torch.isfinite(ge).all(), name
        assert float((ge - gl).abs().max()) <= 1e-8 * max(1.0, float(gl.abs().max())), name
        reached += 1
    assert reached >= len(params) - 2  # everything the literal form trains


def test_gradient_reaches_every_trainable_parameter_float32():
    model = tiny_gru_model("adaptive", seed=9).train()
    images, il, caps, cl = make_inputs(4, 6, 5, 7, seed=10)
    scores = model.similarity(images, il, caps, cl)
    diag = torch.zeros_like(scores, dtype=torch.bool)
    diag[torch.arange(4), torch.arange(4)] = True
    loss = (0.2 - scores[diag][:, None] + scores).clamp_min(0).sum()
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"no finite gradient for {missing}"
    assert any(float(p.grad.abs().max()) > 0 for n, p in model.named_parameters() if n.startswith("correspondence"))


def test_precisions(tiny):
    with torch.no_grad():
        fp32 = engine(tiny)
        tf32 = engine(tiny, precision="tf32")  # no TF32 on CPU: fp32 products
        bf16 = engine(tiny, precision="bf16")
    assert torch.equal(tf32, fp32)
    err = rel_err(bf16, fp32)
    assert 0 < err <= 3e-2  # reduced, not broken


def test_compile_is_cuda_only_by_default():
    assert _compiled_pooling("auto", torch.device("cpu")) is None
    assert _compiled_pooling("never", torch.device("cpu")) is None


def test_distributed_without_process_group_is_plain(tiny):
    out = _score_dist(tiny["cap"], tiny["cl"], tiny["side"], tiny["il"], tiny["scale"])
    assert rel_err(out, tiny["ref"]) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, path, tensors):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cap, cl, side, il, scale = tensors
        out = _score_dist(cap, cl, side, il, scale, tile_elements=200)
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_two_processes_equals_one(tiny, tmp_path):
    import torch.multiprocessing as mp

    tensors = (tiny["cap"], tiny["cl"], tiny["side"], tiny["il"], tiny["scale"])
    with torch.no_grad():
        single = engine(tiny)
    ctx = mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path / "out"), tensors), nprocs=2, join=False)
    for _ in range(HUNG):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("distributed workers did not finish")
    for rank in range(2):
        out = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert out.shape == single.shape
        assert rel_err(out, single) <= 1e-6
        assert rel_err(out, tiny["ref"]) <= 1e-5
    assert math.isfinite(float(single.sum()))
