"""The public Trainer against a transcription of the released training step, from the same
weights over several epochs (dropout and augmentation off): the VSE0 warm-up, the switch to
hardest negatives, the learning-rate decay, AdamW's groups and weight decay, clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eslmatch
from _models import make_released_checkpoint
from eslmatch.training import TrainConfig, Trainer
from released_forward import released_similarity
from released_train import ReleasedESL, ReleasedTrainer

EPOCHS, STEPS, BATCH, REGIONS = 3, 3, 8, 5


def batches(seed: int, n: int, vocab: int = 60):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.relu(torch.randn(BATCH, REGIONS, 32, generator=g))
        lens = torch.randint(4, 10, (BATCH,), generator=g)
        caps = torch.zeros(BATCH, int(lens.max()), dtype=torch.long)
        for j, w in enumerate(lens.tolist()):
            caps[j, 0] = 2
            caps[j, 1 : w - 1] = torch.randint(5, vocab, (w - 2,), generator=g)
            caps[j, w - 1] = 3
        out.append((images, caps, lens))
    return out


def no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("strategy", ["heuristic", "adaptive"])
def test_trainer_equals_the_released_training_step(tmp_path, strategy):
    ckpt = make_released_checkpoint(tmp_path / "released.pth.tar", strategy, embed_size=64, num_levels=3, seed=5)
    torch.manual_seed(0)
    released = ReleasedESL(ckpt)
    ref = ReleasedTrainer(released, lr=5e-4, grad_clip=2.0, margin=0.2, lr_update=2, vse_mean_warmup_epochs=1)
    ours_model = eslmatch.load_official_checkpoint(tmp_path / "released.pth.tar")
    no_dropout(ours_model)
    cfg = TrainConfig(
        lr=5e-4,
        margin=0.2,
        global_loss_weight=0.0,
        region_drop=0.0,
        word_mask=0.0,
        bf16=False,
        weight_decay=1e-4,
        grad_clip=2.0,
        bert_lr_factor=0.1,
        lr_decay_epoch=2,
        lr_decay_factor=0.1,
        vse_mean_warmup_epochs=1,
        epochs=EPOCHS,
    )
    trainer = Trainer(ours_model, cfg)
    data = batches(seed=1, n=STEPS)
    losses_ref, losses_ours = [], []
    for epoch in range(EPOCHS):
        ref.start_epoch(epoch)
        trainer.start_epoch(epoch)
        for images, caps, lens in data:
            losses_ref.append(ref.train_emb(images, caps, lens))
            losses_ours.append(float(trainer.step(images, torch.full((BATCH,), REGIONS), caps, lens)))
    errors = [abs(a - b) / abs(b) for a, b in zip(losses_ours, losses_ref)]
    test_images, test_caps, test_lens = batches(seed=2, n=1)[0]
    ours_model.eval()
    with torch.no_grad():
        s_ours = ours_model.similarity(test_images, None, test_caps, test_lens)
    s_ref = released_similarity(released.as_checkpoint(), test_images, test_caps, test_lens)
    score_err = rel(s_ours, s_ref)
    print(f"{strategy}: losses released {[round(x, 4) for x in losses_ref]}")
    print(f"{strategy}: losses ours     {[round(x, 4) for x in losses_ours]}")
    print(
        f"{strategy}: max loss relative difference {max(errors):.2e} (first step {errors[0]:.2e}); "
        f"trained-model scores relative difference {score_err:.2e}"
    )
    assert losses_ref[STEPS - 1] != losses_ref[STEPS]  # the switch to hardest negatives happened
    assert errors[0] <= 1e-5  # same weights, same batch: the same loss
    assert max(errors) <= 1e-3
    # ESL-A's top-k selection (>= the k-th largest) is discontinuous and its sparse masks
    # amplify float-level differences of the trained weights: measured 4.7e-3 here against
    # 1.0e-3 for ESL-H.
    assert score_err <= (3e-3 if strategy == "heuristic" else 1e-2)
