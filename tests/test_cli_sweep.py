"""Every sub-command, given a bad file where it expects one: a missing file, an empty file, random
bytes, a file of another kind, a path that is not valid UTF-8. Each answer must be one line on
stderr (``eslmatch: error: ...``), a non-zero exit and no traceback.

The cases run in-process (``eslmatch.cli.main``, seconds for all); a few also run as real
processes. ``python tests/test_cli_sweep.py`` prints the table (command x case -> exit code,
first line of stderr).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import randomize, tiny_gru_model  # noqa: E402
from _wait import HUNG  # noqa: E402

CASES = ("missing", "empty", "random", "other kind", "bad UTF-8 path")


@dataclass
class Row:
    command: str
    case: str
    code: int
    stderr: str

    @property
    def first(self) -> str:
        return (self.stderr.strip().splitlines() or [""])[0]

    def problem(self) -> str | None:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        if self.code == 0:
            return "exit 0"
        if "Traceback" in self.stderr:
            return "a traceback"
        if len(lines) != 1:
            return f"{len(lines)} lines on stderr"
        if not lines[0].startswith("eslmatch: error: "):
            return "not an 'eslmatch: error:' line"
        return None


def make_files(tmp: Path) -> dict[str, Path]:
    """What the commands are given besides the bad file: a model, features, a gallery."""
    from eslmatch import VSEModel
    from eslmatch.cli import main

    esl = tiny_gru_model(seed=5)
    vse = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(vse)
    model = vse.eval().save_pretrained(tmp / "model")
    feats = tmp / "feats.npy"
    np.save(feats, np.random.default_rng(0).random((8, 6, 16), dtype=np.float32))
    idx = tmp / "idx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["index", "build", "--model", str(model), "--features", str(feats), "--out", str(idx)]) == 0
    photos = tmp / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(photos / "red.png")
    inputs = tmp / "inputs.npz"
    ids, lens = esl.tokenize(["a red circle", "a blue square"])
    np.savez(inputs, images=np.load(feats)[:2], captions=ids.numpy(), cap_lens=lens.numpy())
    return {
        "model": model,
        "feats": feats,
        "idx": idx,
        "photos": photos,
        "inputs": inputs,
        "weights": model / "model.safetensors",
    }


def commands(f: dict[str, Path], tmp: Path) -> list[tuple[str, list[str], str]]:
    """``(label, argv with {F} where the bad file goes, key of the file of another kind)``."""
    m, feats, idx, out = str(f["model"]), str(f["feats"]), str(f["idx"]), str(tmp / "out")
    return [
        ("info MODEL", ["info", "{F}"], "idx"),
        ("convert CKPT", ["convert", "{F}", out], "feats"),
        ("score --inputs", ["score", m, "--inputs", "{F}"], "weights"),
        ("score MODEL", ["score", "{F}", "--inputs", str(f["inputs"])], "feats"),
        ("search --index", ["search", "--index", "{F}", "a red circle"], "model"),
        ("search --model", ["search", "--index", idx, "--model", "{F}", "a red circle"], "feats"),
        ("search --image-file", ["search", "--index", idx, "--image-file", "{F}"], "weights"),
        ("index build --model", ["index", "build", "--model", "{F}", "--features", feats, "--out", out], "feats"),
        ("index build --features", ["index", "build", "--model", m, "--features", "{F}", "--out", out], "weights"),
        (
            "index build --metadata",
            ["index", "build", "--model", m, "--features", feats, "--metadata", "{F}", "--out", out],
            "weights",
        ),
        ("index add --index", ["index", "add", "--index", "{F}", "--features", feats], "model"),
        ("index add --features", ["index", "add", "--index", idx, "--features", "{F}"], "weights"),
        ("index delete --index", ["index", "delete", "--index", "{F}", "--ids", "1"], "model"),
        ("index update --metadata", ["index", "update", "--index", idx, "--metadata", "{F}"], "weights"),
        ("index compact --index", ["index", "compact", "--index", "{F}"], "model"),
        ("index info --index", ["index", "info", "--index", "{F}"], "model"),
        ("index reindex INDEX", ["index", "reindex", "{F}", "--faiss", "flat"], "model"),
        ("embed --model", ["embed", "--model", "{F}", "--features", feats, "--out", out + ".npy"], "feats"),
        ("embed --features", ["embed", "--model", m, "--features", "{F}", "--out", out + ".npy"], "weights"),
        ("embed --captions", ["embed", "--model", m, "--captions", "{F}", "--out", out + ".npy"], "weights"),
        ("export MODEL", ["export", "{F}", "--out", out], "idx"),
        ("eval --checkpoint", ["eval", "--checkpoint", "{F}", "--data", str(tmp), "--protocol", "f30k"], "feats"),
        ("eval --scores", ["eval", "--scores", "{F}", "--data", str(tmp), "--protocol", "f30k"], "weights"),
        ("extract --images", ["extract", "--images", "{F}", "--out", out], "weights"),
        ("extract --captions", ["extract", "--images", str(f["photos"]), "--captions", "{F}", "--out", out], "weights"),
        ("train --config", ["train", "--config", "{F}"], "feats"),
        ("serve --index", ["serve", "--index", "{F}", "--port", "0"], "model"),
    ]


def bad_file(case: str, tmp: Path, other: Path, n: int) -> str:
    if case == "missing":
        return str(tmp / f"missing-{n}.bin")
    if case == "other kind":
        return str(other)
    if case == "bad UTF-8 path":
        return str(tmp / f"caf\udce9-{n}.bin")  # b"caf\xe9" (Latin-1), as Python decodes it
    path = tmp / f"{case}-{n}.bin"
    path.write_bytes(b"" if case == "empty" else np.random.default_rng(n).integers(0, 256, 5000, np.uint8).tobytes())
    return str(path)


def run_in_process(argv: list[str]) -> tuple[int, str]:
    from eslmatch.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, err.getvalue()


def sweep(tmp: Path) -> list[Row]:
    files = make_files(tmp)
    rows = []
    for n, (label, argv, other) in enumerate(commands(files, tmp)):
        for case in CASES:
            path = bad_file(case, tmp, files[other], n)
            code, err = run_in_process([path if a == "{F}" else a for a in argv])
            rows.append(Row(label, case, code, err))
            for leftover in (tmp / "out", tmp / "out.npy"):  # nothing is written by a refused command
                assert not leftover.exists(), f"{label} / {case} left {leftover}"
    return rows


def table(rows: list[Row], tmp: Path) -> str:
    lines = ["| command | case | exit | first line of stderr |", "| --- | --- | ---: | --- |"]
    for r in rows:
        first = r.first.replace(str(tmp), "$DIR").replace("|", "\\|")
        lines.append(f"| {r.command} | {r.case} | {r.code} | {first[:150]} |")
    return "\n".join(lines)


def test_every_command_answers_a_bad_file_in_one_line(tmp_path):
    rows = sweep(tmp_path)
    print("\n" + table(rows, tmp_path))
    assert len(rows) == len(commands(make_files(tmp_path / "again"), tmp_path)) * len(CASES)
    bad = [f"{r.command} / {r.case}: {r.problem()}: {r.stderr.strip()[-300:]}" for r in rows if r.problem()]
    assert not bad, f"{len(bad)} case(s):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "argv",
    [
        [b"info", b"RANDOM"],
        [b"search", b"--index", b"IDX", b"\xed\xa0\x80 dog"],
        [b"index", b"build", b"--model", b"MODEL", b"--features", b"caf\xe9.npy", b"--out", b"OUT"],
    ],
    ids=["info random bytes", "search invalid UTF-8 query", "index build invalid UTF-8 path"],
)
def test_real_processes_answer_in_one_line(tmp_path, argv):
    files = make_files(tmp_path)
    (tmp_path / "random.pth.tar").write_bytes(os.urandom(5000))
    subst = {
        b"RANDOM": os.fsencode(tmp_path / "random.pth.tar"),
        b"IDX": os.fsencode(files["idx"]),
        b"MODEL": os.fsencode(files["model"]),
        b"OUT": os.fsencode(tmp_path / "out"),
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"eslmatch.cli", *[subst.get(a, a) for a in argv]],
        capture_output=True,
        env=env,
        timeout=HUNG,
    )
    row = Row(
        " ".join(a.decode("utf-8", "replace") for a in argv),
        "process",
        proc.returncode,
        proc.stderr.decode("utf-8", "replace"),
    )
    assert row.problem() is None, (row.problem(), row.stderr)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(table(sweep(Path(d)), Path(d)))
