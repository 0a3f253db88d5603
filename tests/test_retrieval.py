"""Gallery indexes and two-stage retrieval: exactness, storage, damage, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _datagen import make_precomp
from _models import tiny_gru_model
from eslmatch.cli import main
from eslmatch.data import open_split
from eslmatch.errors import EslmatchError
from eslmatch.retrieval import (
    FaissOptions,
    GalleryIndex,
    GalleryIndexError,
    add_to_index,
    build_caption_index,
    build_image_index,
    plan_depth,
    rebuild_faiss,
)

QUERY = "the red circle left of the blue square"
N_IMAGES = 14


@pytest.fixture(scope="module")
def model():
    return tiny_gru_model(seed=3).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_precomp(root, splits=("test", "dev"), n_images=N_IMAGES, regions=6, dim=16, ids=True, image_paths=True)


@pytest.fixture(scope="module")
def image_index(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "images"
    return build_image_index(model, data, out, progress=False, model_path="/nowhere/model")


@pytest.fixture(scope="module")
def caption_index(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "captions"
    return build_caption_index(model, data, out, progress=False)


def exhaustive_t2i(model, split, text, lengths=None, regions=None):
    """ESL scores of ``text`` against every image with ``model.score`` ``(N,)``."""
    images = torch.from_numpy(split.read_images(slice(None)) if regions is None else regions)
    with torch.no_grad():
        img = model.embed_images(images, lengths)
        ids, lens = model.tokenize([text])
        cap = model.embed_captions(ids, lens)
        return model.score(img, lengths, cap, lens)[:, 0].double().numpy()


def ranking(scores):
    rows = np.arange(len(scores))
    return np.lexsort((rows, -scores))


# ---------------------------------------------------------------------- round trip and exactness
def test_round_trip(model, data, image_index):
    idx = GalleryIndex.open(image_index, model=model, verify=True)
    split = open_split(data, "test")
    assert idx.kind == "image" and idx.count == N_IMAGES == len(idx)
    assert idx.ids == split.ids and idx.width == 6 and idx.total_dim == model.config.total_dim
    assert idx.image_path(split.ids[3]) == split.image_paths[3]
    assert idx.model_path == str(Path("/nowhere/model").resolve())
    manifest = json.loads((image_index / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["dtype"] == "float32" and manifest["faiss"]["kind"] == "flat"
    assert set(manifest["files"]) >= {"side.npy", "lengths.npy", "global.npy", "faiss.index", "ids.txt", "paths.txt"}
    assert isinstance(idx.side, np.memmap)
    hits = idx.search_text(model, QUERY, k=5, rerank_k=50)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i].score >= hits[i + 1].score for i in range(4))
    assert len({h.id for h in hits}) == 5 and all(h.path == split.image_paths[h.index] for h in hits)


def test_two_stage_with_full_rerank_is_exhaustive_esl(model, data, image_index):
    idx = GalleryIndex.open(image_index, model=model)
    split = open_split(data, "test")
    for text in (QUERY, "a big green square", "the small blue circle above the red square"):
        exact = exhaustive_t2i(model, split, text)
        hits = idx.search_text(model, text, k=N_IMAGES, rerank_k=N_IMAGES)
        assert [h.index for h in hits] == ranking(exact).tolist()
        np.testing.assert_allclose([h.score for h in hits], exact[[h.index for h in hits]], rtol=1e-5, atol=1e-6)


def test_first_stage_score_is_the_mean_affinity(model, data, image_index):
    idx = GalleryIndex.open(image_index, model=model)
    split = open_split(data, "test")
    images = torch.from_numpy(split.read_images(slice(None)))
    with torch.no_grad():
        level = model.embed_images(images, None)
        np.testing.assert_allclose(idx.global_vectors, model.index_vectors_images(level).numpy(), rtol=1e-5, atol=1e-6)
        ids, lens = model.tokenize([QUERY])
        x = model.embed_captions(ids, lens)[0]  # (W, Dt)
        z = model.prepare_images(level)  # (N, R, Dt)
        mean_affinity = torch.einsum("wd,nrd->nwr", x, z).mean(dim=(1, 2)).double().numpy()
    hits = idx.search_text(model, QUERY, k=N_IMAGES, rerank_k=0)
    got = np.array([h.first_stage_score for h in hits])
    np.testing.assert_allclose(got, mean_affinity[[h.index for h in hits]], rtol=1e-4, atol=1e-6)
    assert [h.index for h in hits] == ranking(mean_affinity).tolist()
    assert all(h.score == h.first_stage_score for h in hits)  # first stage only


def test_rerank_rules():
    assert plan_depth(10, 100, 1000) == (10, 100, True)
    assert plan_depth(10, 3, 1000) == (10, 10, True)  # raised to k
    assert plan_depth(10, 0, 1000) == (10, 10, False)
    assert plan_depth(10, -1, 1000) == (10, 10, False)
    assert plan_depth(10, None, 1000) == (10, 10, False)
    assert plan_depth(50, 500, 20) == (20, 20, True)  # clamped to the gallery
    with pytest.raises(EslmatchError, match="k must be"):
        plan_depth(0, 10, 5)


def test_shortlist_then_rerank(model, data, image_index):
    """rerank_k < N: the hits are the shortlist re-ordered by ESL score."""
    idx = GalleryIndex.open(image_index, model=model)
    split = open_split(data, "test")
    exact = exhaustive_t2i(model, split, QUERY)
    first = idx.search_text(model, QUERY, k=6, rerank_k=0)
    two = idx.search_text(model, QUERY, k=6, rerank_k=6)
    assert {h.index for h in two} == {h.index for h in first}
    shortlist = np.array([h.index for h in first])
    assert [h.index for h in two] == shortlist[ranking(exact[shortlist])].tolist()


def test_fp16_index_same_top_results(model, data, image_index, tmp_path):
    half = build_image_index(model, data, tmp_path / "half", fp16=True, progress=False)
    a, b = GalleryIndex.open(image_index, model=model), GalleryIndex.open(half, model=model)
    assert b.side.dtype == np.float16 and b.global_vectors.dtype == np.float32
    assert (half / "side.npy").stat().st_size < (image_index / "side.npy").stat().st_size
    for text in (QUERY, "a big green square"):
        ha, hb = a.search_text(model, text, k=3, rerank_k=N_IMAGES), b.search_text(model, text, k=3, rerank_k=N_IMAGES)
        assert [h.id for h in ha] == [h.id for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=5e-3)


def test_approximate_kinds_match_flat_on_small_galleries(model, data, image_index, tmp_path):
    flat = GalleryIndex.open(image_index, model=model)
    want = [h.id for h in flat.search_text(model, QUERY, k=5, rerank_k=8)]
    ivf = rebuild_faiss(image_index, "ivf", FaissOptions(nlist=3, nprobe=3), out=tmp_path / "ivf")
    hnsw = build_image_index(model, data, tmp_path / "hnsw", faiss_kind="hnsw", progress=False)
    for path, kind in ((ivf, "ivf"), (hnsw, "hnsw")):
        idx = GalleryIndex.open(path, model=model, verify=True)
        assert idx.faiss_kind == kind
        assert [h.id for h in idx.search_text(model, QUERY, k=5, rerank_k=8)] == want


def test_variable_region_counts_from_npy(model, tmp_path):
    rng = np.random.default_rng(0)
    regions = rng.random((7, 5, 16), dtype=np.float32)
    lengths = np.array([5, 3, 1, 4, 5, 2, 5])
    np.save(tmp_path / "feats.npy", regions)
    out = build_image_index(model, tmp_path / "feats.npy", tmp_path / "idx", lengths=lengths, progress=False)
    idx = GalleryIndex.open(out, model=model)
    assert idx.ids == [str(i) for i in range(7)] and idx.paths == [None] * 7
    np.testing.assert_array_equal(np.asarray(idx.lengths), lengths)
    exact = exhaustive_t2i(model, None, QUERY, torch.from_numpy(lengths), regions)
    hits = idx.search_text(model, QUERY, k=7, rerank_k=7)
    with torch.no_grad():
        level = model.embed_images(torch.from_numpy(regions), torch.from_numpy(lengths))
        want = model.index_vectors_images(level, torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(idx.global_vectors, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([h.score for h in hits], exact[[h.index for h in hits]], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- reverse direction
def test_reverse_direction_image_to_captions(model, data, image_index, caption_index):
    caps = GalleryIndex.open(caption_index, model=model)
    images = GalleryIndex.open(image_index, model=model)
    split = open_split(data, "test")
    assert caps.kind == "caption" and caps.count == 5 * N_IMAGES
    assert caps.captions == split.captions and caps.ids[7] == f"{split.ids[1]}#2"
    assert caps.image_path(caps.ids[7]) == split.image_paths[1]
    image_id = split.ids[4]
    by_id = caps.search_image(model, image_id, k=caps.count, rerank_k=caps.count, image_index=images)
    by_entry = caps.search_image(model, images.lookup(image_id), k=5, rerank_k=caps.count)
    by_regions = caps.search_image(model, split.read_images(slice(4, 5))[0], k=5, rerank_k=caps.count)
    with torch.no_grad():
        img = model.embed_images(torch.from_numpy(split.read_images(slice(4, 5))), None)
        ids, lens = model.tokenize(split.captions)
        exact = model.score(img, None, model.embed_captions(ids, lens), lens)[0].double().numpy()
    assert [h.index for h in by_id] == ranking(exact).tolist()
    np.testing.assert_allclose([h.score for h in by_id], exact[[h.index for h in by_id]], rtol=1e-5, atol=1e-6)
    assert [h.id for h in by_entry] == [h.id for h in by_id[:5]] == [h.id for h in by_regions]
    assert by_id[0].caption == split.captions[by_id[0].index]
    with pytest.raises(EslmatchError, match="image_index"):
        caps.search_image(model, image_id)
    with pytest.raises(EslmatchError, match="needs an image index"):
        caps.search_text(model, QUERY)


# ---------------------------------------------------------------------- attention
def test_attention_weights(model, data, tmp_path):
    root = make_precomp(tmp_path / "grid", splits=("test",), n_images=3, regions=6, dim=16, ids=True)
    meta = {"format": "x", "regions": 6, "splits": {"test": {"backbone_info": {"grid": [2, 3], "weights": "w"}}}}
    (root / "extract_meta.json").write_text(json.dumps(meta))
    out = build_image_index(model, root, tmp_path / "idx", progress=False)
    idx = GalleryIndex.open(out, model=model)
    assert idx.grid == (2, 3)
    words, weights, grid = idx.attention(model, "a red circle", idx.ids[1])
    assert words == ["<start>", "a", "red", "circle", "<end>"]
    assert weights.shape == (5, 6) and grid == (2, 3)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert (weights >= 0).all() and weights.std() > 0
    # box-pooled regions are no grid, whatever their base backbone's map was
    meta["splits"]["test"]["backbone_info"]["boxes_file"] = "boxes.json"
    (root / "extract_meta.json").write_text(json.dumps(meta))
    boxed = GalleryIndex.open(build_image_index(model, root, tmp_path / "boxed", progress=False), model=model)
    assert boxed.grid is None and boxed.attention(model, "a red circle", boxed.ids[0])[2] is None


# ---------------------------------------------------------------------- add
def test_add_then_search_finds_new_items(model, data, image_index, tmp_path):
    import shutil

    target = tmp_path / "grow"
    shutil.copytree(image_index, target)
    rng = np.random.default_rng(5)
    new = rng.random((3, 8, 16), dtype=np.float32) * 3  # more regions than the index: arrays widen
    add_to_index(target, model, new, ids=["new-a", "new-b", "new-c"], paths=["a.png", "b.png", "c.png"], progress=False)
    idx = GalleryIndex.open(target, model=model, verify=True)
    assert idx.count == N_IMAGES + 3 and idx.width == 8 and idx.ids[-3:] == ["new-a", "new-b", "new-c"]
    split = open_split(data, "test")
    padded = np.zeros((N_IMAGES + 3, 8, 16), dtype=np.float32)
    padded[:N_IMAGES, :6] = split.read_images(slice(None))
    padded[N_IMAGES:] = new
    lengths = torch.tensor([6] * N_IMAGES + [8] * 3)
    exact = exhaustive_t2i(model, None, QUERY, lengths, padded)
    hits = idx.search_text(model, QUERY, k=idx.count, rerank_k=idx.count)
    assert [h.index for h in hits] == ranking(exact).tolist()
    assert {"new-a", "new-b", "new-c"} <= {h.id for h in hits}
    assert idx.image_path("new-b") == "b.png"
    with pytest.raises(EslmatchError, match="duplicate id 'new-a'"):
        add_to_index(target, model, new[:1], ids=["new-a"], progress=False)


def test_add_captions(model, caption_index, tmp_path):
    import shutil

    target = tmp_path / "caps"
    shutil.copytree(caption_index, target)
    add_to_index(target, model, ["a green circle above a big red square and a small blue circle"], progress=False)
    idx = GalleryIndex.open(target, model=model, verify=True)
    assert idx.count == 5 * N_IMAGES + 1 and idx.ids[-1] == str(5 * N_IMAGES)
    assert idx.caption(idx.ids[-1]).startswith("a green circle above")


# ---------------------------------------------------------------------- damage and mismatches
@pytest.fixture()
def damaged(image_index, tmp_path):
    import shutil

    target = tmp_path / "damaged"
    shutil.copytree(image_index, target)
    return target


def test_missing_file_refused(damaged):
    os.remove(damaged / "global.npy")
    with pytest.raises(GalleryIndexError, match="global.npy: missing"):
        GalleryIndex.open(damaged)


def test_truncated_array_refused(damaged):
    data = (damaged / "side.npy").read_bytes()
    (damaged / "side.npy").write_bytes(data[: len(data) - 100])
    with pytest.raises(GalleryIndexError, match="side.npy: .* bytes, the manifest records"):
        GalleryIndex.open(damaged)


def test_modified_bytes_refused_with_verify(damaged):
    data = bytearray((damaged / "side.npy").read_bytes())
    data[-5] ^= 0xFF
    (damaged / "side.npy").write_bytes(bytes(data))
    GalleryIndex.open(damaged)  # sizes only: not detected
    with pytest.raises(GalleryIndexError, match="sha256 differs"):
        GalleryIndex.open(damaged, verify=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(version=99), "version 99 is not supported"),
        (lambda m: m.update(count=3), "lines, the index holds 3"),
        (lambda m: m.update(width=4), "shape"),
        (lambda m: m.update(kind="video"), "kind 'video'"),
        (lambda m: m.pop("files"), "no 'files' table"),
        (lambda m: m["faiss"].update(kind="annoy"), "faiss kind 'annoy'"),
    ],
)
def test_edited_manifest_refused(damaged, edit, message):
    manifest = json.loads((damaged / "manifest.json").read_text())
    edit(manifest)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GalleryIndexError, match=message):
        GalleryIndex.open(damaged)


def test_broken_manifest_and_non_index(damaged, tmp_path):
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(GalleryIndexError, match="not valid JSON"):
        GalleryIndex.open(damaged)
    with pytest.raises(GalleryIndexError, match="no such index"):
        GalleryIndex.open(tmp_path / "absent")


def test_wrong_model_refused(image_index):
    other = tiny_gru_model(seed=11).eval()
    with pytest.raises(GalleryIndexError, match="fingerprint mismatch"):
        GalleryIndex.open(image_index, model=other)
    idx = GalleryIndex.open(image_index)
    with pytest.raises(GalleryIndexError, match="fingerprint mismatch"):
        idx.search_text(other, QUERY)
    wider = tiny_gru_model(embed_size=64, seed=3).eval()
    with pytest.raises(GalleryIndexError, match="Dt="):
        idx.search_text(wider, QUERY)


def test_failed_build_keeps_existing_index(model, damaged, tmp_path):
    before = (damaged / "manifest.json").read_text()
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 9), dtype=np.float32))  # wrong feature width
    with pytest.raises(EslmatchError, match="width 9"):
        build_image_index(model, tmp_path / "bad.npy", damaged, progress=False)
    assert (damaged / "manifest.json").read_text() == before
    GalleryIndex.open(damaged, verify=True)
    assert not [p for p in damaged.parent.iterdir() if p.name.startswith(".damaged.")]
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(EslmatchError, match="not an index"):
        build_image_index(model, tmp_path / "bad.npy", tmp_path / "keep", progress=False)


# ---------------------------------------------------------------------- CLI
def test_cli_build_and_search_json(model, data, tmp_path):
    model_dir = model.save_pretrained(tmp_path / "model")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "eslmatch.cli"]
    build = subprocess.run(
        [
            *cli,
            "index",
            "build",
            "--model",
            str(model_dir),
            "--features",
            str(data),
            "--out",
            str(tmp_path / "idx"),
            "--faiss",
            "hnsw",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert build.returncode == 0, build.stderr
    assert "built image index" in build.stdout and "hnsw" in build.stdout
    search = subprocess.run(
        [*cli, "search", "--index", str(tmp_path / "idx"), QUERY, "-k", "4", "--rerank-k", "20", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert search.returncode == 0, search.stderr
    result = json.loads(search.stdout)
    want = GalleryIndex.open(tmp_path / "idx", model=model).search_text(model, QUERY, k=4, rerank_k=20)
    assert [h["id"] for h in result["hits"]] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in result["hits"]], [h.score for h in want], rtol=1e-5)


def test_cli_reverse_info_add_and_errors(model, data, image_index, tmp_path, capsys):
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    caps = str(tmp_path / "caps")
    assert (
        main(["index", "build", "--model", model_dir, "--features", str(data), "--kind", "caption", "--out", caps]) == 0
    )
    capsys.readouterr()
    split = open_split(data, "test")
    code = main(
        [
            "search",
            "--index",
            caps,
            "--image-id",
            split.ids[2],
            "--image-index",
            str(image_index),
            "--model",
            model_dir,
            "-k",
            "3",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["hits"]) == 3 and all("caption" in h for h in out["hits"])
    assert main(["index", "add", "--index", caps, "--features", str(data), "--split", "dev"]) == 1  # ids repeat
    assert "duplicate id" in capsys.readouterr().err
    assert main(["index", "info", caps, "--verify"]) == 0
    text = capsys.readouterr().out
    assert "caption" in text and "verified" in text
    assert main(["search", "--index", str(image_index), QUERY]) == 1  # recorded model path does not exist
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eslmatch: error:") and "--model" in err[0]
    other = str(tiny_gru_model(seed=9).eval().save_pretrained(tmp_path / "other"))
    assert main(["search", "--index", str(image_index), QUERY, "--model", other]) == 1
    assert "fingerprint mismatch" in capsys.readouterr().err


def test_ivf_grows_then_retrains(model, tmp_path):
    rng = np.random.default_rng(2)
    first, more = rng.random((4, 6, 16), dtype=np.float32), rng.random((20, 6, 16), dtype=np.float32)
    out = build_image_index(model, first, tmp_path / "ivf", faiss_kind="ivf", progress=False)
    assert json.loads((out / "manifest.json").read_text())["faiss"]["options"]["nlist"] == 2
    add_to_index(out, model, more[:2], progress=False)  # 6 <= 4 x 4: grows in place
    assert json.loads((out / "manifest.json").read_text())["faiss"]["trained_on"] == 4
    add_to_index(out, model, more[2:], progress=False)  # 24 > 4 x 4: retrained
    faiss_meta = json.loads((out / "manifest.json").read_text())["faiss"]
    assert faiss_meta["trained_on"] == 24 and faiss_meta["options"]["nlist"] == 5
    idx = GalleryIndex.open(out, model=model, verify=True)
    idx.set_search_params(nprobe=5)
    exact = exhaustive_t2i(model, None, QUERY, None, np.concatenate([first, more]))
    hits = idx.search_text(model, QUERY, k=24, rerank_k=24)
    assert [h.index for h in hits] == ranking(exact).tolist()
