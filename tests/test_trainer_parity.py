"""The public ``Trainer`` against a transcription of the released training step (``released_train.py``).

Both start from the same released-format checkpoint and take the same batches for three epochs
of three steps, dropout and augmentation off: epoch 0 sums the hinge over all negatives (VSE0),
epochs 1-2 take the hardest negative (VSE++), and the learning rate drops tenfold at epoch 2.
Compared: the loss of every step, the learning rate of every parameter in every epoch, and the
scores of the two trained models on held-out inputs (eval mode, running BatchNorm statistics).

In float32 (as trained) the trajectories carry float noise that the recipe itself amplifies:
``mlp.layers.0.bias`` feeds a training-mode BatchNorm, so its gradient is zero up to rounding
(~1e-8), which AdamW (eps 1e-8) turns into steps of about the learning rate in a direction set
by the rounding; the running mean follows it, and eval-mode scores with it. Hinge clamps, hardest
negatives and ESL-A's top-k selection are discontinuous in the weights as well. float32 is
checked at the acceptance tolerances (losses 1e-3, ESL-H scores 3e-3). Those do not see every
departure: without weight decay, or with AdamW's eps at 1e-6, the float32 losses still agree
within 1.2e-4 and the scores within 6.3e-4 (measured). float64 removes the noise and checks the
same recipe to 1e-9 (losses) and 1e-8 (scores, every trained weight and BatchNorm buffer), where
those departures show as 4e-7 to 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eslmatch
from _models import make_released_checkpoint
from eslmatch.compat.official import map_state
from eslmatch.training import TrainConfig, Trainer
from released_forward import _adaptive_mask, released_similarity
from released_train import ReleasedVSE, start_epoch, train_step

EPOCHS, STEPS, BATCH, REGIONS, IMG_DIM, LEVELS = 3, 3, 8, 5, 32, 3
LR, MARGIN, CLIP, LR_UPDATE, WARMUP = 5e-4, 0.2, 2.0, 2, 1
SEED = 5
# ESL-A's sigma and t2 (``temp_scale_1`` / ``temp_scale_2``) are multiplied by lambda = 0 there:
# they have no effect on its scores. The released code still holds them as parameters (t2 gets no
# gradient; sigma a zero one, so AdamW's weight decay shrinks it); ours holds them as buffers.
INERT_ADAPTIVE = ("sims.calculator_1.temp_scale_1.weight", "sims.calculator_1.temp_scale_2.weight")


def config() -> TrainConfig:
    return TrainConfig(
        lr=LR,
        margin=MARGIN,
        global_loss_weight=0.0,
        region_drop=0.0,
        word_mask=0.0,
        bf16=False,
        weight_decay=1e-4,
        grad_clip=CLIP,
        bert_lr_factor=0.1,
        lr_decay_epoch=LR_UPDATE,
        lr_decay_factor=0.1,
        vse_mean_warmup_epochs=WARMUP,
        epochs=EPOCHS,
    )


def batches(seed: int, n: int, dtype: torch.dtype, vocab: int = 60):
    """``n`` batches of ``BATCH`` images (``REGIONS`` regions each) and their captions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.relu(torch.randn(BATCH, REGIONS, IMG_DIM, generator=g)).to(dtype)
        lens = torch.randint(4, 10, (BATCH,), generator=g)
        caps = torch.zeros(BATCH, int(lens.max()), dtype=torch.long)
        for j, w in enumerate(lens.tolist()):
            caps[j, 0] = 2
            caps[j, 1 : w - 1] = torch.randint(5, vocab, (w - 2,), generator=g)
            caps[j, w - 1] = 3
        out.append((images, caps, lens))
    return out


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def our_names(released: ReleasedVSE) -> dict[tuple[int, str], str]:
    """(released part, released key) -> our parameter / buffer name, by the loader's own rules."""
    out = {}
    for part, state in enumerate(released.state_dict()["model"]):
        for key, value in state.items():
            single: list[dict] = [{}, {}, {}]
            single[part][key] = value
            mapped, _ = map_state({"model": single}, LEVELS)
            if mapped:
                out[(part, key)] = next(iter(mapped))
    return out


def lr_by_param(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def train_both(tmp_path, strategy: str, dtype: torch.dtype) -> dict:
    path = tmp_path / "released.pth.tar"
    ckpt = make_released_checkpoint(path, strategy, embed_size=64, num_levels=LEVELS, img_dim=IMG_DIM, seed=SEED)
    released = ReleasedVSE(ckpt, learning_rate=LR, margin=MARGIN, grad_clip=CLIP, dtype=dtype)
    ours = eslmatch.load_official_checkpoint(path).to(dtype)
    for m in ours.modules():  # the checkpoint does not store BERT's config: dropout off here
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    trainer = Trainer(ours, config())
    names = our_names(released)
    our_params = dict(ours.named_parameters())
    released_params = {
        (part, k): p
        for part, m in enumerate((released.img_enc, released.txt_enc, released.sim_vec))
        for k, p in m.named_parameters()
    }
    data = batches(seed=1, n=STEPS, dtype=dtype)
    held_images, held_caps, held_lens = batches(seed=2, n=1, dtype=dtype)[0]
    with torch.no_grad():
        start_ours = ours.eval().similarity(held_images, None, held_caps, held_lens)
    start_scores = (start_ours, released.evaluate(held_images, held_caps, held_lens))
    out: dict = {"loss_ref": [], "loss_ours": [], "lr_mismatch": [], "start_scores": start_scores}
    for epoch in range(EPOCHS):
        start_epoch(released, epoch, LR_UPDATE, WARMUP)
        trainer.start_epoch(epoch)
        ref_lr, our_lr = lr_by_param(released.optimizer), lr_by_param(trainer.optimizer)
        for key, p in released_params.items():
            if key not in names or (strategy == "adaptive" and key[1] in INERT_ADAPTIVE):
                continue
            ours_p = our_params.get(names[key])
            lr = our_lr.get(id(ours_p)) if ours_p is not None and ours_p.requires_grad else None  # None: not trained
            if lr is None or ref_lr[id(p)] != pytest.approx(lr, rel=1e-12):
                out["lr_mismatch"].append((epoch, key[1], ref_lr[id(p)], lr))
        out.setdefault("lr_epoch", []).append(ref_lr[id(released_params[(2, "sims.calculator_1.temp_scale.weight")])])
        out.setdefault("max_violation", []).append((released.max_violation, trainer.max_violation))
        for images, caps, lens in data:
            out["loss_ref"].append(train_step(released, images, caps, lens))
            out["loss_ours"].append(float(trainer.step(images, torch.full((BATCH,), REGIONS), caps, lens)))
    out["grad_norms"] = released.grad_norms
    ours.eval()
    with torch.no_grad():
        out["scores_ours"] = ours.similarity(held_images, None, held_caps, held_lens)
    out["scores_ref"] = released.evaluate(held_images, held_caps, held_lens)
    state = released.state_dict()
    f32 = {"model": [{k: v.float() if v.is_floating_point() else v for k, v in s.items()} for s in state["model"]]}
    out["scores_ref_forward"] = released_similarity(f32, held_images.float(), held_caps, held_lens)
    ours_state = ours.state_dict()
    out["weights"] = {
        key: rel(ours_state[name].reshape(state["model"][key[0]][key[1]].shape), state["model"][key[0]][key[1]])
        for key, name in names.items()
        if state["model"][key[0]][key[1]].is_floating_point()
        and not (strategy == "adaptive" and key[1] in INERT_ADAPTIVE)
    }
    if strategy == "adaptive":
        out["inert"] = {k: (float(state["model"][2][k]), float(ours_state[names[(2, k)]])) for k in INERT_ADAPTIVE}
    # The released eval scores with our two noise-driven tensors (the bias before the BatchNorm and
    # the running mean that follows it) put in: what is left is the rest of the trajectory.
    for key in ((0, "mlp.layers.0.bias"), (0, "mlp.bns.0.running_mean")):
        f32["model"][0][key[1]] = ours_state[names[key]].float()
    out["scores_ref_swapped"] = released_similarity(f32, held_images.float(), held_caps, held_lens)
    out["batches_tracked"] = (
        int(state["model"][0]["mlp.bns.0.num_batches_tracked"]),
        int(ours_state[names[(0, "mlp.bns.0.num_batches_tracked")]]),
    )
    if strategy == "adaptive":  # entries of the top-k selection that differ, and how near a flip
        flips, margin = 0, float("inf")
        for (part, key), name in names.items():
            if part == 2 and ".masks_" in key and "_levels." in key:
                w = state["model"][2][key]
                sel_ref = _adaptive_mask(w) != 0
                sel_ours = _adaptive_mask(ours_state[name].to(w.dtype)) != 0
                flips += int((sel_ref != sel_ours).sum())
                top = (w / w.norm(dim=-1, keepdim=True)).sort(1, descending=True)[0]
                if top.shape[1] > 2:
                    margin = min(margin, float((top[:, 1] - top[:, 2]).min()))
        out["selection_flips"], out["selection_margin"] = flips, margin
    return out


def report(tag: str, r: dict) -> tuple[list[float], float]:
    errors = [abs(a - b) / abs(b) for a, b in zip(r["loss_ours"], r["loss_ref"])]
    score = rel(r["scores_ours"], r["scores_ref"])
    worst = sorted(r["weights"].items(), key=lambda kv: kv[1])[-3:]
    print(f"\n{tag}: losses released {[round(x, 5) for x in r['loss_ref']]}")
    print(f"{tag}: losses ours     {[round(x, 5) for x in r['loss_ours']]}")
    print(f"{tag}: gradient norms before clipping {[round(x, 2) for x in r['grad_norms']]}")
    print(f"{tag}: loss relative differences per step {[f'{e:.1e}' for e in errors]}")
    swapped = rel(r["scores_ours"].float(), r["scores_ref_swapped"])
    print(f"{tag}: trained scores relative difference {score:.2e} ({swapped:.2e} with our noise-driven BatchNorm pair)")
    print(f"{tag}: worst weights {[(k[1], f'{v:.1e}') for k, v in worst]}")
    if "inert" in r:
        print(f"{tag}: ESL-A's inert sigma / t2 (released, ours): {r['inert']}")
    if "selection_flips" in r:
        print(f"{tag}: top-k selection entries that differ {r['selection_flips']}, margin {r['selection_margin']:.1e}")
    return errors, score


def check_common(r: dict, errors: list[float]) -> None:
    assert rel(*r["start_scores"]) <= 1e-5  # same weights, same scores before training
    assert rel(r["scores_ref"].float(), r["scores_ref_forward"]) <= 1e-5  # the transcription's eval forward
    assert r["lr_mismatch"] == []  # every parameter's learning rate, every epoch
    assert r["lr_epoch"] == pytest.approx([LR, LR, LR * 0.1], rel=1e-12)
    assert r["max_violation"] == [(False, False), (True, True), (True, True)]
    assert r["loss_ref"][STEPS - 1] != r["loss_ref"][STEPS]
    assert max(r["grad_norms"]) > CLIP  # clipping took part
    assert errors[0] <= 1e-5
    assert max(errors) <= 1e-3
    assert r["batches_tracked"][0] == r["batches_tracked"][1]


@pytest.mark.parametrize("strategy", ["heuristic", "adaptive"])
def test_trainer_equals_the_released_training_step_float64(tmp_path, strategy):
    """Without float noise the two trajectories are one: losses, scores, weights, buffers."""
    r = train_both(tmp_path, strategy, torch.float64)
    errors, score = report(f"{strategy} float64", r)
    check_common(r, errors)
    assert max(errors) <= 1e-9
    assert score <= 1e-8
    assert max(r["weights"].values()) <= 1e-8  # weight decay alone moves them by 3e-7 here
    if strategy == "adaptive":
        assert r["selection_flips"] == 0


@pytest.mark.parametrize("strategy", ["heuristic", "adaptive"])
def test_trainer_equals_the_released_training_step_float32(tmp_path, strategy):
    """As trained (float32): losses within 1e-3 at every step, ESL-H's trained scores within 3e-3."""
    r = train_both(tmp_path, strategy, torch.float32)
    errors, score = report(f"{strategy} float32", r)
    check_common(r, errors)
    if strategy == "heuristic":
        assert score <= 3e-3
    else:
        assert r["selection_flips"] == 0  # no top-k flip: the trajectories did not part
        # Measured 5.3e-3: the noise of the bias before the BatchNorm (see the module docstring);
        # the rest of the trained model within the acceptance tolerance:
        assert score <= 1e-2
        assert rel(r["scores_ours"].float(), r["scores_ref_swapped"]) <= 3e-3
