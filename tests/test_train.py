"""Training: configuration, batches, exact resume (SIGKILL mid-epoch), learning, bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _cli import killed_mid_epoch
from _datagen import make_precomp
from _models import tiny_bert_config, tiny_bert_tokenizer
from eslmatch.cli import main as cli_main
from eslmatch.data import EpochBatchSampler
from eslmatch.errors import CheckpointError, EslmatchError
from eslmatch.training import TrainConfig, learning_rate, load_train_config
from eslmatch.training import fit as train
from eslmatch.training.state import STATE_NAME, load_state_file, rng_state, set_rng_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_MODEL = {
    "model_type": "esl",
    "text_encoder": "gru",
    "text_model": None,
    "embed_size": 32,
    "num_levels": 3,
    "img_dim": 16,
    "word_dim": 16,
}


def write_config(path: Path, **values) -> Path:
    base = {
        "model": dict(TINY_MODEL),
        "epochs": 3,
        "batch_size": 20,
        "lr": 2e-3,
        "lr_decay_epoch": 2,
        "workers": 0,
        "log_every": 2,
        "save_every_steps": 4,
        "progress": False,
        "tensorboard": False,
        "eval_batch_size": 64,
    }
    model = values.pop("model", {})
    base.update(values)
    base["model"].update(model)
    path.write_text(yaml.safe_dump(base), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return make_precomp(root, splits=("train", "dev"), n_images={"train": 60, "dev": 20}, regions=6, dim=16)


def read_records(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if rec.get("kind") == kind:
            out.append(rec)
    return out


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= 1e-6
    return worst


# ---------------------------------------------------------------------- configuration
def test_shipped_configs_hold_the_released_recipe():
    expected = {
        "f30k_bert": (30, 15, "bert"),
        "coco_bert": (20, 10, "bert"),
        "f30k_bigru": (30, 15, "gru"),
        "coco_bigru": (20, 10, "gru"),
    }
    for name, (epochs, decay, text) in expected.items():
        cfg = load_train_config(CONFIGS / f"{name}.yaml")
        assert (cfg.epochs, cfg.lr_decay_epoch, cfg.model.text_encoder) == (epochs, decay, text)
        assert (cfg.batch_size, cfg.lr, cfg.bert_lr_factor, cfg.weight_decay) == (128, 5e-4, 0.1, 1e-4)
        assert (cfg.grad_clip, cfg.vse_mean_warmup_epochs, cfg.region_drop, cfg.word_mask) == (2.0, 1, 0.2, 0.2)
        assert (cfg.model.embed_size, cfg.model.img_dim, cfg.margin) == (512, 2048, 0.2)
        # the released run: no auxiliary first-stage loss, fp32, best model kept on dev by default
        assert (cfg.global_loss_weight, cfg.bf16, cfg.val_split) == (0.0, False, "dev")
        search = load_train_config(CONFIGS / f"{name}_search.yaml")
        assert (search.global_loss_weight, search.bf16) == (0.1, "auto")
        assert search.model == cfg.model and search.lr == cfg.lr and search.epochs == cfg.epochs


def test_overrides_and_types(tmp_path):
    cfg = load_train_config(
        CONFIGS / "f30k_bert.yaml",
        [
            "epochs=2",
            "model.embed_size=256",
            "batch_size=32",
            "lr=1e-3",
            "max_steps=null",
            "model.strategy=heuristic",
            "bf16=false",
        ],
    )
    assert (cfg.epochs, cfg.model.embed_size, cfg.batch_size, cfg.lr, cfg.bf16) == (2, 256, 32, 1e-3, False)
    assert cfg.model.strategy == "heuristic" and cfg.model.text_encoder == "bert"
    with pytest.raises(EslmatchError, match="epochs must be int"):
        load_train_config(CONFIGS / "f30k_bert.yaml", ["epochs=two"])
    with pytest.raises(EslmatchError, match="model.embed_size"):
        load_train_config(CONFIGS / "f30k_bert.yaml", ["model.embed_size=1.5"])
    with pytest.raises(EslmatchError, match="not KEY=VALUE"):
        load_train_config(CONFIGS / "f30k_bert.yaml", ["epochs"])
    with pytest.raises(EslmatchError, match="unknown configuration key.*: bogus, model.nope"):
        TrainConfig.from_dict({"data_path": "x", "bogus": 1, "model": {"nope": 2}})


def test_bad_config_is_one_line_and_touches_nothing(tmp_path, small_data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in out.iterdir())
    bad = write_config(tmp_path / "bad.yaml", data_path=str(small_data), output_dir=str(out), learning_rate=0.1)
    assert cli_main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    print(err)
    assert len(err.splitlines()) == 1 and "learning_rate" in err and "unknown configuration key" in err
    good = write_config(tmp_path / "good.yaml", data_path=str(small_data), output_dir=str(out))
    assert cli_main(["train", "--config", str(good), "model.embeddings=3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.embeddings" in err
    assert cli_main(["train", "--config", str(good), "--resume"]) == 1  # nothing to resume
    assert "no training state" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "keep.txt").read_text() == "precious"


# ---------------------------------------------------------------------- batches, schedule, RNG
def test_epoch_batches_are_deterministic_and_split_over_ranks():
    a = list(EpochBatchSampler(103, 10, seed=5, epoch=2))
    assert a == list(EpochBatchSampler(103, 10, seed=5, epoch=2))
    assert a != list(EpochBatchSampler(103, 10, seed=5, epoch=3))
    assert len(a) == 10 and all(len(b) == 10 for b in a) and len({i for b in a for i in b}) == 100
    assert list(EpochBatchSampler(103, 10, seed=5, epoch=2, start=7)) == a[7:]
    halves = [list(EpochBatchSampler(103, 10, 5, 2, share=s)) for s in (slice(0, 5), slice(5, 10))]
    assert [h0 + h1 for h0, h1 in zip(*halves)] == a


def test_learning_rate_schedule():
    cfg = TrainConfig(data_path="x", lr=5e-4, lr_decay_epoch=15)
    assert learning_rate(cfg, 14) == 5e-4
    assert learning_rate(cfg, 15) == pytest.approx(5e-5)


def test_rng_state_round_trip(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


class NotPlainData:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_state_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / STATE_NAME
    torch.save({"format": "eslmatch-train-state", "version": 1, "x": NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="unreadable training state"):
        load_state_file(path)


# ---------------------------------------------------------------------- resume
def _cli(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eslmatch.cli", "train", "--config", str(config), f"output_dir={out}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.slow  # 15-21 s on 2 cores: the fast tier stays under 8 minutes
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, small_data):
    config = write_config(tmp_path / "cfg.yaml", data_path=str(small_data), tensorboard=True)
    full, cut = tmp_path / "full", tmp_path / "cut"
    t0 = time.time()
    subprocess.run(_cli(config, full), check=True, env=_env(), stdout=subprocess.DEVNULL)
    t_full = time.time() - t0

    seen, state = killed_mid_epoch(_cli(config, cut), _env(), cut, steps=15)  # 300 captions / 20 = 15 steps
    print(
        f"killed after the save at step {seen['step']}; state on disk: epoch {state['epoch']} "
        f"step_in_epoch {state['step_in_epoch']} global_step {state['global_step']}"
    )

    t0 = time.time()
    subprocess.run(_cli(config, cut, "--resume"), check=True, env=_env(), stdout=subprocess.DEVNULL)
    t_resume = time.time() - t0
    worst = assert_same_weights(full / "last", cut / "last")
    assert_same_weights(full / "best", cut / "best")
    steps_full = [(r["step"], r["loss"]) for r in read_records(full / "metrics.jsonl", "step")]
    steps_cut = [(r["step"], r["loss"]) for r in read_records(cut / "metrics.jsonl", "step")]
    assert steps_cut == steps_full and len(steps_full) > 10
    epochs = [(r["rsum"], r["train_loss"]) for r in read_records(full / "metrics.jsonl", "epoch")]
    assert [(r["rsum"], r["train_loss"]) for r in read_records(cut / "metrics.jsonl", "epoch")] == epochs
    rsums = [e[0] for e in epochs]
    assert (
        load_state_file(cut / STATE_NAME)["optimizer"]["state"].keys()
        == load_state_file(full / STATE_NAME)["optimizer"]["state"].keys()
    )
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))
    print(
        f"uninterrupted {t_full:.1f}s, resumed part {t_resume:.1f}s, dev rsum per epoch {rsums}, "
        f"max weight difference {worst:.1e}"
    )


def test_resume_with_bert_dropout_is_exact(tmp_path, small_data):
    """In process, stopped by max_steps mid-epoch: dropout draws continue from the saved RNG."""
    from transformers import BertModel

    bert_dir = tmp_path / "bert"
    tok = tiny_bert_tokenizer(bert_dir)
    BertModel(tiny_bert_config(vocab_size=len(tok)), add_pooling_layer=False).save_pretrained(bert_dir)
    model = {"text_encoder": "bert", "text_model": str(bert_dir)}
    config = write_config(tmp_path / "cfg.yaml", data_path=str(small_data), epochs=2, save_every_steps=100, model=model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = train(load_train_config(config, [f"output_dir={tmp_path / 'full'}"]))
        part = train(load_train_config(config, [f"output_dir={tmp_path / 'cut'}", "max_steps=22"]))
        assert part.stopped_early and part.global_step == 22
        state = load_state_file(tmp_path / "cut" / STATE_NAME)
        assert (state["epoch"], state["step_in_epoch"]) == (1, 7)
        rest = train(load_train_config(config, [f"output_dir={tmp_path / 'cut'}"]), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert rest.global_step == full.global_step == 30
    assert [(h["rsum"], h["train_loss"]) for h in rest.history] == [(h["rsum"], h["train_loss"]) for h in full.history]
    assert_same_weights(tmp_path / "full" / "last", tmp_path / "cut" / "last")
    # the BERT backbone trains at lr x 0.1 in its own optimiser group
    groups = state["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["main", "backbone"]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)


def test_resume_refuses_a_changed_configuration(tmp_path, small_data):
    config = write_config(tmp_path / "cfg.yaml", data_path=str(small_data), epochs=1)
    out = tmp_path / "out"
    train(load_train_config(config, [f"output_dir={out}", "max_steps=3"]))
    with pytest.raises(EslmatchError, match="differs from the saved run in lr, model.embed_size"):
        train(load_train_config(config, [f"output_dir={out}", "lr=0.1", "model.embed_size=64"]), resume=True)
    with pytest.raises(EslmatchError, match="already holds a training run"):
        train(load_train_config(config, [f"output_dir={out}"]))


# ---------------------------------------------------------------------- learning
def chance_rsum(n_images: int, per_image: int = 5) -> float:
    """Expected rsum of random scores on ``n_images`` images with ``per_image`` captions each."""
    m = per_image * n_images
    i2t = sum(1 - comb(m - per_image, k) / comb(m, k) for k in (1, 5, 10))
    t2i = sum(min(k, n_images) / n_images for k in (1, 5, 10))
    return 100 * (i2t + t2i)


def test_training_learns_to_match(tmp_path):
    from eslmatch.data import build_vocab, open_split
    from eslmatch.evaluate import recall_metrics, score_split
    from eslmatch.factory import build_model

    data = make_precomp(
        tmp_path / "data", splits=("train", "dev"), n_images={"train": 200, "dev": 50}, regions=6, dim=16, seed=1
    )
    # warm-up (sum over negatives) for 3 epochs, then hardest negatives at lr x 0.1
    config = write_config(
        tmp_path / "cfg.yaml",
        data_path=str(data),
        output_dir=str(tmp_path / "out"),
        epochs=4,
        batch_size=50,
        lr=2e-3,
        vse_mean_warmup_epochs=3,
        lr_decay_epoch=3,
        log_every=5,
        save_every_steps=1000,
    )
    cfg = load_train_config(config)
    torch.manual_seed(cfg.seed)
    vocab = build_vocab(open_split(data, "train"))
    untrained = build_model(cfg.model.replace(vocab_size=len(vocab)), vocab)
    before = recall_metrics(score_split(untrained, open_split(data, "dev"), progress=False))["rsum"]
    t0 = time.time()
    result = train(cfg)
    seconds = time.time() - t0
    rsums = [h["rsum"] for h in result.history]
    chance = chance_rsum(50)
    print(
        f"dev rsum: chance {chance:.1f}, untrained {before:.1f}, after each epoch {rsums} "
        f"({seconds:.1f}s for {result.global_step} steps)"
    )
    losses = [h["train_loss"] for h in result.history]
    assert losses[2] < 0.7 * losses[0]  # the VSE0 loss falls
    assert result.best_rsum == max(rsums)
    assert result.best_rsum > 3 * chance and result.best_rsum > before + 100
    best = tmp_path / "out" / "best"
    from eslmatch.factory import load_pretrained

    reloaded = load_pretrained(best)
    again = recall_metrics(score_split(reloaded, open_split(data, "dev"), progress=False))["rsum"]
    assert again == pytest.approx(result.best_rsum, abs=1e-6)


# ---------------------------------------------------------------------- VSE baseline
def test_vse_model_is_mean_pooled_cosine(tmp_path):
    from _models import tiny_vocab
    from eslmatch.config import ESLConfig
    from eslmatch.factory import ESLModel, VSEModel, build_model, load_pretrained

    vocab = tiny_vocab()
    cfg = ESLConfig(
        model_type="vse",
        embed_size=32,
        num_levels=3,
        img_dim=16,
        text_encoder="gru",
        text_model=None,
        vocab_size=len(vocab),
        word_dim=16,
    )
    torch.manual_seed(0)
    model = build_model(cfg, vocab).eval()
    assert isinstance(model, VSEModel)
    ids, lens = model.tokenize(["a red circle", "the big blue square left of a green circle"])
    images = torch.rand(3, 5, 16)
    img_len = torch.tensor([5, 2, 3])
    with torch.no_grad():
        sims = model.similarity(images, img_len, ids, lens)
        regions = model.encode_images(images, img_len)
        words = model.encode_captions(ids, lens)
    img = torch.stack([regions[i, :n].mean(0) for i, n in enumerate(img_len.tolist())])
    cap = torch.stack([words[j, :n].mean(0) for j, n in enumerate(lens.tolist())])
    expected = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(cap, dim=-1).t()
    assert torch.allclose(sims, expected, atol=1e-6)
    images[1, 2:] = 123.0  # padded regions do not matter
    with torch.no_grad():
        assert torch.allclose(model.similarity(images, img_len, ids, lens), sims, atol=1e-6)
    model.save_pretrained(tmp_path / "vse")
    again = load_pretrained(tmp_path / "vse")
    assert isinstance(again, VSEModel)
    with torch.no_grad():
        assert torch.equal(again.similarity(images, img_len, ids, lens), model.similarity(images, img_len, ids, lens))
    assert set(model.parameter_counts()) == {"image_encoder", "text_encoder", "total"}
    esl = build_model(cfg.replace(model_type="esl"), vocab)
    assert isinstance(esl, ESLModel)


def test_vse_trains_through_the_command(tmp_path, small_data, capsys):
    from eslmatch.factory import VSEModel, load_pretrained

    config = write_config(
        tmp_path / "cfg.yaml", data_path=str(small_data), output_dir=str(tmp_path / "out"), model={"model_type": "vse"}
    )
    assert cli_main(["train", "--config", str(config), "max_steps=5", "global_loss_weight=1"]) == 1
    assert "index vectors are its score already" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(config), "max_steps=5"]) == 0
    records = read_records(tmp_path / "out" / "metrics.jsonl", "step")
    assert [r["step"] for r in records] == [2, 4, 5]
    assert records[-1]["loss"] < records[0]["loss"]
    assert isinstance(load_pretrained(tmp_path / "out" / "last"), VSEModel)


def test_mask_true_pairs_reads_the_training_truth(tmp_path):
    from eslmatch.errors import EslmatchError

    data = make_precomp(
        tmp_path / "data", splits=("train", "dev"), n_images={"train": 40, "dev": 20}, regions=6, dim=16
    )
    common = dict(data_path=str(data), epochs=1, batch_size=20, max_steps=2, mask_true_pairs=True)
    cfg = load_train_config(write_config(tmp_path / "a.yaml", output_dir=str(tmp_path / "a"), **common))
    with pytest.raises(EslmatchError, match="train_truth.json does not exist"):
        train(cfg)
    # every caption true of its own image; caption 0 also of every image: never a negative
    truth = [[c // 5] for c in range(200)]
    truth[0] = list(range(40))
    (data / "train_truth.json").write_text(json.dumps({"captions": truth}), encoding="utf-8")
    masked = train(load_train_config(write_config(tmp_path / "b.yaml", output_dir=str(tmp_path / "b"), **common)))
    plain_cfg = dict(common, mask_true_pairs=False)
    plain = train(load_train_config(write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "c"), **plain_cfg)))
    assert masked.global_step == plain.global_step == 2
    wb, wc = weights(tmp_path / "b" / "last"), weights(tmp_path / "c" / "last")
    assert max(float((wb[k] - wc[k]).abs().max()) for k in wb) > 1e-6  # the mask changed the updates
    (data / "train_truth.json").write_text(json.dumps({"captions": truth[:-1]}), encoding="utf-8")
    with pytest.raises(EslmatchError, match="199"):
        train(load_train_config(write_config(tmp_path / "d.yaml", output_dir=str(tmp_path / "d"), **common)))
