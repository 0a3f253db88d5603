"""``eslmatch extract`` under torchrun (2 gloo CPU processes).

- 2 processes write the same files as 1 process, byte for byte;
- killed, then failing on one rank, then rerun: finished chunks are reused (never rewritten)
  and the result is still the 1-process one;
- a bad argument: one error line, every rank exits non-zero, no hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _wait import HUNG
from eslmatch.distributed import (
    STOP_AFTER_ENV,
    STOP_MODE_ENV,
    STOP_RANK_ENV,
    combine_errors,
    deal,
)
from eslmatch.extract import extract_folder

skdata = pytest.importorskip("skimage.data")

SIZE, CHUNK, BATCH = 64, 2, 2  # 64 px -> 2 x 2 regions; the corrupt file makes a batch of 1
OPTIONS = ["--image-size", str(SIZE), "--chunk", str(CHUNK), "--batch-size", str(BATCH), "--device", "cpu"]
N_ENTRIES = 13  # 12 images + 1 corrupt file, all captioned -> 7 chunks (2 x 6, 1)
N_CHUNKS = 7
RUN_SPECIFIC = {"seconds", "images_per_second", "created", "processes"}  # timing / job shape


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """12 small distinct images, a truncated JPEG (skipped), an uncaptioned image (left
    out) and a captions file."""
    folder = tmp_path_factory.mktemp("imgs")
    lines = []
    k = 0
    for name in ("astronaut", "camera", "chelsea", "coffee"):
        image = Image.fromarray(getattr(skdata, name)())
        w, h = image.size
        for j in range(3):
            crop = image.crop((j * w // 8, j * h // 8, w - j * w // 10, h - j * h // 12))
            crop.resize((72 + 8 * j, 64 + 4 * k)).save(folder / f"img{k:02d}.png")
            lines += [f"img{k:02d}.png\tphoto {k} caption {c}" for c in range(1 + k % 6)]
            k += 1
    full = folder / "_full.jpg"
    Image.fromarray(skdata.rocket()).save(full)
    (folder / "img05b.jpg").write_bytes(full.read_bytes()[:2000])  # truncated: skipped in chunk 3
    full.unlink()
    lines.append("img05b.jpg\ta broken file")
    Image.fromarray(skdata.rocket()).resize((80, 60)).save(folder / "zz_nocaption.png")
    captions = folder.parent / f"{folder.name}_caps.tsv"
    captions.write_text("\n".join(lines) + "\n")
    return folder, captions


@pytest.fixture(scope="module")
def baseline(photos, tmp_path_factory) -> Path:
    """One process, one intra-op thread (as each torchrun worker with OMP_NUM_THREADS=1)."""
    folder, captions = photos
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = extract_folder(
            folder,
            out,
            backbone="efficientnet-lite0",
            captions=captions,
            image_size=SIZE,
            chunk=CHUNK,
            batch_size=BATCH,
            device="cpu",
            progress=False,
            distributed=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert summary["n_files"] == N_ENTRIES and summary["shape"] == [12, 4, 1280]
    assert summary["processes"] == 1
    return out


def torchrun(folder: Path, captions: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ESLMATCH_TEST_")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # fp32 as the baseline: the CLI default (auto) is bf16 on a CPU with AMX / AVX512-BF16
    cmd += ["-m", "eslmatch.cli", "extract", "--images", str(folder), "--out", str(out), "--precision", "fp32"]
    cmd += ["--captions", str(captions), "--no-progress", "--dist-timeout", "2", *OPTIONS]
    cmd += ["--runtime", env.pop("runtime", "torch")]  # the baseline's (the CLI's auto may pick ONNX Runtime)
    return subprocess.run(
        cmd, env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=HUNG
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("eslmatch: error:")]


def failed_ranks(proc: subprocess.CompletedProcess) -> set[int]:
    """The ranks torchrun's failure report lists."""
    import re

    return {int(m) for m in re.findall(r"rank\s*:\s*(\d+)", proc.stderr)}


def assert_same_output(one: Path, two: Path, resumed: bool = False) -> int:
    """Every file of ``two`` equals ``one``'s byte for byte (``extract_meta.json``: every
    field but the run-specific ones); returns the number of files compared."""
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len(names) == 5 and not (two / ".extract_partial").exists()
    for name in names:
        if name != "extract_meta.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    metas = []
    for out in (one, two):
        meta = json.loads((out / "extract_meta.json").read_text())
        record = meta["splits"]["test"]
        for key in RUN_SPECIFIC | ({"computed_images", "reused_chunks"} if resumed else set()):
            record.pop(key)
        record["files"] = {k: v.replace(str(out), "OUT") for k, v in record["files"].items()}
        metas.append(meta)
    assert metas[0] == metas[1]
    return len(names)


def test_two_processes_equal_one_byte_for_byte(photos, baseline, tmp_path):
    folder, captions = photos
    out = tmp_path / "two"
    t0 = time.perf_counter()
    proc = torchrun(folder, captions, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("extracted 12 images") == 1, proc.stdout  # rank 0 alone reports
    assert "(2 processes)" in proc.stdout and "skipped 1 files" in proc.stdout
    n = assert_same_output(baseline, out)
    meta = json.loads((out / "extract_meta.json").read_text())["splits"]["test"]
    assert meta["processes"] == 2 and meta["computed_images"] == N_ENTRIES and meta["reused_chunks"] == 0
    assert meta["no_caption"] == ["zz_nocaption.png"] and meta["skipped"][0]["file"] == "img05b.jpg"
    feats = np.load(out / "test_ims.npy")
    assert feats.shape == (12, 4, 1280) and not np.array_equal(feats[0], feats[1])
    print(f"2 processes == 1 process: all {n} files identical ({time.perf_counter() - t0:.1f} s)")


def test_two_processes_run_what_rank_0_measured(photos, tmp_path):
    """``--runtime auto`` under torchrun: rank 0 measures (or reads the cached choice) and the
    other rank runs the same, so their chunks share one fingerprint."""
    folder, captions = photos
    cache = tmp_path / "cache"
    proc = torchrun(folder, captions, tmp_path / "two", runtime="auto", ESLMATCH_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "two" / "extract_meta.json").read_text())["splits"]["test"]
    (choice,) = [json.loads(p.read_text()) for p in cache.glob("runtimes/*/choice.json")]
    assert meta["processes"] == 2 and meta["runtime"] == choice["runtime"]


def chunk_state(out: Path) -> dict[int, int]:
    """Finished chunks of the partial folder -> mtime (ns) of their features file."""
    partial = out / ".extract_partial" / "test"
    return {
        int(p.stem.split("_")[1]): (partial / f"{p.stem}.npy").stat().st_mtime_ns for p in partial.glob("chunk_*.json")
    }


@pytest.mark.slow
def test_killed_then_failing_then_resumed(photos, baseline, tmp_path):
    folder, captions = photos
    out = tmp_path / "two"
    # 1. rank 0 dies (hard exit, as if killed) after its first chunk; torchrun stops rank 1.
    killed = torchrun(folder, captions, out, **{STOP_AFTER_ENV: "1", STOP_RANK_ENV: "0"})
    assert killed.returncode != 0
    assert not (out / "test_ims.npy").exists()
    done_a = chunk_state(out)
    assert 0 in done_a and not {2, 4, 6} & set(done_a), done_a  # rank 0's later chunks never ran
    # 2. rerun; rank 0 fails (an ordinary error) after one chunk: every rank exits non-zero,
    #    one error line; rank 1 still finishes its share, so its chunks are kept.
    failing = torchrun(folder, captions, out, **{STOP_AFTER_ENV: "1", STOP_RANK_ENV: "0", STOP_MODE_ENV: "raise"})
    assert failing.returncode != 0
    errors = error_lines(failing)
    assert errors == ["eslmatch: error: rank 0 of 2: test hook: rank 0 stopped after 1 chunk(s)"], failing.stderr
    assert failed_ranks(failing) == {0, 1}, failing.stderr
    assert f"resuming: {len(done_a)} of {N_CHUNKS} chunks" in failing.stderr
    pending = [i for i in range(N_CHUNKS) if i not in done_a]  # at least 2, 4, 6: rank 0 leaves one
    expected = set(done_a) | {deal(pending, 0, 2)[0]} | set(deal(pending, 1, 2))
    done_b = chunk_state(out)
    assert set(done_b) == expected, (done_a, done_b)
    assert all(done_b[i] == t for i, t in done_a.items())  # reused, not rewritten
    assert not (out / "test_ims.npy").exists()
    # 3. rerun to the end: only the missing chunks are computed; same bytes as one process.
    final = torchrun(folder, captions, out)
    assert final.returncode == 0, final.stderr[-3000:]
    left = [i for i in range(N_CHUNKS) if i not in done_b]
    assert left  # rank 0 stopped with chunks of its share still to do
    files_left = sum(min(CHUNK, N_ENTRIES - i * CHUNK) for i in left)
    assert f"resumed: {len(done_b)} chunks reused, {files_left} files processed now" in final.stdout, final.stdout
    meta = json.loads((out / "extract_meta.json").read_text())["splits"]["test"]
    assert meta["reused_chunks"] == len(done_b) and meta["computed_images"] == files_left
    n = assert_same_output(baseline, out, resumed=True)
    print(
        f"killed with chunks {sorted(done_a)} done, failed with {sorted(done_b)} done, resumed "
        f"computing {left}: all {n} files identical to 1 process"
    )


@pytest.mark.slow
def test_bad_argument_stops_every_rank(photos, tmp_path):
    _, captions = photos
    t0 = time.perf_counter()
    proc = torchrun(tmp_path / "missing", captions, tmp_path / "out")
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert error_lines(proc) == [f"eslmatch: error: {tmp_path / 'missing'}: no such image folder"], proc.stderr
    assert failed_ranks(proc) == {0, 1}, proc.stderr
    assert "Traceback" not in proc.stdout and not (tmp_path / "out").exists()
    print(f"bad argument: one error line, both ranks exit 1, {elapsed:.1f} s")


def test_combine_errors_and_deal():
    assert combine_errors([None, None]) is None
    assert combine_errors(["x: bad", "x: bad"]) == "x: bad"
    assert combine_errors([None, "boom"]) == "rank 1 of 2: boom"
    assert combine_errors(["a", "b", "a"]) == "ranks 0, 2 of 3: a; rank 1 of 3: b"
    assert deal(list(range(5)), 0, 2) == [0, 2, 4] and deal(list(range(5)), 1, 2) == [1, 3]
    assert deal([1, 4, 5], 1, 2) == [4]  # a resumed run balances what is left
