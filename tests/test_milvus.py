"""The Milvus backend: a local Milvus server (milvus-lite's gRPC server on 127.0.0.1, started
by the fixtures), the same answers as the FAISS file index, resuming a build after the server
died, stateless servers, and one clear line for each bad input."""

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

from _models import TINY_CLIP, WORDS, tiny_gru_model
from milvus_server import MilvusServer, free_port, has_grpc_server

if not has_grpc_server():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs pymilvus and milvus-lite >= 3 (pip install -e '.[test]')")
    pytest.skip("pymilvus / milvus-lite (>= 3, with 'milvus-lite server') not installed", allow_module_level=True)

import eslmatch.retrieval.milvus as milvus_mod  # noqa: E402
from eslmatch.cli import main  # noqa: E402
from eslmatch.errors import EslmatchError  # noqa: E402
from eslmatch.retrieval import GalleryIndex, GalleryIndexError, add_to_index, build_image_index  # noqa: E402
from eslmatch.retrieval.milvus import (  # noqa: E402
    MilvusError,
    MilvusGallery,
    add_to_milvus_index,
    build_milvus_image_index,
    describe_collection,
)

N_BIG, N_QUERIES, REGIONS, IMG_DIM = 10_000, 100, 6, 16


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))) for _ in range(n)]


def regions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((n, REGIONS, IMG_DIM)), 0).astype(np.float32)
    return feats, rng.integers(2, REGIONS + 1, size=n)


def one_line_error(capsys, code: int, *needles: str) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 1, out
    assert len(lines) == 1 and lines[0].startswith("eslmatch: error: "), out.err
    assert "Traceback" not in out.err and "Traceback" not in out.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model():
    return tiny_gru_model(seed=3).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return str(model.save_pretrained(tmp_path_factory.mktemp("model") / "esl"))


@pytest.fixture(scope="module")
def big(model, model_dir, server, tmp_path_factory):
    """10,000 images of random regions: a FAISS flat file index and a Milvus FLAT collection."""
    feats, lens = regions(N_BIG, seed=1)
    root = tmp_path_factory.mktemp("big")
    files = build_image_index(model, feats, root / "index", lengths=lens, progress=False, model_path=model_dir)
    rep = build_milvus_image_index(
        model, feats, server.uri, "big", lengths=lens, progress=False, model_path=model_dir, batch_size=1000
    )
    assert (rep.written, rep.present, rep.count) == (N_BIG, 0, N_BIG)
    return GalleryIndex.open(files, model=model), MilvusGallery.open(server.uri, "big", model=model), feats, lens


# ---------------------------------------------------------------------- same answers as FAISS
def test_10k_same_top10_as_the_faiss_index(model, big):
    files, mil, _, _ = big
    assert mil.count == files.count == N_BIG and mil.one_stage is False
    texts = queries(N_QUERIES)
    want = files.search_texts(model, texts, k=10, rerank_k=100)
    got = mil.search_texts(model, texts, k=10, rerank_k=100)
    same = sum([h.id for h in a] == [h.id for h in b] for a, b in zip(want, got))
    diff = max(abs(h.score - g.score) for a, b in zip(want, got) for h, g in zip(a, b))
    first = max(abs(h.first_stage_score - g.first_stage_score) for a, b in zip(want, got) for h, g in zip(a, b))
    print(
        f"\nmilvus vs faiss on {N_BIG}: same top-10 for {same}/{N_QUERIES}, max |score diff| {diff:.2e}, "
        f"max |first-stage diff| {first:.2e}"
    )
    assert same == N_QUERIES
    assert diff <= 1e-5 and first <= 1e-5
    assert [h.path for h in got[0]] == [h.path for h in want[0]] and [h.index for h in got[0]] == [
        h.index for h in want[0]
    ]
    # the first stage alone (rerank_k=0) agrees too, and the full ranking of a shortlist of 500
    a, b = files.search_text(model, texts[0], k=50, rerank_k=0), mil.search_text(model, texts[0], k=50, rerank_k=0)
    assert [h.id for h in a] == [h.id for h in b]
    a, b = files.search_text(model, texts[1], k=30, rerank_k=500), mil.search_text(model, texts[1], k=30, rerank_k=500)
    assert [h.id for h in a] == [h.id for h in b]


def test_stored_rows_equal_the_file_index(model, big):
    files, mil, _, lens = big
    rows = np.array([0, 17, 4242, N_BIG - 1])
    np.testing.assert_array_equal(mil.lengths[rows], lens[rows])
    np.testing.assert_array_equal(mil.side[rows], files.side[rows])  # float32 both: bit-equal
    np.testing.assert_array_equal(mil.global_vectors[rows], files.global_vectors[rows])
    assert [mil.ids[int(r)] for r in rows] == [files.ids[int(r)] for r in rows]
    assert mil.row_of("4242") == 4242 and mil.contains("4242") and not mil.contains("no such id")
    words, weights, _ = mil.attention(model, "a red circle", "17")
    w2, weights2, _ = files.attention(model, "a red circle", "17")
    assert words == w2 and weights.shape == (len(words), lens[17])
    np.testing.assert_allclose(weights, weights2, rtol=1e-6, atol=1e-7)
    entry = mil.lookup("17")
    np.testing.assert_array_equal(entry.side, files.lookup("17").side)


def test_one_stage_esl_clip_answered_by_milvus_alone(server, tmp_path):
    from eslmatch.demo.scenes import generate_split, write_split
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel

    spec = generate_split(300, 5, name="test")
    write_split(spec, tmp_path / "photos", tmp_path / "captions.tsv", size=32)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    clip = ESLClipModel(ESLClipConfig(strategy="adaptive", num_levels=2, clip=TINY_CLIP)).eval()
    skipped: list[str] = []
    files = GalleryIndex.open(
        build_image_index(clip, tmp_path / "photos", tmp_path / "idx", progress=False, report=skipped.append),
        model=clip,
    )
    rep = build_milvus_image_index(
        clip, tmp_path / "photos", server.uri, "clip", progress=False, report=skipped.append, batch_size=64
    )
    assert rep.skipped == 1 and rep.count == files.count == 300 and any("broken.png" in s for s in skipped)
    mil = MilvusGallery.open(server.uri, "clip", model=clip)
    assert mil.one_stage and mil.side is None and mil.manifest["levels"] is None
    assert not milvus_mod.MilvusConnection(server.uri).call("look", "has_collection", "clip_levels")
    texts = [c.text for caps in spec.captions[:20] for c in caps[:1]]
    want, got = files.search_texts(clip, texts, k=10), mil.search_texts(clip, texts, k=10)
    for a, b in zip(want, got):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=0, atol=1e-5)
        assert all(h.score == h.first_stage_score for h in b)


# ---------------------------------------------------------------------- resuming after a crash
def test_server_killed_mid_build_then_a_rerun_resumes(model, model_dir, tmp_path, capsys, monkeypatch):
    n = 3000
    feats, lens = regions(n, seed=7)
    np.save(tmp_path / "feats.npy", feats)
    srv = MilvusServer(tmp_path / "data").start()
    try:
        calls = {"n": 0}
        real = milvus_mod.encode_images

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # three batches are stored, then the server dies
                srv.kill()
            return real(*args, **kwargs)

        monkeypatch.setattr(milvus_mod, "encode_images", dying)
        cmd = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "feats.npy")]
        cmd += ["--milvus", srv.uri, "--collection", "resumable", "--batch-size", "500", "--milvus-timeout", "3"]
        t0 = time.perf_counter()
        line = one_line_error(capsys, main(cmd), "cannot reach Milvus", "run the same command again to resume")
        assert time.perf_counter() - t0 < 60
        assert "1500 of 3000 items are stored" in line
        with capsys.disabled():
            print(f"\nkilled mid-build: {line}")

        srv.start()
        with pytest.raises(GalleryIndexError, match="unfinished"):
            MilvusGallery.open(srv.uri, "resumable")  # nothing served from a half-built collection
        calls["n"] = -(10**9)
        written: list[int] = []
        real_upsert = milvus_mod._Writer.upsert

        def counting(self, rows, *args, **kwargs):
            written.extend(rows)
            return real_upsert(self, rows, *args, **kwargs)

        monkeypatch.setattr(milvus_mod._Writer, "upsert", counting)
        assert main(cmd) == 0
        out = capsys.readouterr().out
        assert "wrote 1500 items, resumed: 1500 were stored already (3000 in all" in out, out
        with capsys.disabled():
            print(f"rerun: {out.strip()}")
        assert sorted(written) == list(range(1500, 3000))  # rows stored before the crash are not written again
        written.clear()
        assert main(cmd) == 0  # a third run: complete, nothing to do
        assert "nothing to do" in capsys.readouterr().out and not written

        clean = build_milvus_image_index(model, feats, srv.uri, "clean", progress=False, batch_size=700)
        assert clean.written == n
        a, b = MilvusGallery.open(srv.uri, "resumable", model=model), MilvusGallery.open(srv.uri, "clean", model=model)
        assert a.count == b.count == n
        assert list(a.ids) == list(b.ids) == [str(i) for i in range(n)]
        rows = np.arange(n)
        np.testing.assert_array_equal(a.lengths[rows], b.lengths[rows])
        np.testing.assert_array_equal(a.global_vectors[rows], b.global_vectors[rows])
        for r0 in range(0, n, 500):
            np.testing.assert_array_equal(a.side[rows[r0 : r0 + 500]], b.side[rows[r0 : r0 + 500]])
        conn = milvus_mod.MilvusConnection(srv.uri)
        counts = [
            conn.call("count", "query", name, filter="", output_fields=["count(*)"])[0]["count(*)"]
            for name in ("resumable", "clean", "resumable_levels", "clean_levels")
        ]
        assert counts[0] == counts[1] == n and counts[2] == counts[3] == n  # one level entity per image here

        # a server over the collection answers 503 (one line) while Milvus is down, and recovers after
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        from eslmatch.serve.app import load_milvus_app

        app = load_milvus_app(srv.uri, "resumable", model_dir, timeout=2, allowed_hosts=["testserver"])
        with TestClient(app) as client:
            ok = client.post("/search", json={"text": "a red circle", "k": 3}).json()["results"]
            srv.kill()
            down = client.post("/search", json={"text": "a red square", "k": 3})
            assert down.status_code == 503 and down.json()["error"].startswith("cannot reach Milvus")
            srv.start()
            again = client.post("/search", json={"text": "a red circle", "k": 3}).json()
            assert again.get("results") == ok, again
    finally:
        srv.stop()


# ---------------------------------------------------------------------- stateless servers
def _serve(model_dir: str, uri: str, collection: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eslmatch.cli", "serve", "--milvus", uri, "--collection", collection]
    cmd += ["--model", model_dir, "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def test_two_serve_processes_on_one_milvus_answer_the_same(model, model_dir, server, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from PIL import Image

    # a small gallery whose images exist, to check /image too
    feats, lens = regions(40, seed=3)
    paths = []
    for i in range(40):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (8, 8), (i * 6, 0, 0)).save(p)
        paths.append(str(p))
    ids = [f"photo {i}/a" for i in range(40)]
    build_milvus_image_index(model, feats, server.uri, "served", lengths=lens, ids=ids, paths=paths, progress=False)
    files = GalleryIndex.open(build_image_index(model, feats, tmp_path / "idx", lengths=lens, ids=ids, progress=False))
    ports = [free_port(), free_port()]
    procs = [_serve(model_dir, server.uri, "served", p, tmp_path / f"serve{i}.log") for i, p in enumerate(ports)]
    try:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        deadline = time.monotonic() + 120
        for base, proc in zip(bases, procs):
            while True:
                assert proc.poll() is None, (tmp_path / f"serve{procs.index(proc)}.log").read_text()
                try:
                    if httpx.get(base + "/healthz", timeout=2).json()["items"] == 40:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.3)
        texts = queries(8, seed=5)
        for text in texts:
            answers = []
            for base in bases:
                r = httpx.post(base + "/search", json={"text": text, "k": 5, "rerank_k": 40}, timeout=30)
                assert r.status_code == 200, r.text
                body = r.json()
                body.pop("took_ms")
                answers.append(body)
            assert answers[0] == answers[1]
            want = files.search_text(model, text, k=5, rerank_k=40)
            assert [x["id"] for x in answers[0]["results"]] == [h.id for h in want]
            np.testing.assert_allclose([x["score"] for x in answers[0]["results"]], [h.score for h in want], atol=1e-5)
            assert all(x["image_url"] for x in answers[0]["results"])
        url = answers[0]["results"][0]["image_url"]
        assert httpx.get(bases[1] + url, timeout=10).status_code == 200  # a server that did not run the search
        assert httpx.get(bases[0] + "/image/nope", timeout=10).status_code == 404
        att = [
            httpx.get(b + "/attention", params={"text": "a red circle", "id": ids[3]}, timeout=30).json() for b in bases
        ]
        for a in att:
            a.pop("took_ms")
        assert att[0] == att[1] and len(att[0]["weights"][0]) == lens[3]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


# ---------------------------------------------------------------------- bad inputs
def test_unreachable_milvus_is_one_clear_line(model_dir, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    np.save(tmp_path / "f.npy", regions(5, seed=0)[0])
    args = ["--milvus", dead, "--collection", "x", "--milvus-timeout", "2"]
    one_line_error(capsys, main(["search", *args, "a red circle", "--model", model_dir]), "cannot reach Milvus", dead)
    build = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "f.npy"), *args]
    one_line_error(capsys, main(build), "cannot reach Milvus")
    one_line_error(capsys, main(["serve", *args, "--model", model_dir]), "cannot reach Milvus")
    one_line_error(capsys, main(["index", "info", *args]), "cannot reach Milvus")
    one_line_error(
        capsys, main(["search", "--milvus", "localhost:19530", "--collection", "x", "q"]), "not a Milvus URI"
    )
    one_line_error(capsys, main(["search", "--milvus", dead, "--collection", "bad-name", "q"]), "not valid for Milvus")
    one_line_error(capsys, main(["search", "--milvus", dead, "q"]), "--milvus needs --collection")
    with pytest.raises(MilvusError, match="cannot reach Milvus"):
        MilvusGallery.open(dead, "x", timeout=2)


def test_a_collection_of_another_model_is_refused(model, model_dir, server, tmp_path, capsys):
    feats, lens = regions(30, seed=4)
    np.save(tmp_path / "f.npy", feats)
    build_milvus_image_index(model, feats, server.uri, "mine", progress=False, model_path=model_dir)
    other = tiny_gru_model(seed=9).eval()
    other_dir = str(other.save_pretrained(tmp_path / "other"))
    with pytest.raises(GalleryIndexError, match="built with another model") as info:
        MilvusGallery.open(server.uri, "mine", model=other)
    from eslmatch.retrieval.store import model_fingerprint

    assert model_fingerprint(model)[:12] in str(info.value) and model_fingerprint(other)[:12] in str(info.value)
    args = ["--milvus", server.uri, "--collection", "mine"]
    one_line_error(capsys, main(["search", *args, "a red circle", "--model", other_dir]), "built with another model")
    one_line_error(capsys, main(["serve", *args, "--model", other_dir]), "built with another model")
    add = ["index", "add", *args, "--model", other_dir, "--features", str(tmp_path / "f.npy")]
    one_line_error(capsys, main(add), "built with another model")
    build = ["index", "build", "--model", other_dir, "--features", str(tmp_path / "f.npy"), *args]
    one_line_error(capsys, main(build), "built with another model")
    # the right model still works, through the CLI too (its recorded path)
    assert main(["search", *args, "a red circle", "--json", "-k", "3"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["hits"]) == 3 and body["stages"] == 2
    # another gallery under the same name is refused without --overwrite, replaced with it
    again = build_milvus_image_index(model, feats, server.uri, "mine", progress=False, model_path=model_dir)
    assert again.up_to_date and again.written == 0
    np.save(tmp_path / "g.npy", regions(12, seed=5)[0])
    build_new = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "g.npy"), *args]
    one_line_error(capsys, main(build_new), "already holds another gallery", "--overwrite")
    before = MilvusGallery.open(server.uri, "mine", model=model)  # a server opened before the rebuild
    assert before.search_text(model, "a red circle", k=3)[0].id in {str(i) for i in range(30)}
    assert main([*build_new, "--overwrite"]) == 0
    assert describe_collection(server.uri, "mine")["count"] == 12
    before.refresh(force=True)  # (done every 10 s) the rebuilt gallery, its caches dropped
    after = MilvusGallery.open(server.uri, "mine", model=model)
    assert before.count == 12 and [h.id for h in before.search_text(model, "a red circle", k=12)] == [
        h.id for h in after.search_text(model, "a red circle", k=12)
    ]
    with pytest.raises(EslmatchError, match="not an eslmatch gallery"):
        conn = milvus_mod.MilvusConnection(server.uri)
        conn.call("x", "create_collection", "plain", dimension=4)
        MilvusGallery.open(server.uri, "plain")


def test_add_extends_the_collection_like_the_file_index(model, model_dir, server, tmp_path, capsys):
    feats, lens = regions(200, seed=11)
    more = regions(60, seed=12)[0]
    np.save(tmp_path / "more.npy", more)
    build_milvus_image_index(model, feats, server.uri, "grow", lengths=lens, progress=False, model_path=model_dir)
    files = build_image_index(model, feats, tmp_path / "idx", lengths=lens, progress=False)
    add_to_index(files, model, more, progress=False)
    add_to_index(files, model, more, progress=False)
    rep = add_to_milvus_index(server.uri, "grow", model, more, progress=False)
    assert (rep.written, rep.count) == (60, 260)
    with pytest.raises(EslmatchError, match="duplicate id '5'"):
        add_to_milvus_index(server.uri, "grow", model, more[:2], ids=["new", "5"], progress=False)
    serving = MilvusGallery.open(server.uri, "grow", model=model)
    add = ["index", "add", "--milvus", server.uri, "--collection", "grow", "--features", str(tmp_path / "more.npy")]
    assert main(add) == 0  # the model recorded at build time; ids continue the numbering
    assert "wrote 60 items (320 in all" in capsys.readouterr().out
    lens_all = np.concatenate([lens, np.full(120, REGIONS)])
    assert serving.count == 260
    serving.refresh(force=True)
    assert serving.count == 320 and serving.search_text(model, "x", k=1)  # a running server sees the new items
    a, b = GalleryIndex.open(files, model=model), MilvusGallery.open(server.uri, "grow", model=model)
    assert b.count == a.count == 320 and b.ids[319] == a.ids[319] == "319"
    np.testing.assert_array_equal(b.lengths[np.arange(320)], lens_all)
    for text in queries(10, seed=2):
        x, y = a.search_text(model, text, k=10, rerank_k=320), b.search_text(model, text, k=10, rerank_k=320)
        assert [h.id for h in x] == [h.id for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-5)
    assert main(["index", "info", "--milvus", server.uri, "--collection", "grow"]) == 0
    assert "320 items" in capsys.readouterr().out


def test_fp16_level_features_and_an_hnsw_first_stage(model, server, tmp_path):
    feats, lens = regions(300, seed=21)
    notes: list[str] = []
    build_milvus_image_index(
        model,
        feats,
        server.uri,
        "half",
        lengths=lens,
        fp16=True,
        index_kind="hnsw",
        progress=False,
        report=notes.append,
    )
    assert any("no FLOAT16_VECTOR" in n for n in notes)  # milvus-lite: float16 values in a float32 field
    files = GalleryIndex.open(
        build_image_index(model, feats, tmp_path / "idx", lengths=lens, fp16=True, faiss_kind="hnsw", progress=False)
    )
    mil = MilvusGallery.open(server.uri, "half", model=model)
    assert mil.dtype == "float16" and mil.manifest["index"]["milvus"] == "HNSW"
    rows = np.arange(300)
    np.testing.assert_array_equal(mil.side[rows], np.asarray(files.side[rows], dtype=np.float32))
    for text in queries(5, seed=8):  # a shortlist of the whole gallery: HNSW's recall does not matter
        a, b = files.search_text(model, text, k=10, rerank_k=300), mil.search_text(model, text, k=10, rerank_k=300)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
