"""Recall metrics, protocols, score_split and the ``eslmatch eval`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eslmatch.evaluate as ev
import eslmatch.evaluate.run as run_api
from _datagen import make_precomp
from _models import tiny_gru_model
from _wait import HUNG
from eslmatch.cli import main
from eslmatch.data import open_split
from eslmatch.errors import EslmatchError

ESLMATCH = Path(sys.executable).with_name("eslmatch")


# ---------------------------------------------------------------------- the loop definition
def loop_ranks(sims: np.ndarray, k: int = 5):
    """One row at a time, exactly as defined: positions in argsort(row)[::-1]."""
    sims = np.asarray(sims, dtype=np.float64)
    n = sims.shape[0]
    i2t = np.zeros(n)
    for i in range(n):
        order = list(np.argsort(sims[i])[::-1])
        i2t[i] = min(order.index(c) for c in range(k * i, k * i + k))
    cols = sims.T
    t2i = np.zeros(k * n)
    for c in range(k * n):
        order = list(np.argsort(cols[c])[::-1])
        t2i[c] = order.index(c // k)
    return i2t, t2i


def loop_metrics(ranks: np.ndarray) -> dict:
    return {
        "r1": 100.0 * len(np.where(ranks < 1)[0]) / len(ranks),
        "r5": 100.0 * len(np.where(ranks < 5)[0]) / len(ranks),
        "r10": 100.0 * len(np.where(ranks < 10)[0]) / len(ranks),
        "medr": np.floor(np.median(ranks)) + 1,
        "meanr": ranks.mean() + 1,
    }


@pytest.mark.parametrize("k", [5, 2, 1])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_vectorised_ranks_equal_the_loop(k, decimals, monkeypatch):
    rng = np.random.default_rng(k * 10 + (decimals or 7))
    sims = rng.standard_normal((23, 23 * k)).astype(np.float32)
    if decimals is not None:  # many ties
        sims = np.round(sims * 2, decimals).astype(np.float32)
    i2t, t2i = loop_ranks(sims, k)
    np.testing.assert_array_equal(ev.i2t_ranks(sims, k), i2t)
    np.testing.assert_array_equal(ev.t2i_ranks(sims, k), t2i)
    monkeypatch.setattr(ev, "_RANK_CHUNK_BYTES", 1)  # one row per chunk: same answer
    np.testing.assert_array_equal(ev.i2t_ranks(sims, k), i2t)
    np.testing.assert_array_equal(ev.t2i_ranks(sims, k), t2i)
    result = ev.recall_metrics(sims, k)
    assert result["i2t"] == pytest.approx(loop_metrics(i2t))
    assert result["t2i"] == pytest.approx(loop_metrics(t2i))
    assert result["rsum"] == pytest.approx(
        sum(loop_metrics(i2t)[f"r{j}"] + loop_metrics(t2i)[f"r{j}"] for j in (1, 5, 10))
    )


def test_all_ties_follow_numpy_argsort():
    sims = np.zeros((12, 60), dtype=np.float32)
    i2t, t2i = loop_ranks(sims)
    np.testing.assert_array_equal(ev.i2t_ranks(sims), i2t)
    np.testing.assert_array_equal(ev.t2i_ranks(sims), t2i)


def test_hand_made_ranks():
    # 2 images, 2 captions each (k=2): captions 0,1 of image 0; 2,3 of image 1
    sims = np.array(
        [
            [0.1, 0.9, 0.5, 0.3],  # image 0: order 1,2,3,0 -> its best caption (1) at 0
            [0.8, 0.2, 0.1, 0.7],  # image 1: order 0,3,1,2 -> caption 3 at position 1
        ]
    )
    np.testing.assert_array_equal(ev.i2t_ranks(sims, 2), [0, 1])
    # caption columns: c0 (0.1, 0.8) -> image 0 second; c1 -> first; c2 (0.5, 0.1) -> image 1 second; c3 -> first
    np.testing.assert_array_equal(ev.t2i_ranks(sims, 2), [1, 0, 1, 0])
    m = ev.recall_metrics(sims, 2)
    assert m["i2t"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.5}
    assert m["t2i"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.5}
    assert m["rsum"] == 500.0


def test_medr_floor_and_identity():
    ranks = np.array([0, 1, 2, 3])  # median 1.5 -> floor 1 -> medr 2
    assert ev.summarize_ranks(ranks)["medr"] == 2.0
    perfect = np.full((4, 20), -1.0)
    for i in range(4):
        perfect[i, 5 * i : 5 * i + 5] = 1.0
    assert ev.recall_metrics(perfect)["rsum"] == 600.0


def test_protocols():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((10, 50))
    f30k = ev.evaluate_protocol(sims, "f30k")
    assert f30k["rsum"] == ev.recall_metrics(sims)["rsum"] and f30k["protocol"] == "f30k"
    assert (f30k["n_images"], f30k["n_captions"], f30k["standard_size"]) == (10, 50, False)
    coco1k = ev.evaluate_protocol(sims, "coco1k", fold_size=2)
    folds = [ev.recall_metrics(sims[2 * f : 2 * f + 2, 10 * f : 10 * f + 10]) for f in range(5)]
    assert coco1k["folds"] == folds
    assert coco1k["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    for side in ("i2t", "t2i"):
        for key in ("r1", "r5", "r10", "medr", "meanr"):
            assert coco1k[side][key] == pytest.approx(np.mean([f[side][key] for f in folds]))
    with pytest.raises(EslmatchError, match="5 folds of 1000 images.*has 10.*--fold-size 2"):
        ev.evaluate_protocol(sims, "coco1k")
    with pytest.raises(EslmatchError, match="unknown protocol"):
        ev.evaluate_protocol(sims, "coco2k")


def test_score_matrix_checks():
    with pytest.raises(EslmatchError, match=r"\(N, 5N\)"):
        ev.recall_metrics(np.zeros((4, 19)))
    with pytest.raises(EslmatchError, match="2-D"):
        ev.recall_metrics(np.zeros(20))
    bad = np.zeros((2, 10))
    bad[1, 3] = np.nan
    with pytest.raises(EslmatchError, match="image 1, caption 3"):
        ev.recall_metrics(bad)


def test_ensemble_is_the_mean():
    a, b = np.random.default_rng(1).standard_normal((2, 3, 15)).astype(np.float32)
    np.testing.assert_allclose(ev.ensemble([a, b]), (a.astype(np.float64) + b) / 2)
    with pytest.raises(EslmatchError, match="shape"):
        ev.ensemble([a, b[:2, :10]])


def test_score_split_equals_the_model(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=6, layout="repeated")
    split = open_split(tmp_path, "test")
    model = tiny_gru_model()
    sims = ev.score_split(model, split, batch_size=4, progress=False, chunk_bytes=1)
    assert model.training and sims.shape == (6, 30) and sims.dtype == np.float32
    model.eval()
    with torch.no_grad():
        ids, lens = model.tokenize(split.captions)
        ref = model.similarity(torch.from_numpy(split.read_images(slice(None))), None, ids, lens).numpy()
    np.testing.assert_allclose(sims, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the command
def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_scores_round_trip_and_ensemble(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 10, 50)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    code, out, _ = run_cli(capsys, "eval", "--scores", tmp_path / "a.npy", "--protocol", "f30k", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["rsum"] == pytest.approx(ev.recall_metrics(a)["rsum"]) and res["models"] == [str(tmp_path / "a.npy")]
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--scores",
        tmp_path / "a.npy",
        "--scores",
        tmp_path / "b.npy",
        "--protocol",
        "coco1k",
        "--fold-size",
        2,
        "--json",
        "--save-scores",
        tmp_path / "ens.npy",
    )
    assert code == 0
    res = json.loads(out)
    mean = (a.astype(np.float64) + b) / 2
    assert res["rsum"] == pytest.approx(ev.evaluate_protocol(mean, "coco1k", fold_size=2)["rsum"])
    assert len(res["folds"]) == 5 and res["ensemble"] == 2
    saved = np.load(tmp_path / "ens.npy")
    assert saved.dtype == np.float32
    np.testing.assert_allclose(saved, mean, rtol=1e-6)
    code, out, _ = run_cli(capsys, "eval", "--scores", tmp_path / "a.npy", "--protocol", "f30k")
    assert code == 0 and "rsum" in out and "i2t" in out and "t2i" in out


def test_eval_scores_errors(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((4, 19), np.float32))
    code, _, err = run_cli(capsys, "eval", "--scores", tmp_path / "bad.npy", "--protocol", "f30k")
    assert code == 1 and "bad.npy" in err and "(N, 5N)" in err
    np.save(tmp_path / "obj.npy", np.array([{"sims": 1}], dtype=object), allow_pickle=True)
    code, _, err = run_cli(capsys, "eval", "--scores", tmp_path / "obj.npy", "--protocol", "f30k")
    assert code == 1 and "obj.npy" in err and "pickled" in err
    np.save(tmp_path / "a.npy", np.zeros((2, 10), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((3, 15), np.float32))
    code, _, err = run_cli(
        capsys, "eval", "--scores", tmp_path / "a.npy", "--scores", tmp_path / "b.npy", "--protocol", "f30k"
    )
    assert code == 1 and "b.npy" in err and "differs" in err


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tiny_gru_model(seed=0).eval().save_pretrained(d / "m1")
    tiny_gru_model(seed=1).eval().save_pretrained(d / "m2")
    make_precomp(d / "data", splits=["test", "testall"], n_images={"test": 5, "testall": 10}, layout="repeated")
    return d


def test_eval_checkpoint_json(tiny_models, tmp_path, capsys):
    d = tiny_models
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        d / "m1",
        "--data",
        d / "data",
        "--protocol",
        "f30k",
        "--json",
        "--save-scores",
        tmp_path / "s1.npy",
        "--device",
        "cpu",
        "--batch-size",
        7,
    )
    assert code == 0
    res = json.loads(out)
    assert set(res) >= {"i2t", "t2i", "rsum", "protocol", "n_images", "n_captions", "models", "split"}
    assert set(res["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert (res["n_images"], res["n_captions"], res["split"]) == (5, 25, "test")
    s1 = np.load(tmp_path / "s1.npy")
    from eslmatch.factory import load_model

    model = load_model(d / "m1")
    np.testing.assert_allclose(s1, ev.score_split(model, open_split(d / "data", "test"), progress=False), rtol=1e-6)
    assert res["rsum"] == pytest.approx(ev.recall_metrics(s1)["rsum"])
    # an ensemble of two checkpoints on testall (coco1k, folds of 2 images) = mean of the two matrices
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        d / "m1",
        "--checkpoint",
        d / "m2",
        "--data",
        d / "data",
        "--protocol",
        "coco1k",
        "--fold-size",
        2,
        "--json",
        "--save-scores",
        tmp_path / "ens.npy",
        "--budget-mb",
        1,
    )
    assert code == 0
    res = json.loads(out)
    assert res["split"] == "testall" and len(res["folds"]) == 5
    m1 = ev.score_split(load_model(d / "m1"), open_split(d / "data", "testall"), progress=False)
    m2 = ev.score_split(load_model(d / "m2"), open_split(d / "data", "testall"), progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "ens.npy"), (m1.astype(np.float64) + m2) / 2, rtol=1e-5, atol=1e-6)


def test_eval_cli_bad_data_is_one_line_and_overwrites_nothing(tiny_models, tmp_path):
    d = tiny_models
    data = make_precomp(tmp_path / "bad", splits=["test"], n_images=5)
    lines = (data / "test_caps.txt").read_text().splitlines()
    lines[3] = ""
    (data / "test_caps.txt").write_text("\n".join(lines) + "\n")
    target = tmp_path / "scores.npy"
    target.write_bytes(b"keep me")
    proc = subprocess.run(
        [
            str(ESLMATCH),
            "eval",
            "--checkpoint",
            str(d / "m1"),
            "--data",
            str(tmp_path / "bad"),
            "--protocol",
            "f30k",
            "--save-scores",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=HUNG,
    )
    assert proc.returncode == 1
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "Traceback" not in proc.stderr
    assert "test_caps.txt" in err_lines[0] and "line 4" in err_lines[0]
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "scores.npy"]


def test_eval_checks_before_encoding(tiny_models, tmp_path, capsys):
    d = tiny_models
    model = tiny_gru_model()
    model.tokenizer = None
    model.save_pretrained(tmp_path / "no_tok")
    code, _, err = run_cli(
        capsys, "eval", "--checkpoint", tmp_path / "no_tok", "--data", d / "data", "--protocol", "f30k"
    )
    assert code == 1 and "no_tok" in err and "--text-model" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", d / "m1", "--data", d / "data", "--protocol", "coco1k")
    assert code == 1 and "the data has 10" in err and "--fold-size 2" in err


def test_score_split_encodes_in_bf16_and_scores_outside_autocast(tmp_path, monkeypatch):
    make_precomp(tmp_path, splits=["test"], n_images=6, layout="repeated")
    split = open_split(tmp_path, "test")
    model = tiny_gru_model()
    fp32 = ev.score_split(model, split, batch_size=4, progress=False, chunk_bytes=1)
    seen: list[tuple[bool, torch.dtype]] = []
    score = model.score

    def recording(img, img_len, cap, cap_len, options=None):
        seen.append((torch.is_autocast_enabled("cpu"), cap.dtype))
        return score(img, img_len, cap, cap_len, options)

    monkeypatch.setattr(model, "score", recording)
    bf16 = ev.score_split(model, split, batch_size=4, progress=False, chunk_bytes=1, precision="bf16")
    assert seen and all(not autocast and dtype == torch.float32 for autocast, dtype in seen)
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # the encoders did run in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    with pytest.raises(EslmatchError, match="precision 'fp16'"):
        ev.score_split(model, split, progress=False, precision="fp16")


def test_eval_precision_is_recorded_and_refused_with_scores(tiny_models, tmp_path, capsys):
    d = tiny_models
    args = ("eval", "--checkpoint", d / "m1", "--data", d / "data", "--protocol", "f30k", "--json")
    code, out, _ = run_cli(capsys, *args, "--precision", "bf16")
    assert code == 0 and json.loads(out)["precision"] == "bf16"
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["precision"] == "fp32"
    np.save(tmp_path / "s.npy", np.zeros((5, 25), dtype=np.float32))
    code, _, err = run_cli(capsys, "eval", "--scores", tmp_path / "s.npy", "--protocol", "f30k", "--precision", "bf16")
    assert code == 1 and "does not apply to --scores" in err


# ---------------------------------------------------------------------- the library call = the command
def cli_and_library(capsys, args: list, **kwargs) -> tuple[str, str, run_api.Evaluation]:
    """``eslmatch eval *args`` with and without ``--json``, and :func:`run_api.evaluate` (``kwargs``)."""
    code, printed_json, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0, err
    code, printed_table, err = run_cli(capsys, "eval", *args)
    assert code == 0, err
    return printed_json, printed_table, run_api.evaluate(**kwargs)


def test_the_library_returns_what_eval_prints_for_score_matrices(tmp_path, capsys):
    rng = np.random.default_rng(8)
    a, b = np.round(rng.standard_normal((2, 10, 50)), 1).astype(np.float32)  # ties too
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    truth = {"captions": [[c // 5] + ([(c // 5 + 1) % 10] if c % 3 == 0 else []) for c in range(50)]}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    a_path, b_path, t_path, save = (str(tmp_path / n) for n in ("a.npy", "b.npy", "truth.json", "ens.npy"))
    args = ["--scores", a_path, "--scores", b_path, "--protocol", "coco1k", "--fold-size", 2]
    args += ["--truth", t_path, "--save-scores", save]
    printed, table, result = cli_and_library(
        capsys, args, protocol="coco1k", scores=[a_path, b_path], fold_size=2, truth=t_path, save_scores=save
    )
    assert result.to_json() + "\n" == printed  # byte for byte
    assert json.loads(printed) == result.metrics and result.metrics["ensemble"] == 2
    assert run_api.format_evaluation(result) + "\n" == table and "truth-based" in table and "saved the" in table
    np.testing.assert_array_equal(result.scores, (a.astype(np.float64) + b) / 2)
    # one in-memory matrix, named as the command names the file
    printed, table, result = cli_and_library(
        capsys, ["--scores", a_path, "--protocol", "f30k"], protocol="f30k", scores=[a], names=[a_path]
    )
    assert result.to_json() + "\n" == printed and run_api.format_evaluation(result) + "\n" == table
    assert run_api.evaluate("f30k", scores=[a]).metrics["models"] == ["scores 1"]


def test_the_library_returns_what_eval_prints_for_checkpoints(tiny_models, capsys):
    d = tiny_models
    m1, m2, data = str(d / "m1"), str(d / "m2"), str(d / "data")
    common = ["--data", data, "--device", "cpu", "--no-progress", "--batch-size", 7]
    printed, table, result = cli_and_library(
        capsys,
        ["--checkpoint", m1, "--checkpoint", m2, "--protocol", "coco1k", "--fold-size", 2, *common],
        protocol="coco1k",
        models=[m1, m2],
        data=data,
        fold_size=2,
        device="cpu",
        progress=False,
        batch_size=7,
    )
    assert result.to_json() + "\n" == printed and run_api.format_evaluation(result) + "\n" == table
    assert json.loads(printed)["split"] == "testall" and result.scores.shape == (10, 50)
    # a loaded model, named as the command names its folder
    from eslmatch.factory import load_model

    printed, _, result = cli_and_library(
        capsys,
        ["--checkpoint", m1, "--protocol", "f30k", *common],
        protocol="f30k",
        models=[load_model(m1)],
        names=[m1],
        data=data,
        device="cpu",
        progress=False,
        batch_size=7,
    )
    assert result.to_json() + "\n" == printed


def test_the_library_refuses_as_the_command_does(tiny_models, tmp_path):
    d = tiny_models
    np.save(tmp_path / "s.npy", np.zeros((5, 25), np.float32))
    with pytest.raises(EslmatchError, match="does not apply to --scores"):
        run_api.evaluate("f30k", scores=[tmp_path / "s.npy"], precision="bf16")
    with pytest.raises(EslmatchError, match="--batch-size must be >= 1"):
        run_api.evaluate("f30k", models=[d / "m1"], data=d / "data", batch_size=0)
    with pytest.raises(EslmatchError, match="not both"):
        run_api.evaluate("f30k", models=[d / "m1"], scores=[tmp_path / "s.npy"])
    with pytest.raises(EslmatchError, match="give models"):
        run_api.evaluate("f30k")
    with pytest.raises(EslmatchError, match="1 names for 2"):
        run_api.evaluate("f30k", scores=[tmp_path / "s.npy"] * 2, names=["x"])
    with pytest.raises(EslmatchError, match="--save-scores does not go with --protocol winoground"):
        run_api.evaluate("winoground", models=[d / "m1"], save_scores=tmp_path / "x.npy")
