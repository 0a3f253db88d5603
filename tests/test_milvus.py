"""The Milvus store: a local Milvus server (milvus-lite's gRPC server on 127.0.0.1, started by
the fixtures), the same answers as the file store, resuming a build after the server died,
stateless servers, and one clear line for each bad input."""

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
from _wait import HUNG, wait_for_server
from milvus_server import MilvusServer, free_port, has_grpc_server

if not has_grpc_server():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs pymilvus and milvus-lite >= 3 (pip install -e '.[test]')")
    pytest.skip("pymilvus / milvus-lite (>= 3, with 'milvus-lite server') not installed", allow_module_level=True)

from eslmatch.cli import main  # noqa: E402
from eslmatch.errors import EslmatchError  # noqa: E402
from eslmatch.retrieval import BuildOptions, GalleryIndexError, build_gallery, open_gallery  # noqa: E402
from eslmatch.retrieval import encode as encode_mod  # noqa: E402
from eslmatch.retrieval import regions as region_source  # noqa: E402
from eslmatch.retrieval.milvus.conn import MilvusConnection, MilvusError  # noqa: E402
from eslmatch.retrieval.milvus.store import MilvusStore  # noqa: E402
from eslmatch.retrieval.milvus.write import MilvusSink  # noqa: E402
from eslmatch.retrieval.policy import item_record  # noqa: E402

N_BIG, N_QUERIES, REGIONS, IMG_DIM = 10_000, 100, 6, 16


def queries(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 8)))) for _ in range(n)]


def regions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = np.maximum(rng.standard_normal((n, REGIONS, IMG_DIM)), 0).astype(np.float32)
    return feats, rng.integers(2, REGIONS + 1, size=n)


def files_gallery(model, feats, out, lens=None, model_path=None, **options):
    src = region_source(feats, img_dim=IMG_DIM, lengths=lens) if not isinstance(feats, Path) else feats
    opts = BuildOptions(progress=False, **options)
    return build_gallery(model, src, out, options=opts, model_path=model_path)


def milvus_gallery(model, feats, uri, name, lens=None, model_path=None, milvus=None, **options):
    src = region_source(
        feats, img_dim=IMG_DIM, lengths=lens, ids=options.pop("ids", None), paths=options.pop("paths", None)
    )
    if isinstance(feats, Path):
        src = feats
    opts = BuildOptions(progress=False, **options)
    g = build_gallery(model, src, uri, name, options=opts, model_path=model_path, milvus=milvus)
    return g, g.store.last_write


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
    files = files_gallery(model, feats, root / "index", lens, model_path=model_dir, faiss_kind="flat")
    mil, rep = milvus_gallery(model, feats, server.uri, "big", lens, model_path=model_dir, batch_size=1000)
    assert (rep.written, rep.present, rep.count) == (N_BIG, 0, N_BIG)
    return files, open_gallery(server.uri, "big", model=model), feats, lens


# ---------------------------------------------------------------------- same answers as FAISS
@pytest.mark.slow
def test_10k_same_top10_as_the_faiss_index(model, big):
    files, mil, _, _ = big
    assert len(mil) == len(files) == N_BIG and mil.stages == 2
    texts = queries(N_QUERIES)
    want = files.search_texts(texts, k=10, rerank_k=100)
    got = mil.search_texts(texts, k=10, rerank_k=100)
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
    a, b = files.search(texts[0], k=50, rerank_k=0), mil.search(texts[0], k=50, rerank_k=0)
    assert [h.id for h in a] == [h.id for h in b]
    a, b = files.search(texts[1], k=30, rerank_k=500), mil.search(texts[1], k=30, rerank_k=500)
    assert [h.id for h in a] == [h.id for h in b]


@pytest.mark.slow
def test_stored_rows_equal_the_file_index(model, big):
    files, mil, _, lens = big
    rows = np.array([0, 17, 4242, N_BIG - 1])
    side_m, lens_m = mil.store.sides(rows)
    side_f, lens_f = files.store.sides(rows)
    np.testing.assert_array_equal(lens_m, lens[rows])
    np.testing.assert_array_equal(side_m, side_f)  # float32 both: bit-equal
    np.testing.assert_array_equal(mil.store.vectors(rows), files.store.vectors(rows))
    recs_m, recs_f = ({r.row: r for r in g.store.select(rows=rows)} for g in (mil, files))
    assert [recs_m[int(r)].id for r in rows] == [recs_f[int(r)].id for r in rows]
    assert item_record(mil.store, "4242").row == 4242
    with pytest.raises(EslmatchError, match="no item with id 'no such id'"):
        item_record(mil.store, "no such id")
    words, weights, _ = mil.attention("a red circle", "17")
    w2, weights2, _ = files.attention("a red circle", "17")
    assert words == w2 and weights.shape == (len(words), lens[17])
    np.testing.assert_allclose(weights, weights2, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(mil.searcher.stored("17").side.cpu(), files.searcher.stored("17").side.cpu())


def test_one_stage_esl_clip_answered_by_milvus_alone(server, tmp_path, caplog):
    from eslmatch.demo.scenes import generate_split, write_split
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel

    spec = generate_split(300, 5, name="test")
    write_split(spec, tmp_path / "photos", tmp_path / "captions.tsv", size=32)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    clip = ESLClipModel(ESLClipConfig(strategy="adaptive", num_levels=2, clip=TINY_CLIP)).eval()
    opts = BuildOptions(progress=False, batch_size=64, faiss_kind="flat")
    files = build_gallery(clip, tmp_path / "photos", tmp_path / "idx", options=opts)
    mil = build_gallery(clip, tmp_path / "photos", server.uri, "clip", options=opts)
    rep = mil.store.last_write
    assert (
        rep.skipped == 1
        and rep.count == len(files) == 300
        and any("skipping" in s and "broken.png" in s for s in caplog.messages)
    )
    assert mil.stages == 1 and mil.store.manifest["levels"] is None
    assert not MilvusConnection(server.uri).call("look", "has_collection", "clip_levels")
    texts = [c.text for caps in spec.captions[:20] for c in caps[:1]]
    want, got = files.search_texts(texts, k=10), mil.search_texts(texts, k=10)
    for a, b in zip(want, got):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=0, atol=1e-5)
        assert all(h.score == h.first_stage_score for h in b)


# ---------------------------------------------------------------------- resuming after a crash
@pytest.mark.slow
def test_server_killed_mid_build_then_a_rerun_resumes(model, model_dir, tmp_path, capsys, monkeypatch):
    n = 3000
    feats, lens = regions(n, seed=7)
    np.save(tmp_path / "feats.npy", feats)
    srv = MilvusServer(tmp_path / "data").start()
    try:
        calls = {"n": 0}
        real = encode_mod.encode_items

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # three batches are stored, then the server dies
                srv.kill()
            return real(*args, **kwargs)

        monkeypatch.setattr(encode_mod, "encode_items", dying)  # what the writer calls
        cmd = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "feats.npy")]
        cmd += ["--milvus", srv.uri, "--collection", "resumable", "--batch-size", "500", "--milvus-timeout", "3"]
        t0 = time.perf_counter()
        line = one_line_error(capsys, main(cmd), "cannot reach Milvus", "run the same command again to resume")
        assert time.perf_counter() - t0 < 180  # not a hang: it gave up after its --milvus-timeout of 3 s
        assert "1500 of 3000 items are stored" in line
        with capsys.disabled():
            print(f"\nkilled mid-build: {line}")

        srv.start()
        with pytest.raises(GalleryIndexError, match="unfinished"):
            MilvusStore.open(srv.uri, "resumable")  # nothing served from a half-built collection
        calls["n"] = -(10**9)
        written: list[int] = []
        real_put = MilvusSink.put

        def counting(self, items):
            written.extend(self.start + p for p in items.positions)
            return real_put(self, items)

        monkeypatch.setattr(MilvusSink, "put", counting)
        assert main(cmd) == 0
        out = capsys.readouterr().out
        assert "wrote 1,500 items, resumed: 1500 were stored already (3000 in all" in out, out
        with capsys.disabled():
            print(f"rerun: {out.strip()}")
        assert sorted(written) == list(range(1500, 3000))  # rows stored before the crash are not written again
        written.clear()
        assert main(cmd) == 0  # a third run: complete, nothing to do
        assert "nothing to do" in capsys.readouterr().out and not written

        _, clean = milvus_gallery(model, feats, srv.uri, "clean", batch_size=700)
        assert clean.written == n
        a, b = MilvusStore.open(srv.uri, "resumable"), MilvusStore.open(srv.uri, "clean")
        assert a.info()["count"] == b.info()["count"] == n
        assert [r.id for r in a.select()] == [r.id for r in b.select()] == [str(i) for i in range(n)]
        rows = np.arange(n)
        np.testing.assert_array_equal(a.vectors(rows), b.vectors(rows))
        for r0 in range(0, n, 500):
            sa, la = a.sides(rows[r0 : r0 + 500])
            sb, lb = b.sides(rows[r0 : r0 + 500])
            np.testing.assert_array_equal(la, lb)
            np.testing.assert_array_equal(sa, sb)
        conn = MilvusConnection(srv.uri)
        counts = [
            conn.call("count", "query", name, filter="", output_fields=["count(*)"])[0]["count(*)"]
            for name in ("resumable", "clean", "resumable_levels", "clean_levels")
        ]
        assert counts[0] == counts[1] == n and counts[2] == counts[3] == n  # one level entity per image here

        # a server over the collection answers 503 (one line) while Milvus is down, and recovers after
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        from eslmatch.serve.app import load_app

        app = load_app(srv.uri, model_dir, collection="resumable", timeout=2, allowed_hosts=["testserver"])
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


@pytest.mark.slow
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
    milvus_gallery(model, feats, server.uri, "served", lens, ids=ids, paths=paths)
    files = build_gallery(
        model,
        region_source(feats, img_dim=IMG_DIM, lengths=lens, ids=ids),
        tmp_path / "idx",
        options=BuildOptions(progress=False),
    )
    ports = [free_port(), free_port()]
    procs = [_serve(model_dir, server.uri, "served", p, tmp_path / f"serve{i}.log") for i, p in enumerate(ports)]
    try:
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for i, (base, proc) in enumerate(zip(bases, procs)):
            wait_for_server(base, proc, tmp_path / f"serve{i}.log", ready=lambda r: r.json()["items"] == 40)
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
            want = files.search(text, k=5, rerank_k=40)
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
            proc.wait(timeout=HUNG)


# ---------------------------------------------------------------------- bad inputs
def test_unreachable_milvus_is_one_clear_line(model_dir, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    np.save(tmp_path / "f.npy", regions(5, seed=0)[0])
    args = ["--milvus", dead, "--collection", "x", "--milvus-timeout", "2"]
    one_line_error(capsys, main(["search", *args, "a red circle", "--model", model_dir]), "cannot reach Milvus", dead)
    build = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "f.npy"), *args]
    one_line_error(capsys, main(build), "cannot reach Milvus")
    one_line_error(capsys, main(["serve", *args, "--model", model_dir, "--port", "0"]), "cannot reach Milvus")
    one_line_error(capsys, main(["index", "info", *args]), "cannot reach Milvus")
    one_line_error(
        capsys, main(["search", "--milvus", "localhost:19530", "--collection", "x", "q"]), "not a Milvus URI"
    )
    one_line_error(capsys, main(["search", "--milvus", dead, "--collection", "bad-name", "q"]), "not valid for Milvus")
    one_line_error(capsys, main(["search", "--milvus", dead, "q"]), "--milvus needs --collection")
    with pytest.raises(MilvusError, match="cannot reach Milvus"):
        MilvusStore.open(dead, "x", timeout=2)


def test_a_collection_of_another_model_is_refused(model, model_dir, server, tmp_path, capsys):
    feats, lens = regions(30, seed=4)
    np.save(tmp_path / "f.npy", feats)
    milvus_gallery(model, feats, server.uri, "mine", model_path=model_dir)
    other = tiny_gru_model(seed=9).eval()
    other_dir = str(other.save_pretrained(tmp_path / "other"))
    with pytest.raises(GalleryIndexError, match="built with another model") as info:
        open_gallery(server.uri, "mine", model=other).search("a red circle")
    from eslmatch.retrieval import model_fingerprint

    assert model_fingerprint(model)[:12] in str(info.value) and model_fingerprint(other)[:12] in str(info.value)
    args = ["--milvus", server.uri, "--collection", "mine"]
    one_line_error(capsys, main(["search", *args, "a red circle", "--model", other_dir]), "built with another model")
    one_line_error(capsys, main(["serve", *args, "--model", other_dir, "--port", "0"]), "built with another model")
    add = ["index", "add", *args, "--model", other_dir, "--features", str(tmp_path / "f.npy")]
    one_line_error(capsys, main(add), "built with another model")
    build = ["index", "build", "--model", other_dir, "--features", str(tmp_path / "f.npy"), *args]
    one_line_error(capsys, main(build), "built with another model")
    # the right model still works, through the CLI too (its recorded path)
    assert main(["search", *args, "a red circle", "--json", "-k", "3"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["hits"]) == 3 and body["stages"] == 2
    # another gallery under the same name is refused without --overwrite, replaced with it
    _, again = milvus_gallery(model, feats, server.uri, "mine", model_path=model_dir)
    assert again.up_to_date and again.written == 0
    np.save(tmp_path / "g.npy", regions(12, seed=5)[0])
    build_new = ["index", "build", "--model", model_dir, "--features", str(tmp_path / "g.npy"), *args]
    one_line_error(capsys, main(build_new), "already holds another gallery", "--overwrite")
    before = open_gallery(server.uri, "mine", model=model)  # a server opened before the rebuild
    assert before.search("a red circle", k=3)[0].id in {str(i) for i in range(30)}
    assert main([*build_new, "--overwrite"]) == 0
    assert MilvusStore.open(server.uri, "mine").info()["count"] == 12
    time.sleep(2.1)  # a server re-reads the manifest every 2 s: the rebuilt gallery, its caches dropped
    after = open_gallery(server.uri, "mine", model=model)
    assert len(before) == 12 and [h.id for h in before.search("a red circle", k=12)] == [
        h.id for h in after.search("a red circle", k=12)
    ]
    with pytest.raises(EslmatchError, match="not an eslmatch gallery"):
        conn = MilvusConnection(server.uri)
        conn.call("x", "create_collection", "plain", dimension=4)
        MilvusStore.open(server.uri, "plain")


def test_add_extends_the_collection_like_the_file_index(model, model_dir, server, tmp_path, capsys):
    feats, lens = regions(200, seed=11)
    more, again = regions(60, seed=12)[0], regions(60, seed=13)[0]
    np.save(tmp_path / "more.npy", more)
    np.save(tmp_path / "again.npy", again)
    mil, _ = milvus_gallery(model, feats, server.uri, "grow", lens, model_path=model_dir)
    files = files_gallery(model, feats, tmp_path / "idx", lens)
    files.add(more, options=BuildOptions(progress=False))
    files.add(again, options=BuildOptions(progress=False))  # new numbered ids
    rep = mil.add(more, options=BuildOptions(progress=False))
    assert (rep.added, rep.count) == (60, 260)
    with pytest.raises(EslmatchError, match="id '5' is in the gallery already"):
        mil.add(region_source(more[:2], img_dim=IMG_DIM, ids=["new", "5"]), on_duplicate="error")
    serving = open_gallery(server.uri, "grow", model=model)
    add = ["index", "add", "--milvus", server.uri, "--collection", "grow", "--features"]
    assert main([*add, str(tmp_path / "more.npy")]) == 0  # the same features again: found by content, skipped
    assert "added 0 items" in capsys.readouterr().out and len(mil) == 260
    assert main([*add, str(tmp_path / "again.npy")]) == 0  # the model recorded at build time; ids continue
    out = capsys.readouterr().out
    assert "added 60 items" in out and "(320 in all" in out
    lens_all = np.concatenate([lens, np.full(120, REGIONS)])
    time.sleep(1.1)
    assert len(serving) == 320 and serving.search("x", k=1)  # a running server sees the new items
    a, b = open_gallery(tmp_path / "idx", model=model), open_gallery(server.uri, "grow", model=model)
    assert len(b) == len(a) == 320 and b.store.select(rows=[319])[0].id == a.store.select(rows=[319])[0].id == "319"
    np.testing.assert_array_equal(b.store.sides(np.arange(320))[1], lens_all)
    for text in queries(10, seed=2):
        x, y = a.search(text, k=10, rerank_k=320), b.search(text, k=10, rerank_k=320)
        assert [h.id for h in x] == [h.id for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-5)
    assert main(["index", "info", "--milvus", server.uri, "--collection", "grow"]) == 0
    assert "320 items" in capsys.readouterr().out


def test_numbered_items_metadata_is_keyed_by_the_ids_they_receive(model, server, tmp_path):
    """As on the file store (tests/test_retrieval.py): metadata of numbered items is keyed by
    the ids they are stored under; another key is refused and nothing is added."""
    mil, _ = milvus_gallery(model, regions(5, seed=21)[0], server.uri, "numbered")
    more = regions(3, seed=22)[0]
    mil.add(more, metadata={str(5 + i): {"tag": f"t{i}"} for i in range(3)}, options=BuildOptions(progress=False))
    assert [mil.metadata(str(5 + i))["tag"] for i in range(3)] == ["t0", "t1", "t2"]
    with pytest.raises(EslmatchError, match="not among the 3 items added, e.g. '0'"):
        mil.add(more, metadata={"0": {"tag": "lost"}}, options=BuildOptions(progress=False))
    assert len(mil) == 8


def test_replace_keeps_user_metadata_unless_given_anew(model, server):
    """As on the file store (tests/test_retrieval.py): one gallery policy for both stores."""
    feats = regions(3, seed=23)[0]
    mil, _ = milvus_gallery(model, feats, server.uri, "replacing", ids=["a", "b", "c"])
    mil.update({"a": {"tag": "cat", "starred": True}, "b": {"tag": "dog"}})
    new = region_source(feats[:2], img_dim=IMG_DIM, ids=["a", "b"])
    mil.add(new, {"b": {"tag": "wolf"}}, on_duplicate="replace", options=BuildOptions(progress=False))
    assert (mil.metadata("a")["tag"], mil.metadata("a")["starred"], mil.metadata("b")["tag"]) == ("cat", True, "wolf")
    assert len(mil) == 3


def test_an_interrupted_add_is_invisible_and_another_add_drops_it(model, server, monkeypatch, caplog):
    """A killed ``add`` (here: an error after two of three batches) left its rows readable: they
    were counted, searched and listed (a replaced item twice), and a sync after the kill found
    its half-written items "unchanged". Reads see committed rows only; another add drops the
    interrupted one, as the file store drops another write's staging (a note says so)."""
    feats = regions(6, seed=31)[0]
    mil, _ = milvus_gallery(model, feats, server.uri, "interrupted", ids=list("abcdef"))
    calls = {"n": 0}
    real = encode_mod.encode_items

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_mod, "encode_items", dying)
    replace = region_source(regions(6, seed=32)[0], img_dim=IMG_DIM, ids=list("abcxyz"))
    with pytest.raises(RuntimeError, match="killed"):
        mil.add(replace, on_duplicate="replace", options=BuildOptions(progress=False, batch_size=2))
    monkeypatch.undo()
    g = open_gallery(server.uri, "interrupted", model=model)
    assert len(g) == 6 and sorted(g.ids()) == list("abcdef")
    assert {h.id for h in g.search("x", k=20)} == set("abcdef")
    np.testing.assert_allclose(g.store.vectors([item_record(g.store, "a").row]), mil.store.vectors([0]), atol=1e-6)
    caplog.set_level("INFO", logger="eslmatch")
    other = region_source(regions(2, seed=33)[0], img_dim=IMG_DIM, ids=["p", "q"])
    g.add(other, options=BuildOptions(progress=False))
    assert any("interrupted add of other items (6 from row 6) is dropped" in x for x in caplog.messages), (
        caplog.messages
    )
    assert sorted(g.ids()) == list("abcdefpq") and len(g) == 8


def test_fp16_level_features_and_an_hnsw_first_stage(model, server, tmp_path, caplog):
    feats, lens = regions(300, seed=21)
    caplog.set_level("INFO", logger="eslmatch")
    mil, _ = milvus_gallery(model, feats, server.uri, "half", lens, side_dtype="float16", faiss_kind="hnsw")
    assert any("no FLOAT16_VECTOR" in n for n in caplog.messages)  # milvus-lite: float16 values in a float32 field
    files = files_gallery(model, feats, tmp_path / "idx", lens, side_dtype="float16", faiss_kind="hnsw")
    assert mil.store.dtype == "float16" and mil.store.manifest["index"]["milvus"] == "HNSW"
    rows = np.arange(300)
    np.testing.assert_array_equal(mil.store.sides(rows)[0], files.store.sides(rows)[0])
    for text in queries(5, seed=8):  # a shortlist of the whole gallery: HNSW's recall does not matter
        a, b = files.search(text, k=10, rerank_k=300), mil.search(text, k=10, rerank_k=300)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
