"""Distributed training: 2 gloo processes x 8 items equal 1 process x 16 items.

Same loss (sum over ranks of each rank's share) and same gradients (after DDP averaging)
for the VSE0 and hardest-negative losses, same BatchNorm running statistics, for an ESL
and a VSE model with padded regions and captions of several lengths.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from _models import randomize, tiny_vocab
from eslmatch.config import ESLConfig
from eslmatch.distributed import (
    DistContext,
    free_port,
    gather_padded,
    init_distributed,
    rank_slice,
    shutdown,
    sum_value,
)
from eslmatch.errors import EslmatchError
from eslmatch.factory import build_model
from eslmatch.losses import LossSettings, MatchingLoss
from eslmatch.model.encoders import enable_sync_batchnorm

BATCH = 128  # the global batch: 2 ranks x 64 against 1 process x 128
WORLD = 2
# float32 is the stated requirement (1e-5); float64 shows the two computations are the same
# arithmetic, not merely close (float32 noise of the hardest-negative gradient is ~1e-5).
CASES = [("esl", torch.float32), ("vse", torch.float32), ("esl", torch.float64), ("vse", torch.float64)]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_model(model_type: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    vocab = tiny_vocab()
    cfg = ESLConfig(
        model_type=model_type,
        embed_size=32,
        num_levels=3,
        img_dim=16,
        text_encoder="gru",
        text_model=None,
        vocab_size=len(vocab),
        word_dim=16,
    )
    model = build_model(cfg, vocab)
    randomize(model)
    return model.to(dtype).train()


def make_batch(vocab_size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    regions, words = 6, 9
    images = torch.relu(torch.randn(BATCH, regions, 16, generator=g)).to(dtype)
    img_len = torch.randint(2, regions + 1, (BATCH,), generator=g)
    cap_len = torch.randint(2, words + 1, (BATCH,), generator=g)
    # rank 0's share pads to fewer regions/words than rank 1's: gathering must pad
    img_len[: BATCH // 2] = img_len[: BATCH // 2].clamp(max=regions - 2)
    cap_len[: BATCH // 2] = cap_len[: BATCH // 2].clamp(max=words - 3)
    caps = torch.zeros(BATCH, words, dtype=torch.long)
    for j, n in enumerate(cap_len.tolist()):
        caps[j, :n] = torch.randint(1, vocab_size, (n,), generator=g)
    for i, n in enumerate(img_len.tolist()):
        images[i, n:] = 0
    return images, img_len, caps, cap_len


def run_steps(model, ctx: DistContext, share: slice, wrap) -> dict:
    """Two steps (VSE0 then hardest negatives) on the same batch; loss, grads, BN stats."""
    dtype = next(model.parameters()).dtype
    images, img_len, caps, cap_len = make_batch(model.config.vocab_size, dtype)
    loss = MatchingLoss(model, LossSettings(), ctx)
    step = wrap(loss)
    out: dict = {}
    w = images[share].shape[1]
    for max_violation in (False, True):
        model.zero_grad(set_to_none=True)
        loss.settings.max_violation = max_violation
        # each rank trims its padding, as collate does for its own items
        r_loc = int(img_len[share].max())
        w_loc = int(cap_len[share].max())
        assert r_loc <= w
        losses = step(images[share][:, :r_loc], img_len[share], caps[share][:, :w_loc], cap_len[share])
        (losses["loss"] * ctx.world_size).backward()
        out[max_violation] = {
            "loss": float(sum_value(ctx, losses["loss"].detach())),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
    out["buffers"] = {n: b.detach().clone() for n, b in model.named_buffers()}
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", "gloo", timeout_minutes=2)
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for model_type, dtype in CASES:
        model = make_model(model_type, dtype)
        assert enable_sync_batchnorm(model, ctx.group, ctx.distributed) == 1
        results[f"{model_type}-{dtype}"] = run_steps(model, ctx, rank_slice(BATCH, ctx), DistributedDataParallel)
    if rank == 0:
        torch.save(results, path)
    shutdown(ctx)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp") / "rank0.pt")
    mp.spawn(_worker, args=(WORLD, free_port(), path), nprocs=WORLD, join=True)
    return torch.load(path, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_type,dtype", CASES)
def test_two_ranks_equal_one_process(ddp_results, model_type, dtype):
    single = run_steps(make_model(model_type, dtype), DistContext(), slice(None), lambda m: m)
    multi = ddp_results[f"{model_type}-{dtype}"]
    tol = TOLERANCE[dtype]
    for max_violation in (False, True):
        s, m = single[max_violation], multi[max_violation]
        print(
            f"{model_type} {dtype} max_violation={max_violation}: loss 1x{BATCH} {s['loss']:.6f}, "
            f"{WORLD}x{BATCH // WORLD} {m['loss']:.6f}"
        )
        assert abs(s["loss"] - m["loss"]) <= tol * abs(s["loss"])
        assert s["loss"] > 0
        # Gradients that are mathematically zero (the bias before a BatchNorm) hold float
        # noise, so each tensor is compared against the scale of the whole gradient.
        scale = max(float(g.abs().max()) for g in s["grads"].values())
        worst = max(float((m["grads"][n] - g).abs().max()) for n, g in s["grads"].items()) / scale
        print(f"  largest gradient difference / largest gradient: {worst:.2e}")
        for n, g in s["grads"].items():
            assert float((m["grads"][n] - g).abs().max()) <= tol * scale, n
    for n, b in single["buffers"].items():
        if b.is_floating_point():
            assert rel(multi["buffers"][n], b) <= tol, n
        else:
            assert torch.equal(multi["buffers"][n], b), n


def test_hardest_negative_loss_differs_from_local_batches():
    """The global batch matters: two halves scored apart give a different loss."""
    model = make_model("esl")
    images, img_len, caps, cap_len = make_batch(model.config.vocab_size, torch.float32)
    step = MatchingLoss(model, LossSettings(max_violation=True))
    whole = float(step(images, img_len, caps, cap_len)["loss"].detach())
    halves = sum(
        float(step(images[s], img_len[s], caps[s], cap_len[s])["loss"].detach()) for s in (slice(0, 8), slice(8, 16))
    )
    assert abs(whole - halves) > 1e-3


def test_rank_slice_and_gather_alone():
    ctx = DistContext(world_size=2, rank=1)
    assert rank_slice(16, ctx) == slice(8, 16)
    with pytest.raises(EslmatchError, match="divisible"):
        rank_slice(15, ctx)
    x = torch.randn(3, 4)
    assert gather_padded(x, DistContext()) is x


@pytest.mark.slow
def test_torchrun_training_matches_one_process(tmp_path):
    """The real command under torchrun (2 gloo processes): same first losses as one process,
    one set of outputs written by rank 0."""
    import json
    import subprocess
    import sys

    import yaml

    from _datagen import make_precomp

    data = make_precomp(
        tmp_path / "data", splits=("train", "dev"), n_images={"train": 40, "dev": 10}, regions=6, dim=16
    )
    cfg = {
        "data_path": str(data),
        "epochs": 1,
        "batch_size": 20,
        "lr": 2e-3,
        "workers": 0,
        "log_every": 1,
        "save_every_steps": 3,
        "progress": False,
        "tensorboard": False,
        "max_steps": 4,
        "model": {
            "text_encoder": "gru",
            "text_model": None,
            "embed_size": 32,
            "num_levels": 3,
            "img_dim": 16,
            "word_dim": 16,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "eslmatch.cli", "train", "--config", str(tmp_path / "cfg.yaml")]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *train,
            f"output_dir={tmp_path / 'two'}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done:") == 1  # rank 0 alone reports
    subprocess.run([sys.executable, *train, f"output_dir={tmp_path / 'one'}"], env=env, check=True, capture_output=True)

    def losses(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "step"]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    print(f"per-step loss, 1 process: {one}\n               2 processes: {two}")
    assert len(one) == len(two) == 4
    assert abs(one[0] - two[0]) <= 1e-5 * one[0]
    assert all(abs(a - b) <= 1e-3 * a for a, b in zip(one, two))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    state = torch.load(tmp_path / "two" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["global_step"] == 4


@pytest.mark.parametrize("model_type", ["esl", "vse"])
def test_bf16_autocast_step(model_type):
    """The bf16 autocast path (CUDA in training; CPU autocast here): encoders in bf16, the
    engine in float32; the loss stays close to float32 and every gradient is finite."""
    model = make_model(model_type)
    images, img_len, caps, cap_len = make_batch(model.config.vocab_size, torch.float32)
    step = MatchingLoss(model, LossSettings())
    exact = float(step(images, img_len, caps, cap_len)["loss"].detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(images, img_len, caps, cap_len)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    print(f"{model_type}: loss float32 {exact:.4f}, bf16 autocast {float(out['loss'].detach()):.4f}")
    assert abs(float(out["loss"].detach()) - exact) <= 0.05 * exact
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
