"""The command line and its files (issue 19, section 3): files that are not checkpoints, invalid
UTF-8 in argv, damaged weights (digests), the umask, one rule for sub-folders, str queries that
name a photo, articles, ESL-CLIP in ``eslmatch score``, Ctrl-C and a closed stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli import eslmatch_argv, interrupted, start
from _models import randomize, tiny_gru_model
from _wait import HUNG
from eslmatch import VSEModel, load_pretrained
from eslmatch.cli import main
from eslmatch.data.files import list_images
from eslmatch.errors import CheckpointError, InputError, with_article
from eslmatch.model.digest import DIGEST_NAME, verify_weights
from eslmatch.utils.digest import cache_path, file_digest

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
BAD_UTF8 = "\udced\udca0\udc80 dog"  # what Python makes of the argv bytes b"\xed\xa0\x80 dog"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(capsys, argv: list[str], *needles: str) -> str:
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("eslmatch: error: "), (argv, out, err)
    assert "Traceback" not in err and "IndexError" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def gallery(tmp_path):
    """A tiny VSE model folder and an image gallery built with it: ``(tmp, model_dir, index_dir)``."""
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    model_dir = model.eval().save_pretrained(tmp_path / "model")
    np.save(tmp_path / "feats.npy", np.random.default_rng(0).random((12, 6, 16), dtype=np.float32))
    idx = tmp_path / "idx"
    assert (
        main(
            ["index", "build", "--model", str(model_dir), "--features", str(tmp_path / "feats.npy"), "--out", str(idx)]
        )
        == 0
    )
    return tmp_path, model_dir, idx


def damage(path: Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of a file, in place (its size unchanged)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes())


# ---------------------------------------------------------------- files that are not checkpoints
@pytest.mark.parametrize("kind", ["random", "passwd", "empty", "pickle-ish"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(capsys, gallery, kind):
    tmp, _, idx = gallery
    bad = tmp / "garbage.pth.tar"
    rng = np.random.default_rng(0)
    bad.write_bytes(
        {
            "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            "passwd": b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
            "empty": b"",
            "pickle-ish": b"\x80\x02" + rng.integers(0, 256, 4998, dtype=np.uint8).tobytes(),
        }[kind]
    )
    for argv in (
        ["info", str(bad)],
        ["convert", str(bad), str(tmp / "out")],
        ["search", "--index", str(idx), "--model", str(bad), "a red circle"],
    ):
        line = one_line(capsys, argv, str(bad), "not a PyTorch checkpoint")
        assert "nothing in it was executed" in line or "neither a zip archive nor a pickle" in line or "empty" in line
    assert not (tmp / "out").exists()


# ---------------------------------------------------------------- invalid UTF-8
def test_invalid_utf8_in_argv_is_one_line_before_anything_loads(capsys, gallery):
    _, _, idx = gallery
    one_line(capsys, ["search", "--index", str(idx), BAD_UTF8], "argument 4", "not valid UTF-8", "\\xed\\xa0\\x80")
    one_line(capsys, ["info", "/tmp/\udcff.pth.tar"], "argument 2", "not valid UTF-8")


def test_invalid_utf8_from_a_real_argv(gallery):
    _, _, idx = gallery
    argv = [
        os.fsencode(sys.executable),
        b"-m",
        b"eslmatch.cli",
        b"search",
        b"--index",
        os.fsencode(idx),
        b"\xed\xa0\x80 dog",
    ]
    proc = subprocess.run(argv, capture_output=True, env=ENV, timeout=HUNG)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("eslmatch: error: argument 4") and "Traceback" not in err


def test_the_library_refuses_a_lone_surrogate_in_a_caption():
    model = tiny_gru_model()
    with pytest.raises(InputError, match="caption 1 is not valid Unicode"):
        model.tokenize(["a red circle", BAD_UTF8])


# ---------------------------------------------------------------- weights digests
def test_a_model_folder_records_its_digest_and_refuses_damaged_weights(capsys, gallery):
    tmp, model_dir, idx = gallery
    weights = model_dir / "model.safetensors"
    record = json.loads((model_dir / DIGEST_NAME).read_text())
    assert record["files"]["model.safetensors"]["bytes"] == weights.stat().st_size
    code, out, _ = run(capsys, "info", "--verify", str(model_dir))
    assert code == 0 and f"sha256 {record['files']['model.safetensors']['sha256']} (verified" in out
    assert run(capsys, "search", "--index", str(idx), "a red circle", "-k", "2")[0] == 0
    damage(weights)
    now = file_digest(weights, use_cache=False)
    recorded = record["files"]["model.safetensors"]["sha256"]
    for argv in (
        ["info", str(model_dir)],
        ["info", "--verify", str(model_dir)],
        ["search", "--index", str(idx), "a red circle"],
    ):
        one_line(capsys, argv, now[:16], recorded[:16], "differs")


def test_an_index_refuses_damaged_weights_of_a_folder_without_a_digest(capsys, gallery):
    """A model folder written before digests existed: the index's record still catches it."""
    _, model_dir, idx = gallery
    recorded = json.loads((idx / "manifest.json").read_text())["model"]["weights"]
    assert recorded["format"] == "eslmatch" and len(recorded["sha256"]) == 64
    (model_dir / DIGEST_NAME).unlink()
    damage(model_dir / "model.safetensors")
    assert run(capsys, "info", str(model_dir))[0] == 0  # nothing to check against: loads as before
    one_line(capsys, ["info", "--verify", str(model_dir)], f"no {DIGEST_NAME}")
    line = one_line(capsys, ["search", "--index", str(idx), "a red circle"], "damaged or replaced")
    assert (
        recorded["sha256"][:16] in line and file_digest(model_dir / "model.safetensors", use_cache=False)[:16] in line
    )


def test_the_digest_cache_is_a_shortcut_only(tmp_path, monkeypatch):
    model_dir = tiny_gru_model().save_pretrained(tmp_path / "m")
    weights = model_dir / "model.safetensors"
    true = file_digest(weights, use_cache=False)
    calls = []
    import eslmatch.utils.digest as digest

    real = digest.sha256_stream
    monkeypatch.setattr(digest, "sha256_stream", lambda p, *a: calls.append(p) or real(p, *a))
    load_pretrained(model_dir)
    assert calls == []  # save_pretrained left the digest for the first load: no second read
    cache_path(weights).write_text("{not json")  # malformed: computed again, and right
    assert file_digest(weights) == true and len(calls) == 1
    cache_path(weights).unlink()
    assert file_digest(weights) == true and len(calls) == 2
    # a cache that lies (same size and mtime, e.g. bytes changed and the mtime put back) fools
    # the fast path, but --verify reads every byte
    st = weights.stat()
    damage(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify_weights(model_dir)  # trusts the cache
    with pytest.raises(CheckpointError, match="differs"):
        verify_weights(model_dir, use_cache=False)


# ---------------------------------------------------------------- the umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_model_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        model_dir = tiny_gru_model().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in model_dir.iterdir() if not p.name.startswith(".")}
    assert modes["model.safetensors"] == 0o666 & ~mask, modes
    assert len(set(modes.values())) == 1, modes  # every file alike


# ---------------------------------------------------------------- sub-folders
def test_one_rule_for_sub_folders(tmp_path):
    (tmp_path / "trips").mkdir()
    for rel in ("a.jpg", "trips/b.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    entries, refused = list_images(tmp_path)
    assert [e.id for e in entries] == ["a", "trips/b"] and refused == []
    entries, refused = list_images(tmp_path, recursive=False)
    assert [e.id for e in entries] == ["a"]
    assert refused == [("trips/", "a sub-folder, not read (recursion is off)")]
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"x")  # a Latin-1 name: said, not read
    entries, refused = list_images(tmp_path)
    assert [e.id for e in entries] == ["a", "trips/b"] and refused == [("caf\\xe9.jpg", "its name is not valid UTF-8")]
    from eslmatch.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["extract", "--images", "x", "--out", "y"]).recursive is True
    assert parse(["extract", "--images", "x", "--out", "y", "--no-recursive"]).recursive is False


# ---------------------------------------------------------------- str queries, articles
def test_a_str_naming_a_photo_is_not_searched_as_text(gallery, monkeypatch):
    tmp, _, idx = gallery
    from eslmatch.retrieval import open_gallery

    photo = tmp / "chelsea.jpg"
    photo.write_bytes(b"x")
    monkeypatch.chdir(tmp)
    g = open_gallery(idx)
    with pytest.raises(
        Exception, match=r"is an image file, but a str query is searched as text: pass Path\('chelsea.jpg'\)"
    ):
        g.search("chelsea.jpg")
    with pytest.raises(Exception, match=r"a query image given as the str 'chelsea.jpg': pass Path\('chelsea.jpg'\)"):
        g.searcher.images(["chelsea.jpg"])
    assert g.search("a red circle", k=2)  # a sentence is still a sentence


def test_articles():
    assert [with_article(w) for w in ("int", "str", "image", "caption", "'esl'", "'vse'")] == [
        "an int",
        "a str",
        "an image",
        "a caption",
        "an 'esl'",
        "a 'vse'",
    ]


# ---------------------------------------------------------------- score with ESL-CLIP
def test_score_compares_esl_clip_with_the_released_code(capsys, tmp_path):
    from released_clip_forward import random_release, released_similarity

    ckpt = random_release(
        "heuristic", embed=32, levels=2, vision_width=64, vision_layers=1, text_width=64, text_layers=1, seed=3
    )
    path = tmp_path / "model_best_heuristic_coco_clip_based.pth"
    torch.save(ckpt, path)
    import eslmatch

    model = eslmatch.load_official_checkpoint(path)
    texts = ["a red circle", "two dogs on the grass", "a blue square left of a circle"]
    ids, _ = model.tokenize(texts)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = released_similarity(ckpt["state_dict"], pixels, ids, True).numpy()
    np.savez(tmp_path / "ids.npz", images=pixels.numpy(), captions=ids.numpy(), sims=ref)  # no cap_lens
    np.savez(tmp_path / "text.npz", images=pixels.numpy(), captions=np.array(texts), sims=ref)
    np.savez(tmp_path / "wrong.npz", images=pixels.numpy(), captions=ids.numpy(), sims=ref + 0.1)
    assert main(["convert", str(path), str(tmp_path / "converted")]) == 0
    for m in (path, tmp_path / "converted"):
        for inputs in ("ids.npz", "text.npz"):
            code, out, err = run(capsys, "score", str(m), "--inputs", str(tmp_path / inputs), "--compare", "sims")
            assert code == 0 and "(OK, tolerance 1e-05)" in out, (out, err)
    code, out, _ = run(capsys, "score", str(path), "--inputs", str(tmp_path / "wrong.npz"), "--compare", "sims")
    assert code == 1 and "FAIL" in out


# ---------------------------------------------------------------- Ctrl-C, a closed stdout
def test_a_closed_stdout_ends_quietly(gallery):
    _, _, idx = gallery
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (| head that already quit)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "eslmatch.cli", "search", "--index", str(idx), "a red circle", "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            env=ENV,
            timeout=HUNG,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == b"", proc.stderr.decode()


def test_a_pipe_into_head_ends_quietly(gallery):
    """``eslmatch search ... --json | head -3``, as a shell runs it."""
    _, _, idx = gallery
    cmd = f"{sys.executable} -m eslmatch.cli search --index {idx} 'a red circle' -k 12 --json | head -3"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=ENV, timeout=HUNG)
    assert len(proc.stdout.splitlines()) == 3 and proc.stderr == "", proc.stderr
    assert proc.returncode in (0, 141)  # 141 only when head quit before the last write


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    """Ctrl-C once the demo has started its work: one line and 130, within seconds. Started as a
    terminal starts it (SIGINT at its default: a test suite run in the background by a script
    hands its children SIGINT ignored, which is what lost this interrupt before) and without
    PYTHONUNBUFFERED: the demo's first line reaches the pipe as it is printed."""
    argv = ["demo", "--out", str(tmp_path / "report"), "--cache", str(tmp_path / "cache"), "--no-progress"]
    proc = start(eslmatch_argv(*argv, "--train", "3000"), env=ENV)

    def started() -> None:
        first = proc.stdout.readline()  # the demo has started its work
        assert first.startswith(b"[data]"), first

    code, err = interrupted(proc, started)
    assert code == 130, err
    assert err.strip() == "eslmatch: interrupted"
