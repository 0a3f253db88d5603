"""A living collection, the same on both stores: build with metadata, add (with duplicates),
delete by filter and by id, update metadata; then every search, filtered or not, equals brute
force over the live items that match, on the file store and on Milvus alike."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from _models import WORDS, randomize, tiny_gru_model
from eslmatch import VSEModel
from eslmatch.retrieval import BuildOptions, build_gallery, open_gallery, parse_filter, regions
from eslmatch.retrieval.filters import matches
from milvus_server import MilvusServer, has_grpc_server

N, N_ADD, N_DUP, N_QUERIES, R, D = 10_000, 2_000, 500, 100, 6, 16
FOLDERS = ("trips", "home", "work", "party", "zoo")
TAGS = ("beach", "sea", "cat", "dog", "city", "snow")
FILTERS = (None, 'folder == "trips" and year >= 2015', 'tag in ["beach", "sea"] or not starred', "year < 2003")
NO_BAR = BuildOptions(progress=False, batch_size=1000, faiss_kind="flat")


def features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, R, D)), 0).astype(np.float32)


def metadata(ids: list[str], seed: int) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in ids:
        m = {"folder": FOLDERS[rng.integers(5)], "year": int(rng.integers(2000, 2025)), "tag": TAGS[rng.integers(6)]}
        if rng.random() < 0.6:
            m["starred"] = bool(rng.random() < 0.5)  # absent for 40%: "not starred" holds for them
        out[i] = m
    return out


class World:
    """The sequence's expected state: every item's features and metadata, and which are live."""

    def __init__(self) -> None:
        self.feats = features(N, 1)
        self.ids = [f"img{i:05d}" for i in range(N)]
        self.meta = metadata(self.ids, 2)
        rng = np.random.default_rng(3)
        doomed = set(rng.choice(N, size=1000, replace=False).tolist())
        for i, item in enumerate(self.ids):
            self.meta[item]["doomed"] = i in doomed
        self.add_ids = [f"img{i:05d}" for i in range(N_DUP)] + [f"new{i:05d}" for i in range(N_ADD - N_DUP)]
        self.add_feats = features(N_ADD, 4)
        self.add_meta = metadata(self.add_ids, 5)
        for m in self.add_meta.values():
            m["doomed"] = False
        self.by_id = {i: (self.feats[j], dict(self.meta[i])) for j, i in enumerate(self.ids)}
        for j, i in enumerate(self.add_ids[N_DUP:], start=N_DUP):  # duplicates are skipped
            self.by_id[i] = (self.add_feats[j], dict(self.add_meta[i]))
        self.row = {i: j for j, i in enumerate([*self.ids, *self.add_ids[N_DUP:]])}
        live = [i for i in self.by_id if not self.by_id[i][1]["doomed"]]
        self.deleted_by_id = [live[j] for j in rng.choice(len(live), size=50, replace=False)]
        for i in [*(i for i in self.by_id if self.by_id[i][1]["doomed"]), *self.deleted_by_id]:
            del self.by_id[i]
        self.updates = {}
        for i in rng.choice(sorted(self.by_id), size=300, replace=False).tolist():
            self.updates[i] = {"folder": "trips", "year": 2020, "tag": "beach", "starred": bool(rng.random() < 0.5)}
            self.by_id[i][1].update(self.updates[i])


def apply_sequence(g, world: World) -> None:
    """Build-time content is given by the caller; this adds, deletes and updates."""
    rep = g.add(regions(world.add_feats, img_dim=D, ids=world.add_ids), world.add_meta, options=NO_BAR)
    assert (rep.added, rep.duplicates) == (N_ADD - N_DUP, N_DUP)
    assert g.delete(where="doomed") == 1000
    assert g.delete(ids=world.deleted_by_id) == 50
    assert g.update(world.updates) == 300
    assert len(g) == len(world.by_id) == N + N_ADD - N_DUP - 1050


def queries(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(n)]


def brute_force(model, world: World, texts: list[str], where: str | None) -> list[list[tuple[str, float]]]:
    flt = parse_filter(where) if where else None
    items = [i for i, (_, m) in world.by_id.items() if flt is None or matches(flt, {"id": i, **m})]
    feats = torch.from_numpy(np.stack([world.by_id[i][0] for i in items]))
    ids, lens = model.tokenize(texts)
    with torch.no_grad():
        scores = model.similarity(feats, None, ids, lens).t().double().numpy()  # (Q, items)
    rows = np.asarray([world.row[i] for i in items])  # ties go to the lower row, as in a gallery
    out = []
    for row in scores:
        top = np.lexsort((rows, -row))[:10]
        out.append([(items[j], float(row[j])) for j in top])
    return out


def assert_equal_to_brute_force(g, model, world, texts, rerank_k=None) -> None:
    for where in FILTERS:
        want = brute_force(model, world, texts, where)
        got = g.search_texts(texts, k=10, where=where, rerank_k=rerank_k)
        flt = parse_filter(where) if where else None
        for q, (w, h) in enumerate(zip(want, got)):
            np.testing.assert_allclose(
                [x.score for x in h], [s for _, s in w], rtol=0, atol=1e-5, err_msg=f"{where} {q}"
            )
            assert [x.id for x in h] == [i for i, _ in w], (where, q)
            for x in h:
                assert x.id in world.by_id  # never a deleted item
                assert flt is None or matches(flt, {"id": x.id, **x.metadata}), (where, x)
                assert x.metadata == {k: v for k, v in world.by_id[x.id][1].items()}


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def vse():
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module")
def esl():
    return tiny_gru_model(seed=3).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not has_grpc_server():
        if os.environ.get("CI"):
            raise RuntimeError("CI needs pymilvus and milvus-lite >= 3")
        pytest.skip("pymilvus / milvus-lite not installed")
    srv = MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield srv
    srv.stop()


def built(model, world: World, target, collection=None):
    src = regions(world.feats, img_dim=D, ids=world.ids)
    g = build_gallery(model, src, target, collection, metadata=world.meta, options=NO_BAR)
    apply_sequence(g, world)
    return g


def test_one_stage_sequence_equals_brute_force_on_both_stores(vse, world, server, tmp_path):
    texts = queries(N_QUERIES)
    files = built(vse, world, tmp_path / "files")
    assert_equal_to_brute_force(files, vse, world, texts)
    mil = built(vse, world, server.uri, "seq_vse")
    assert_equal_to_brute_force(mil, vse, world, texts)
    for where in FILTERS:  # the two stores: same ids, scores within 1e-5
        a, b = files.search_texts(texts, k=10, where=where), mil.search_texts(texts, k=10, where=where)
        assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b]
        np.testing.assert_allclose([[h.score for h in r] for r in a], [[h.score for h in r] for r in b], atol=1e-5)
    info = {k: v for k, v in files.store.info().items() if k != "fields"}
    assert info == {
        "count": len(world.by_id),
        "deleted": 1050,
        "rows": N + N_ADD - N_DUP,
        "numbered": N + N_ADD - N_DUP,
    }
    report = files.compact()
    assert report["removed"] == 1050 and len(files) == len(world.by_id) and files.store.info()["deleted"] == 0
    assert_equal_to_brute_force(open_gallery(tmp_path / "files", model=vse, verify=True), vse, world, texts[:20])
    assert mil.compact()["count"] == len(world.by_id)
    assert_equal_to_brute_force(mil, vse, world, texts[:20])


@pytest.mark.slow
def test_two_stage_sequence_with_full_rerank_equals_exhaustive_esl(esl, world, server, tmp_path):
    texts = queries(N_QUERIES)
    files = built(esl, world, tmp_path / "files")
    assert_equal_to_brute_force(files, esl, world, texts, rerank_k=N + N_ADD)
    mil = built(esl, world, server.uri, "seq_esl")
    few = texts[:10]  # Milvus fetches every item's levels per query here: fewer queries
    assert_equal_to_brute_force(mil, esl, world, few, rerank_k=N + N_ADD)
    for where in FILTERS:
        a = files.search_texts(few, k=10, where=where, rerank_k=100)  # the two stores: same two-stage answers
        b = mil.search_texts(few, k=10, where=where, rerank_k=100)
        assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b]
        np.testing.assert_allclose([[h.score for h in r] for r in a], [[h.score for h in r] for r in b], atol=1e-5)
