"""Shards: a gallery cut in shards equals one of one shard, a killed build resumes without
rewriting complete shards, ``index add`` appends shards, damaged shards are refused in one
line, the int8 side, and the IVF-PQ first stage and its size rules."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _gallery import copy_to_damage
from _models import tiny_gru_model
from eslmatch.cli import main
from eslmatch.retrieval import (
    BuildOptions,
    FaissOptions,
    FileStore,
    GalleryIndexError,
    ann,
    build_gallery,
    open_gallery,
    writer,
)
from eslmatch.retrieval.files import commit as filecommit
from eslmatch.retrieval.files.compact import copy_gallery
from eslmatch.retrieval.layout import ShardedArray, dequantize_int8, quantize_int8, read_rows

N, R, D = 44, 6, 16
SHARD = 8  # 44 images -> shards of 8, 8, 8, 8, 8, 4
QUERIES = (
    "the red circle left of the blue square",
    "a big green square",
    "the small blue circle above the red square",
    "a red square and a green circle",
)
# An int8 side moves ESL scores by at most this much on the test model (measured: ~3e-3; the
# benchmark model, Dt = 496: mean 5e-4, see docs/retrieval.md).
INT8_TOLERANCE = 1.5e-2


@pytest.fixture(scope="module")
def model():
    return tiny_gru_model(seed=3).eval()


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(11)
    return rng.random((N, R, D), dtype=np.float32) * 2


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "m")


def build(model, inputs, out, model_path=None, **options):
    gallery = build_gallery(model, inputs, out, options=BuildOptions(progress=False, **options), model_path=model_path)
    gallery.close()
    return Path(out)


@pytest.fixture(scope="module")
def single(model, features, tmp_path_factory):
    """The same gallery in one shard."""
    return build(model, features, tmp_path_factory.mktemp("one") / "idx", side_dtype="float32")


@pytest.fixture(scope="module")
def sharded(model, features, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "idx"
    return build(model, features, out, shard_rows=SHARD, side_dtype="float32", model_path=model_dir)


def results(model, path, k=N, rerank_k=N, **params):
    g = open_gallery(path, model=model)
    if params:
        g.store.search_params.update(params)
    return [[(h.id, h.score, h.first_stage_score) for h in g.search(q, k, rerank_k=rerank_k)] for q in QUERIES]


def assert_same(a, b, atol=1e-6):
    for hits_a, hits_b in zip(a, b, strict=True):
        assert [h[0] for h in hits_a] == [h[0] for h in hits_b]
        np.testing.assert_allclose([h[1:] for h in hits_a], [h[1:] for h in hits_b], rtol=0, atol=atol)


def file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------------- layout and equality
def test_sharded_equals_single_file(model, single, sharded):
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["version"] == 4 and manifest["stages"] == 2 and manifest["shard_rows"] == SHARD
    g = open_gallery(sharded, model=model, verify=True)
    layout = g.store.layout()
    assert [s["rows"] for s in layout["shards"]] == [8, 8, 8, 8, 8, 4]
    assert [s["dir"] for s in layout["shards"]] == [f"shards/{i:05d}" for i in range(6)]
    assert set(layout["shards"][0]["files"]) == {"side.npy", "lengths.npy", "global.npy"}
    assert not (sharded.parent / ".idx.building").exists()
    one = open_gallery(single, model=model)
    np.testing.assert_array_equal(g.store.vectors(range(N)), one.store.vectors(range(N)))
    np.testing.assert_array_equal(g.store.sides(np.arange(N))[0], one.store.sides(np.arange(N))[0])
    assert_same(results(model, sharded), results(model, single))  # full re-rank: the exhaustive ranking
    g.store.mapped_budget = 0  # release the maps after every read: same results
    assert_same(
        [[(h.id, h.score, h.first_stage_score) for h in g.search(q, N, rerank_k=N)] for q in QUERIES],
        results(model, single),
    )
    assert_same(results(model, sharded, 5, 12), results(model, single, 5, 12))  # shortlist across shards
    np.testing.assert_array_equal(g.searcher.stored("17").side, one.searcher.stored("17").side)
    words, weights, _ = g.attention(QUERIES[0], "41")
    np.testing.assert_allclose(weights, one.attention(QUERIES[0], "41")[1], atol=1e-6)


def test_side_dtype_follows_the_size(model, tmp_path):
    assert filecommit._side_dtype(model, BuildOptions(), 65536) == "float32"  # up to one shard: float32
    assert filecommit._side_dtype(model, BuildOptions(), 65537) == "float16"
    assert filecommit._side_dtype(model, BuildOptions(shard_rows=8), 9) == "float16"
    out = build(model, np.ones((3, R, D), np.float32), tmp_path / "x", side_dtype="int8")
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "int8"


def test_sharded_array_reads_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.random((n, 3, 2)) for n in (4, 1, 5)]
    whole = np.concatenate(parts)
    a = ShardedArray(parts)
    assert a.shape == whole.shape and len(a) == 10 and a.dtype == whole.dtype
    rows = np.array([9, 0, 4, 4, 5, 3])
    for key in (3, -1, slice(2, 8), slice(0, 10), slice(6, 6), rows, (rows, slice(0, 2)), (slice(1, 9), 1), (7, 2)):
        np.testing.assert_array_equal(a[key], whole[key])
    np.testing.assert_array_equal(np.asarray(a), whole)
    with pytest.raises(IndexError):
        a[10]


def test_rows_read_without_mapping_them(sharded):
    store = FileStore.open(sharded)
    rows = np.array([43, 0, 9, 8, 17, 17])
    with store.snapshot() as s:
        np.testing.assert_array_equal(read_rows(s.vectors, rows), np.asarray(s.vectors)[rows])
        side = s.shards[1].side
        np.testing.assert_array_equal(read_rows(side, np.array([7, 0])), side[[7, 0]])
    np.testing.assert_array_equal(read_rows(np.arange(12.0).reshape(4, 3), np.array([2])), [[6.0, 7.0, 8.0]])


# ---------------------------------------------------------------------- kill and resume
def test_killed_build_resumes_after_complete_shards(model, features, single, tmp_path, monkeypatch, caplog):
    out = tmp_path / "idx"
    staging = tmp_path / ".idx.building"

    def crash(i: int) -> None:
        if i == 2:
            raise KeyboardInterrupt  # as a kill after shard 2 was sealed

    caplog.set_level("INFO", logger="eslmatch")
    monkeypatch.setattr(writer, "AFTER_CHUNK", crash)
    with pytest.raises(KeyboardInterrupt):
        build(model, features, out, shard_rows=SHARD, side_dtype="float32")
    assert not out.exists() and staging.is_dir()
    assert sorted(p.name for p in (staging / "shards").iterdir()) == ["00000", "00001", "00002"]
    assert any("kept in" in line for line in caplog.messages)
    before = file_stamps(staging / "shards")
    # a half-written shard from a killed process is cleaned up on resume
    litter = staging / "shards" / ".00003.tmp-999999"
    litter.mkdir()
    (litter / "side.npy").write_bytes(b"partial")
    written: list[int] = []
    monkeypatch.setattr(writer, "AFTER_CHUNK", written.append)
    caplog.clear()
    build(model, features, out, shard_rows=SHARD, side_dtype="float32")
    assert written == [3, 4, 5]  # only the missing shards were encoded
    assert any("resuming" in line and "3 complete shards" in line for line in caplog.messages)
    after = file_stamps(out / "shards")
    assert {k: after[k] for k in before} == before  # complete shards kept as they were (same inode, mtime)
    assert not staging.exists() and not litter.exists()
    FileStore.open(out, verify=True)
    assert_same(results(model, out), results(model, single))


def test_resume_with_other_inputs_starts_anew(model, features, tmp_path, monkeypatch, caplog):
    out = tmp_path / "idx"

    def crash(i: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "AFTER_CHUNK", crash)
    with pytest.raises(KeyboardInterrupt):
        build(model, features, out, shard_rows=SHARD)
    monkeypatch.setattr(writer, "AFTER_CHUNK", None)
    caplog.set_level("INFO", logger="eslmatch")
    other = features[::-1].copy()  # same shape and source kind, other content
    build(model, other, out, shard_rows=SHARD)
    assert any("discarding" in line for line in caplog.messages)
    store = FileStore.open(out, verify=True)
    with torch.no_grad():
        want = model.index_vectors_images(model.embed_images(torch.from_numpy(other[:1])))
    np.testing.assert_allclose(store.vectors([0])[0], want[0].numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- add
def test_add_appends_shards_and_equals_a_full_build(model, features, single, tmp_path):
    out = build(model, features[:20], tmp_path / "idx", shard_rows=SHARD, side_dtype="float32")
    first = file_stamps(out / "shards")
    g = open_gallery(out, model=model)
    g.add(features[20:], options=BuildOptions(progress=False))
    layout = g.store.layout()
    assert [s["rows"] for s in layout["shards"]] == [8, 8, 4, 8, 8, 8]  # old shards kept, new ones appended
    assert len(g) == N and len(layout["sources"]) == 2
    after = file_stamps(out / "shards")
    assert {k: after[k] for k in first} == first  # untouched
    g = open_gallery(out, model=model, verify=True)
    assert g.ids() == [str(i) for i in range(N)]
    assert_same(results(model, out), results(model, single))
    hits = g.search(QUERIES[0], k=N, rerank_k=N)
    assert {str(i) for i in range(20, N)} <= {h.id for h in hits}


def test_cli_add_and_info_on_a_sharded_index(model, features, model_dir, tmp_path, capsys):
    out = build(model, features[:30], tmp_path / "idx", shard_rows=SHARD, model_path=model_dir, side_dtype="float16")
    np.save(tmp_path / "more.npy", features[30:])
    assert main(["index", "add", "--index", str(out), "--features", str(tmp_path / "more.npy")]) == 0
    assert "added 14 items" in capsys.readouterr().out
    assert main(["index", "info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "in 6 shard(s)" in text and "float16" in text and "verified" in text
    assert main(["search", "--index", str(out), QUERIES[1], "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 3


def test_ivfpq_retrained_when_the_gallery_grows(model, features, tmp_path, monkeypatch):
    monkeypatch.setattr(filecommit, "TAIL_MIN", 0)  # extend FAISS on every add (no exact tail)
    out = build(model, features[:8], tmp_path / "idx", shard_rows=4, faiss_kind="ivfpq")
    g = open_gallery(out, model=model)
    g.add(features[8:30], options=BuildOptions(progress=False))  # 30 <= 4 x 8: added to the trained clusters
    assert g.store.layout()["faiss"]["trained_on"] == 8
    g.add(features[30:], options=BuildOptions(progress=False))  # 44 > 4 x 8: retrained
    meta = g.store.layout()["faiss"]
    assert meta["trained_on"] == N and meta["options"]["nlist"] == ann.ivfpq_nlist(N)
    assert len(open_gallery(out, model=model, verify=True)) == N


# ---------------------------------------------------------------------- damage
@pytest.fixture()
def damaged(sharded, tmp_path):
    target = tmp_path / "damaged"
    copy_to_damage(sharded, target)
    return target


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eslmatch: error:"), err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_shard_refused_in_one_line(damaged, capsys):
    shutil.rmtree(damaged / "shards" / "00002")
    with pytest.raises(GalleryIndexError, match=r"a file of the gallery is missing \(.*shards/00002\)"):
        FileStore.open(damaged)
    assert main(["index", "info", str(damaged)]) == 1
    assert "shards/00002" in one_error_line(capsys)
    assert main(["search", "--index", str(damaged), QUERIES[0]]) == 1
    assert "shards/00002" in one_error_line(capsys)
    assert main(["serve", "--index", str(damaged), "--port", "0"]) == 1  # refused before serving anything
    assert "shards/00002" in one_error_line(capsys)


def test_truncated_shard_refused_in_one_line(damaged, capsys):
    path = damaged / "shards" / "00004" / "side.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(GalleryIndexError, match=r"shards/00004/side.npy: \d+ bytes, catalog.sqlite records \d+"):
        FileStore.open(damaged)
    assert main(["search", "--index", str(damaged), QUERIES[0]]) == 1
    assert "truncated or modified" in one_error_line(capsys)
    os.remove(damaged / "shards" / "00001" / "global.npy")
    with pytest.raises(GalleryIndexError, match=r"shards/00001/global.npy: missing file of the shard"):
        FileStore.open(damaged)


def test_modified_shard_found_by_verify(damaged):
    path = damaged / "shards" / "00003" / "global.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    FileStore.open(damaged)  # same size: only the checksum tells
    with pytest.raises(GalleryIndexError, match=r"shards/00003/global.npy: sha256 differs"):
        FileStore.open(damaged, verify=True)


def test_edited_layout_refused(damaged):
    import sqlite3

    with sqlite3.connect(damaged / "catalog.sqlite") as db:
        layout = json.loads(db.execute("SELECT value FROM state WHERE key = 'layout'").fetchone()[0])
        layout["shards"][1]["rows"] = 9
        db.execute("UPDATE state SET value = ? WHERE key = 'layout'", (json.dumps(layout),))
    with pytest.raises(
        GalleryIndexError, match=r"shards/00001/global.npy: shape \(8, \d+\), the catalogue implies \(9"
    ):
        FileStore.open(damaged)


# ---------------------------------------------------------------------- int8 side
def test_quantize_int8_error_bound():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 7, 33)).astype(np.float32) * rng.random((50, 7, 1)).astype(np.float32)
    x[0, 0] = 0  # padding stays exactly zero
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.shape == (50, 7) and scale[0, 0] == 0
    err = np.abs(dequantize_int8(q, scale) - x)
    assert np.all(err <= scale[..., None] / 2 + 1e-7) and np.all(dequantize_int8(q, scale)[0, 0] == 0)


def test_int8_scores_within_tolerance_of_fp16(model, features, tmp_path):
    fp16 = build(model, features, tmp_path / "fp16", shard_rows=SHARD, side_dtype="float16")
    int8 = build(model, features, tmp_path / "int8", shard_rows=SHARD, side_dtype="int8")
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["dtype"] == "int8" and "scale.npy" in FileStore.open(int8).layout()["shards"][0]["files"]
    side16 = (fp16 / "shards" / "00000" / "side.npy").stat().st_size
    side8 = (int8 / "shards" / "00000" / "side.npy").stat().st_size
    assert side8 < 0.55 * side16
    a, b = results(model, fp16), results(model, int8)
    diffs = []
    for hits_a, hits_b in zip(a, b, strict=True):
        by_id = {h[0]: h[1] for h in hits_b}
        diffs += [abs(score - by_id[i]) for i, score, _ in hits_a]
        assert hits_a[0][0] == hits_b[0][0]  # the best image is unchanged
    assert max(diffs) < INT8_TOLERANCE
    first_b = {h[0]: h[2] for h in b[0]}
    np.testing.assert_allclose([h[2] for h in a[0]], [first_b[h[0]] for h in a[0]], atol=1e-6)  # float32 globals


# ---------------------------------------------------------------------- IVF-PQ
def test_ivfpq_size_rules():
    assert ann.ivfpq_nlist(1_000_000) == 4096
    assert ann.ivfpq_nlist(100_000) == 1024
    assert ann.ivfpq_nlist(20_000) == 512
    assert ann.ivfpq_nlist(1000) == 25  # 4 sqrt(1000) -> 128, but at most 1000 // 39
    assert ann.ivfpq_nlist(10) == 1
    assert ann.pq_subquantizers(496) == 124 and ann.pq_subquantizers(60) == 15 and ann.pq_subquantizers(61) == 61
    opts = ann.resolve_options("ivfpq", 1_000_000, None, 496)
    assert (opts.nlist, opts.nprobe, opts.pq_m, opts.pq_bits, opts.refine) == (4096, 512, 124, 8, 10)
    assert ann.ivfpq_nprobe(1024) == 256 and ann.ivfpq_nprobe(2) == 2 and ann.ivfpq_nprobe(64) == 64
    small = ann.resolve_options("ivfpq", 100, FaissOptions(nprobe=500), 60)
    assert small.nlist == 2 and small.nprobe == 2 and small.pq_bits == 6  # 2**6 <= 100 training points
    with pytest.raises(Exception, match="does not divide"):
        ann.resolve_options("ivfpq", 1000, FaissOptions(pq_m=7), 60)
    assert ann.candidates("ivfpq", opts, 100, 10**6) == 1000 and ann.candidates("flat", opts, 100, 50) == 50


def test_ivfpq_first_stage_is_exactly_rescored(model, sharded, single, tmp_path):
    pq = copy_gallery(sharded, tmp_path / "pq")
    FileStore.open(pq).reindex("ivfpq")
    idx = FileStore.open(pq)
    flat = FileStore.open(single)
    q = np.random.default_rng(4).standard_normal((6, idx.total_dim)).astype(np.float32)
    scores, rows = idx.first_stage(q, 10)
    exact = q @ flat.vectors(range(N)).T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, 1), rtol=1e-5, atol=1e-6)  # exact scores
    assert np.all(np.diff(scores, axis=1) <= 0)
    nlist = idx.faiss_options.nlist
    idx.search_params.update(nprobe=nlist, refine=100)  # every cluster, every candidate
    _, rows = idx.first_stage(q, 10)
    np.testing.assert_array_equal(rows, flat.first_stage(q, 10)[1])
    assert_same(results(model, pq, nprobe=nlist, refine=100), results(model, single))
