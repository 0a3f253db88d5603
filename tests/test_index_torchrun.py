"""``eslmatch index build`` of a gallery under torchrun (2 gloo CPU processes).

- 2 processes write the same gallery folder as 1 process, byte for byte (the manifest: every
  field but ``created``; the catalogue: every item's every field but ``added``);
- killed on one rank, then failing on one rank, then rerun: complete shards are reused (same
  inode and mtime), only the missing ones are encoded, and the result is still 1 process's;
- a bad argument, or a build torchrun cannot share: one error line, every rank exits
  non-zero, no hang;
- complete shards with holes (as a torchrun job leaves them) resume in one process too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _models import tiny_gru_model
from _wait import HUNG
from eslmatch.distributed import STOP_AFTER_ENV, STOP_MODE_ENV, STOP_RANK_ENV, deal

N, R, D = 52, 6, 16
SHARD = 8  # 52 images -> 7 shards (6 x 8, 4): rank 0 writes 0, 2, 4, 6; rank 1 writes 1, 3, 5
N_SHARDS = 7
OPTIONS = ["--shard-rows", str(SHARD), "--faiss", "ivf", "--batch-size", "3", "--device", "cpu"]
RUN_SPECIFIC = {"created"}  # the one manifest field that differs between two builds
CATALOG = "catalog.sqlite"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny saved ESL model and an ``.npy`` of region features."""
    folder = tmp_path_factory.mktemp("inputs")
    model_dir = tiny_gru_model(seed=3).save_pretrained(folder / "model")
    features = folder / "feats.npy"
    np.save(features, np.random.default_rng(11).random((N, R, D), dtype=np.float32) * 2)
    return model_dir, features


def index_build(inputs: tuple[Path, Path], out: Path, processes: int, *extra: str, **env: str):
    """``eslmatch index build`` in 1 process, or under torchrun; one intra-op thread each."""
    model_dir, features = inputs
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ESLMATCH_TEST_")}
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "eslmatch.cli", "index", "build", "--model", str(model_dir), "--features", str(features)]
    cmd += ["--out", str(out), "--dist-timeout", "2", *OPTIONS, *extra]
    return subprocess.run(
        cmd, env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=HUNG
    )


@pytest.fixture(scope="module")
def baseline(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "idx"
    proc = index_build(inputs, out, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("eslmatch: error:")]


def failed_ranks(proc: subprocess.CompletedProcess) -> set[int]:
    """The ranks torchrun's failure report lists."""
    return {int(m) for m in re.findall(r"rank\s*:\s*(\d+)", proc.stderr)}


def catalog_rows(folder: Path) -> list[tuple]:
    """The catalogue's content: every item (but its ``added`` time), fields and layout."""
    import sqlite3

    with sqlite3.connect(folder / CATALOG) as db:
        items = db.execute("SELECT row, id, path, caption, deleted FROM items ORDER BY row").fetchall()
        state = db.execute("SELECT key, value FROM state ORDER BY key").fetchall()
        fields = db.execute("SELECT * FROM fields ORDER BY name").fetchall()
    return [*items, *state, *fields]


def assert_same_index(one: Path, two: Path) -> int:
    """Every file of ``two`` equals ``one``'s byte for byte (``manifest.json``: every field but
    :data:`RUN_SPECIFIC`; the catalogue by content); returns the number of files compared."""

    def files(root: Path) -> list[str]:
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(CATALOG)
        )

    names = files(one)
    assert names == files(two)
    assert len(names) == 2 + 4 * N_SHARDS  # manifest, the FAISS file; 3 arrays + shard.json a shard
    for name in names:
        if name != "manifest.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (one, two)]
    for m in manifests:
        assert set(m) >= RUN_SPECIFIC
        for key in RUN_SPECIFIC:
            m.pop(key)
    assert manifests[0] == manifests[1]
    assert catalog_rows(one) == catalog_rows(two)
    assert not staging(two).exists()
    return len(names) + 1


def staging(out: Path) -> Path:
    return out.with_name(f".{out.name}.building")


def shard_state(folder: Path) -> dict[int, tuple[int, int]]:
    """Complete shards of a staging or index folder -> (inode, mtime ns) of their side file."""
    out = {}
    for shard in (folder / "shards").glob("[0-9]*"):
        if (shard / "shard.json").is_file():
            st = (shard / "side.npy").stat()
            out[int(shard.name)] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_two_processes_equal_one_byte_for_byte(inputs, baseline, tmp_path):
    out = tmp_path / "idx"
    t0 = time.perf_counter()
    proc = index_build(inputs, out, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("built image gallery") == 1 and "(2 processes)" in proc.stdout  # rank 0 alone
    assert f"in {N_SHARDS} shard(s)" in proc.stdout and f"({N} items" in proc.stdout
    n = assert_same_index(baseline, out)
    from eslmatch.retrieval import FileStore

    assert FileStore.open(out).faiss_kind == "ivf" and FileStore.open(out).info()["count"] == N
    print(f"2 processes == 1 process: all {n} files identical ({time.perf_counter() - t0:.1f} s)")


@pytest.mark.slow
def test_killed_then_failing_then_resumed(inputs, baseline, tmp_path):
    out = tmp_path / "idx"
    # 1. rank 0 dies (hard exit, as if killed) after its first shard; torchrun stops rank 1.
    killed = index_build(inputs, out, 2, **{STOP_AFTER_ENV: "1", STOP_RANK_ENV: "0"})
    assert killed.returncode != 0 and not out.exists()
    done_a = shard_state(staging(out))
    assert 0 in done_a and not {2, 4, 6} & set(done_a), done_a  # rank 0's later shards never ran
    # 2. rerun; rank 0 fails (an ordinary error) after one shard: every rank exits non-zero,
    #    one error line; rank 1 finishes its share, so its shards are kept.
    failing = index_build(inputs, out, 2, **{STOP_AFTER_ENV: "1", STOP_RANK_ENV: "0", STOP_MODE_ENV: "raise"})
    assert failing.returncode != 0 and not out.exists()
    assert error_lines(failing) == ["eslmatch: error: rank 0 of 2: test hook: rank 0 stopped after 1 chunk(s)"], (
        failing.stderr
    )
    assert failed_ranks(failing) == {0, 1}, failing.stderr
    assert f"resuming the build of {out}: {len(done_a)} complete shards of {N_SHARDS} kept" in failing.stderr
    pending = [i for i in range(N_SHARDS) if i not in done_a]  # at least 2, 4, 6: rank 0 gets two
    expected = set(done_a) | {deal(pending, 0, 2)[0]} | set(deal(pending, 1, 2))
    done_b = shard_state(staging(out))
    assert set(done_b) == expected, (done_a, done_b)
    assert all(done_b[i] == stamp for i, stamp in done_a.items())  # reused, not rewritten
    assert f"{len(done_b)} complete shards kept in" in failing.stderr
    # 3. rerun to the end: only the missing shards are encoded; same bytes as one process.
    final = index_build(inputs, out, 2)
    assert final.returncode == 0, final.stderr[-3000:]
    left = [i for i in range(N_SHARDS) if i not in done_b]
    assert left  # rank 0 stopped with shards of its share still to do
    assert f"{len(done_b)} complete shards of {N_SHARDS} kept" in final.stderr
    done_c = shard_state(out)
    assert {i: done_c[i] for i in done_b} == done_b  # complete shards moved into the index untouched
    n = assert_same_index(baseline, out)
    print(
        f"killed with shards {sorted(done_a)} done, failed with {sorted(done_b)} done, resumed "
        f"encoding {left}: all {n} files identical to 1 process"
    )


@pytest.mark.slow
def test_bad_argument_stops_every_rank(inputs, tmp_path):
    model_dir, _ = inputs
    t0 = time.perf_counter()
    proc = index_build((model_dir, tmp_path / "missing.npy"), tmp_path / "idx", 2)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    [line] = error_lines(proc)
    assert "missing.npy" in line, proc.stderr
    assert failed_ranks(proc) == {0, 1}, proc.stderr
    assert "Traceback" not in proc.stdout and proc.stderr.count("Traceback") == 1  # torchrun's own report
    assert "ChildFailedError" in proc.stderr
    assert not (tmp_path / "idx").exists() and not staging(tmp_path / "idx").exists()
    # a build torchrun does not share (a Milvus collection) is refused the same way
    milvus = index_build(inputs, tmp_path / "idx", 2, "--milvus", "http://127.0.0.1:9", "--collection", "c")
    assert milvus.returncode != 0 and failed_ranks(milvus) == {0, 1}, milvus.stderr
    assert error_lines(milvus) == [
        "eslmatch: error: under torchrun, index build writes gallery folders (--out), not Milvus collections: "
        "build those in one process"
    ]
    print(f"bad argument: one error line, both ranks exit 1, {elapsed:.1f} s")


@pytest.mark.slow
def test_one_process_resumes_around_missing_shards(inputs, baseline, tmp_path, monkeypatch):
    """What a torchrun job leaves (complete shards with holes: not only the first ones) is
    resumed by any number of processes; here one: only the holes and the rest are encoded."""
    from eslmatch.factory import load_model
    from eslmatch.retrieval import BuildOptions, build_gallery, writer

    model_dir, features = inputs
    out = tmp_path / "idx"

    def crash(i: int) -> None:
        if i == 3:
            raise KeyboardInterrupt  # as a kill after shard 3 was sealed

    def build() -> None:  # as the baseline: the CLI's defaults, one intra-op thread
        model = load_model(model_dir)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            opts = BuildOptions(faiss_kind="ivf", shard_rows=SHARD, batch_size=3, progress=False)
            build_gallery(model, features, out, options=opts, model_path=model_dir).close()
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(writer, "AFTER_CHUNK", crash)
    with pytest.raises(KeyboardInterrupt):
        build()
    shutil.rmtree(staging(out) / "shards" / "00001")  # a hole, as another rank would leave it
    kept = shard_state(staging(out))
    assert set(kept) == {0, 2, 3}
    written: list[int] = []
    monkeypatch.setattr(writer, "AFTER_CHUNK", written.append)
    build()
    assert written == [1, 4, 5, 6]
    assert {i: shard_state(out)[i] for i in kept} == kept
    assert_same_index(baseline, out)
