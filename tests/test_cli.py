"""The command line: version, info, convert, score, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import eslmatch
from _models import FIXTURES, make_released_checkpoint, needs_fixtures, released_inputs
from eslmatch.cli import main


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    path = d / "esl_h.pth.tar"
    make_released_checkpoint(path, "heuristic")
    images, caps, lens = released_inputs()
    np.savez(d / "inputs.npz", images=images.numpy(), captions=caps.numpy(), cap_lens=lens.numpy())
    return path, d / "inputs.npz"


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("eslmatch: error: ")
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_version():
    out = subprocess.run([sys.executable, "-m", "eslmatch.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"eslmatch {eslmatch.__version__}"


def test_info_both_formats(capsys, released, tmp_path):
    path, _ = released
    code, out, _ = run_cli(capsys, "info", str(path))
    assert code == 0 and "format     released" in out and "ESL-H" in out and "correspondence" in out
    code, out, _ = run_cli(capsys, "convert", str(path), str(tmp_path / "ours"))
    assert code == 0 and "converted" in out
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "ours"), "--json")
    info = json.loads(out)
    assert info["format"] == "eslmatch" and info["config"]["strategy"] == "heuristic"
    assert info["parameters"]["total"] == sum(v for k, v in info["parameters"].items() if k != "total")


def test_score_matches_after_convert(capsys, released, tmp_path):
    path, inputs = released
    assert run_cli(capsys, "score", str(path), "--inputs", str(inputs), "--save", str(tmp_path / "a.npy"))[0] == 0
    assert run_cli(capsys, "convert", str(path), str(tmp_path / "ours"))[0] == 0
    assert (
        run_cli(capsys, "score", str(tmp_path / "ours"), "--inputs", str(inputs), "--save", str(tmp_path / "b.npy"))[0]
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_info_prints_the_library_description(capsys, released, tmp_path):
    """``info --json`` prints :func:`describe_model`, ``info`` :func:`format_model`, ``info
    --verify`` checks with :func:`verify_checkpoint`, for both formats."""
    from eslmatch.factory import load_model
    from eslmatch.model.describe import describe_model, format_model, verify_checkpoint

    path, _ = released
    ours = tmp_path / "ours"
    load_model(path).save_pretrained(ours)
    for where, verified in ((path, False), (ours, True)):
        model = load_model(where)
        flags = ["--verify"] if verified else []
        code, out, _ = run_cli(capsys, "info", str(where), "--json", *flags)
        assert code == 0 and json.loads(out) == describe_model(model, str(where), verified)
        code, out, _ = run_cli(capsys, "info", str(where), *flags)
        assert code == 0 and out == format_model(model, str(where), verified) + "\n"
    assert verify_checkpoint(ours) == load_model(ours).weights_digest["sha256"]
    with pytest.raises(eslmatch.EslmatchError, match="a released checkpoint records no digest"):
        verify_checkpoint(path)


def test_score_prints_the_library_scores(capsys, released, tmp_path):
    """``score --save`` writes :func:`score_inputs`' matrix and ``--compare`` prints
    :func:`relative_error`."""
    from eslmatch.factory import load_model
    from eslmatch.scoring.inputs import read_score_inputs, relative_error, score_inputs

    path, inputs = released
    arrays = read_score_inputs(inputs)
    sims = score_inputs(load_model(path), arrays, inputs)
    np.savez(tmp_path / "with_ref.npz", **arrays, ref=sims + 1e-3)
    args = ["score", str(path), "--inputs", str(tmp_path / "with_ref.npz"), "--save", str(tmp_path / "s.npy")]
    code, out, _ = run_cli(capsys, *args, "--compare", "ref", "--tolerance", "1")
    assert code == 0 and np.array_equal(np.load(tmp_path / "s.npy"), sims)
    err = relative_error(sims, read_score_inputs(tmp_path / "with_ref.npz"), "ref", tmp_path / "with_ref.npz")
    assert f"max relative error vs ref: {err:.3e} (OK, tolerance 1)" in out and err > 0
    with pytest.raises(eslmatch.EslmatchError, match="no array 'nope' to compare with"):
        relative_error(sims, arrays, "nope", inputs)
    code, _, stderr = run_cli(capsys, "score", str(path), "--inputs", str(tmp_path / "missing.npz"))
    assert_one_line_error(code, stderr, "missing.npz: no such inputs file")


@needs_fixtures
def test_score_reference_fixture(capsys):
    code, out, _ = run_cli(
        capsys,
        "score",
        str(FIXTURES / "official_adaptive.pth.tar"),
        "--inputs",
        str(FIXTURES / "official_adaptive_io.npz"),
        "--compare",
        "sims",
    )
    assert code == 0 and "OK" in out


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", str(tmp_path / "missing.pth.tar"))
    assert_one_line_error(code, err, "no such file")


def test_truncated_file(capsys, released, tmp_path):
    path, _ = released
    bad = tmp_path / "cut.pth.tar"
    bad.write_bytes(path.read_bytes()[:5000])
    code, _, err = run_cli(capsys, "convert", str(bad), str(tmp_path / "out"))
    assert_one_line_error(code, err, "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_disallowed_pickle(capsys, tmp_path):
    from test_official import _Evil

    bad = tmp_path / "evil.pth.tar"
    torch.save({"model": [{}, {}, {}], "opt": _Evil()}, bad)
    code, _, err = run_cli(capsys, "info", str(bad))
    assert_one_line_error(code, err, "refused to load")


def test_other_model_names_missing_keys(capsys, released, tmp_path):
    path, _ = released
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"][2] = {k: v for k, v in ckpt["model"][2].items() if "masks_2" not in k}
    bad = tmp_path / "other.pth.tar"
    torch.save(ckpt, bad)
    code, _, err = run_cli(capsys, "info", str(bad))
    assert_one_line_error(code, err, "missing keys")
    assert "correspondence.S.2" in err


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("dim", "dimension"),
        ("lengths", "beyond the tensor"),
        ("empty", "empty"),
    ],
)
def test_bad_score_inputs(capsys, released, tmp_path, case, pattern):
    path, inputs = released
    d = dict(np.load(inputs))
    if case == "dim":
        d["images"] = d["images"][..., :30]
    elif case == "lengths":
        d["cap_lens"][1] = d["captions"].shape[1] + 4
    else:
        d["captions"][2] = 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, **d)
    code, _, err = run_cli(capsys, "score", str(path), "--inputs", str(bad))
    assert_one_line_error(code, err, pattern)


def test_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "junk.pth.tar"
    bad.write_bytes(b"not a checkpoint at all")
    out = subprocess.run([sys.executable, "-m", "eslmatch.cli", "info", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    debug = subprocess.run(
        [sys.executable, "-m", "eslmatch.cli", "--debug", "info", str(bad)], capture_output=True, text=True
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_convert_refuses_a_file_or_a_foreign_folder_as_target(capsys, released, tmp_path):
    """A user's file is never replaced by a model folder, nor a folder that is not a model."""
    path, _ = released
    precious = tmp_path / "notes.txt"
    precious.write_text("precious")
    code, _, err = run_cli(capsys, "convert", str(path), str(precious))
    assert_one_line_error(code, err, "exists and is not a folder")
    assert precious.read_text() == "precious"
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    code, _, err = run_cli(capsys, "convert", str(path), str(folder))
    assert_one_line_error(code, err, "not an eslmatch model")
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]
    # converting twice into the same model folder replaces it, leaving no litter beside it
    out = tmp_path / "model"
    assert run_cli(capsys, "convert", str(path), str(out))[0] == 0
    assert run_cli(capsys, "convert", str(path), str(out))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "notes.txt", "photos"]


@pytest.mark.parametrize("command", ["export", "index build", "convert"])
def test_an_out_that_is_a_fifo_is_refused_not_waited_on(command, released, tmp_path):
    """Issue 34: ``export --out FIFO`` hung for ever (replacing the FIFO opened it to delete
    it). Every command that writes a folder refuses a FIFO in the way, in one line."""
    import os

    from _models import tiny_gru_model

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    model_dir = tiny_gru_model(img_dim=16).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "feats.npy", np.random.default_rng(0).random((3, 4, 16), dtype=np.float32))
    args = {
        "export": ["export", str(model_dir), "--out", str(fifo)],
        "index build": [
            "index",
            "build",
            "--model",
            str(model_dir),
            "--features",
            str(tmp_path / "feats.npy"),
            "--out",
            str(fifo),
        ],
        "convert": ["convert", str(released[0]), str(fifo)],
    }[command]
    run = subprocess.run(
        [sys.executable, "-m", "eslmatch.cli", *args], capture_output=True, text=True, timeout=300
    )  # the timeout stops a hang: the old behaviour
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(err) == 1 and "exists and is not a folder" in err[0], run.stderr
    assert fifo.exists() and not fifo.is_dir()
