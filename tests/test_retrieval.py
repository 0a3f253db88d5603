"""Galleries and two-stage retrieval: exactness, storage, damage, CLI."""

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
from _gallery import copy_to_damage
from _models import tiny_gru_model
from eslmatch.cli import main
from eslmatch.data import open_split
from eslmatch.errors import EslmatchError
from eslmatch.retrieval import (
    BuildOptions,
    FaissOptions,
    FileStore,
    GalleryIndexError,
    build_gallery,
    open_gallery,
    plan_depth,
)
from eslmatch.retrieval import regions as region_source
from eslmatch.retrieval.files import commit as filecommit
from eslmatch.retrieval.files.compact import copy_gallery
from eslmatch.retrieval.policy import item_record

QUERY = "the red circle left of the blue square"
N_IMAGES = 14


def build(model, inputs, out, **kw):
    """A file gallery (no progress bar); ``kw``: BuildOptions fields, then source options."""
    fields = {k: kw.pop(k) for k in list(kw) if k in BuildOptions.__dataclass_fields__}
    return build_gallery(model, inputs, out, options=BuildOptions(progress=False, **fields), **kw)


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
    build(model, data, out, model_path="/nowhere/model").close()
    return out


@pytest.fixture(scope="module")
def caption_index(model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "captions"
    build(model, data, out, kind="caption").close()
    return out


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
    g = open_gallery(image_index, model=model, verify=True)
    split = open_split(data, "test")
    assert g.kind == "image" and len(g) == N_IMAGES and g.stages == 2
    assert g.ids() == split.ids and g.store.total_dim == model.config.total_dim
    assert (g.metadata(split.ids[3])["path"] or None) == split.image_paths[3]
    manifest = json.loads((image_index / "manifest.json").read_text())
    assert manifest["version"] == 4 and manifest["dtype"] == "float32"
    assert manifest["model"]["path"] == str(Path("/nowhere/model").resolve())
    layout = g.store.layout()
    assert layout["faiss"]["kind"] == "flat" and layout["faiss"]["auto"] is True  # the size rule's choice
    assert [s["dir"] for s in layout["shards"]] == ["shards/00000"]
    assert set(layout["shards"][0]["files"]) == {"side.npy", "lengths.npy", "global.npy"}
    hits = g.search(QUERY, k=5, rerank_k=50)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i].score >= hits[i + 1].score for i in range(4))
    assert len({h.id for h in hits}) == 5 and all(h.path == split.image_paths[h.index] for h in hits)
    meta = g.metadata(split.ids[3])
    assert meta["id"] == split.ids[3] and meta["path"] == split.image_paths[3] and meta["added"]


def test_two_stage_with_full_rerank_is_exhaustive_esl(model, data, image_index):
    g = open_gallery(image_index, model=model)
    split = open_split(data, "test")
    for text in (QUERY, "a big green square", "the small blue circle above the red square"):
        exact = exhaustive_t2i(model, split, text)
        hits = g.search(text, k=N_IMAGES, rerank_k=N_IMAGES)
        assert [h.index for h in hits] == ranking(exact).tolist()
        np.testing.assert_allclose([h.score for h in hits], exact[[h.index for h in hits]], rtol=1e-5, atol=1e-6)


def test_first_stage_score_is_the_mean_affinity(model, data, image_index):
    g = open_gallery(image_index, model=model)
    split = open_split(data, "test")
    images = torch.from_numpy(split.read_images(slice(None)))
    with torch.no_grad():
        level = model.embed_images(images, None)
        stored = g.store.vectors(range(N_IMAGES))
        np.testing.assert_allclose(stored, model.index_vectors_images(level).numpy(), rtol=1e-5, atol=1e-6)
        ids, lens = model.tokenize([QUERY])
        x = model.embed_captions(ids, lens)[0]  # (W, Dt)
        z = model.prepare_images(level)  # (N, R, Dt)
        mean_affinity = torch.einsum("wd,nrd->nwr", x, z).mean(dim=(1, 2)).double().numpy()
    hits = g.search(QUERY, k=N_IMAGES, rerank_k=0)
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
    g = open_gallery(image_index, model=model)
    split = open_split(data, "test")
    exact = exhaustive_t2i(model, split, QUERY)
    first = g.search(QUERY, k=6, rerank_k=0)
    two = g.search(QUERY, k=6, rerank_k=6)
    assert {h.index for h in two} == {h.index for h in first}
    shortlist = np.array([h.index for h in first])
    assert [h.index for h in two] == shortlist[ranking(exact[shortlist])].tolist()


def test_fp16_side_same_top_results(model, data, image_index, tmp_path):
    half = build(model, data, tmp_path / "half", side_dtype="float16")
    a = open_gallery(image_index, model=model)
    assert half.store.dtype == "float16"
    sizes = [(p / "shards/00000/side.npy").stat().st_size for p in (tmp_path / "half", image_index)]
    assert sizes[0] < sizes[1]
    for text in (QUERY, "a big green square"):
        ha, hb = a.search(text, k=3, rerank_k=N_IMAGES), half.search(text, k=3, rerank_k=N_IMAGES)
        assert [h.id for h in ha] == [h.id for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=5e-3)


def test_approximate_kinds_match_flat_on_small_galleries(model, data, image_index, tmp_path):
    want = [h.id for h in open_gallery(image_index, model=model).search(QUERY, k=5, rerank_k=8)]
    ivf = copy_gallery(image_index, tmp_path / "ivf")
    FileStore.open(ivf).reindex("ivf", FaissOptions(nlist=3, nprobe=3))
    build(model, data, tmp_path / "hnsw", faiss_kind="hnsw").close()
    for path, kind in ((ivf, "ivf"), (tmp_path / "hnsw", "hnsw")):
        g = open_gallery(path, model=model, verify=True)
        assert g.store.faiss_kind == kind
        assert [h.id for h in g.search(QUERY, k=5, rerank_k=8)] == want
    assert open_gallery(image_index).store.faiss_kind == "flat"  # the copy was reindexed, not the original


def test_variable_region_counts_from_npy(model, tmp_path):
    rng = np.random.default_rng(0)
    regions = rng.random((7, 5, 16), dtype=np.float32)
    lengths = np.array([5, 3, 1, 4, 5, 2, 5])
    np.save(tmp_path / "feats.npy", regions)
    g = build(model, tmp_path / "feats.npy", tmp_path / "idx", lengths=lengths)
    assert g.ids() == [str(i) for i in range(7)] and (g.metadata("0")["path"] or None) is None
    _, lens = g.store.sides(np.arange(7))
    np.testing.assert_array_equal(lens, lengths)
    exact = exhaustive_t2i(model, None, QUERY, torch.from_numpy(lengths), regions)
    hits = g.search(QUERY, k=7, rerank_k=7)
    with torch.no_grad():
        level = model.embed_images(torch.from_numpy(regions), torch.from_numpy(lengths))
        want = model.index_vectors_images(level, torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(g.store.vectors(range(7)), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([h.score for h in hits], exact[[h.index for h in hits]], rtol=1e-5, atol=1e-6)


def test_non_finite_features_are_refused_naming_the_item(model, tmp_path):
    feats = np.random.default_rng(0).random((5, 4, 16), dtype=np.float32)
    feats[3, 1, 2] = np.nan
    with pytest.raises(EslmatchError, match=r"image '3' \(item 3 of the source\): its region features hold NaN"):
        build(model, feats, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


# ---------------------------------------------------------------------- reverse direction
def test_reverse_direction_image_to_captions(model, data, image_index, caption_index):
    caps = open_gallery(caption_index, model=model)
    images = open_gallery(image_index, model=model)
    split = open_split(data, "test")
    n = 5 * N_IMAGES
    assert caps.kind == "caption" and len(caps) == n
    recs = {r.row: r for r in caps.store.select(rows=range(n))}
    assert [recs[i].caption for i in range(n)] == split.captions and recs[7].id == f"{split.ids[1]}#2"
    assert (caps.metadata(recs[7].id)["path"] or None) == split.image_paths[1]
    image_id = split.ids[4]
    by_id = caps.searcher.images([images.searcher.stored(image_id)], k=n, rerank_k=n)[0]
    by_regions = caps.search(split.read_images(slice(4, 5))[0], k=5, rerank_k=n)
    with torch.no_grad():
        img = model.embed_images(torch.from_numpy(split.read_images(slice(4, 5))), None)
        ids, lens = model.tokenize(split.captions)
        exact = model.score(img, None, model.embed_captions(ids, lens), lens)[0].double().numpy()
    assert [h.index for h in by_id] == ranking(exact).tolist()
    np.testing.assert_allclose([h.score for h in by_id], exact[[h.index for h in by_id]], rtol=1e-5, atol=1e-6)
    assert [h.id for h in by_id[:5]] == [h.id for h in by_regions]
    assert by_id[0].caption == split.captions[by_id[0].index]
    with pytest.raises(EslmatchError, match="text search needs an image gallery"):
        caps.search(QUERY)


# ---------------------------------------------------------------------- attention
def test_attention_weights(model, data, tmp_path):
    root = make_precomp(tmp_path / "grid", splits=("test",), n_images=3, regions=6, dim=16, ids=True)
    meta = {"format": "x", "regions": 6, "splits": {"test": {"backbone_info": {"grid": [2, 3], "weights": "w"}}}}
    (root / "extract_meta.json").write_text(json.dumps(meta))
    g = build(model, root, tmp_path / "idx")
    assert g.store.grid == (2, 3)
    words, weights, grid = g.attention("a red circle", g.ids()[1])
    assert words == ["<start>", "a", "red", "circle", "<end>"]
    assert weights.shape == (5, 6) and grid == (2, 3)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert (weights >= 0).all() and weights.std() > 0
    # box-pooled regions are no grid, whatever their base backbone's map was
    meta["splits"]["test"]["backbone_info"]["boxes_file"] = "boxes.json"
    (root / "extract_meta.json").write_text(json.dumps(meta))
    boxed = build(model, root, tmp_path / "boxed")
    assert boxed.store.grid is None and boxed.attention("a red circle", boxed.ids()[0])[2] is None


# ---------------------------------------------------------------------- add
def test_add_then_search_finds_new_items(model, data, image_index, tmp_path):
    target = copy_gallery(image_index, tmp_path / "grow")
    rng = np.random.default_rng(5)
    new = rng.random((3, 8, 16), dtype=np.float32) * 3  # more regions than the gallery: a wider shard
    g = open_gallery(target, model=model)
    from eslmatch.retrieval import regions

    src = regions(new, img_dim=16, ids=["new-a", "new-b", "new-c"], paths=["a.png", "b.png", "c.png"])
    rep = g.add(src, options=BuildOptions(progress=False))
    assert rep.added == 3 and rep.count == N_IMAGES + 3 and g.ids()[-3:] == ["new-a", "new-b", "new-c"]
    g = open_gallery(target, model=model, verify=True)
    assert [s["width"] for s in g.store.layout()["shards"]] == [6, 8]
    split = open_split(data, "test")
    padded = np.zeros((N_IMAGES + 3, 8, 16), dtype=np.float32)
    padded[:N_IMAGES, :6] = split.read_images(slice(None))
    padded[N_IMAGES:] = new
    lengths = torch.tensor([6] * N_IMAGES + [8] * 3)
    exact = exhaustive_t2i(model, None, QUERY, lengths, padded)
    hits = g.search(QUERY, k=len(g), rerank_k=len(g))
    assert [h.index for h in hits] == ranking(exact).tolist()
    np.testing.assert_allclose([h.score for h in hits], exact[[h.index for h in hits]], rtol=1e-5, atol=1e-6)
    assert (g.metadata("new-b")["path"] or None) == "b.png"
    again = g.add(regions(new[:1], img_dim=16, ids=["new-a"]), options=BuildOptions(progress=False))
    assert again.added == 0 and again.duplicates == 1 and len(g) == N_IMAGES + 3  # skipped, not an error
    with pytest.raises(EslmatchError, match="id 'new-a' is in the gallery already"):
        g.add(regions(new[:1], img_dim=16, ids=["new-a"]), on_duplicate="error")


def test_a_features_only_folder_adds_with_its_ids_and_paths(model, image_index, tmp_path, capsys):
    """What ``eslmatch extract --images trips/ --out tripsdata/`` writes without a captions file
    (docs/extract.md: "features only") is added with its ids and paths. Was: ``tripsdata:
    missing test_caps.txt``."""
    target = copy_gallery(image_index, tmp_path / "g")
    trips, data = tmp_path / "trips", tmp_path / "tripsdata"
    trips.mkdir(), data.mkdir()
    names = ["beach_01", "beach_02", "hike"]
    for name in names:
        (trips / f"{name}.jpg").write_bytes(b"")  # the photos the features came from (paths only)
    np.save(data / "test_ims.npy", np.random.default_rng(7).random((3, 6, 16), dtype=np.float32))
    (data / "test_ids.txt").write_text("".join(f"{n}\n" for n in names))
    (data / "test_images.txt").write_text("".join(f"{n}.jpg\n" for n in names))
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    add = [
        "index",
        "add",
        "--index",
        str(target),
        "--features",
        str(data),
        "--images",
        str(trips),
        "--model",
        model_dir,
    ]
    assert main(add) == 0, capsys.readouterr().err
    assert "added 3 items" in capsys.readouterr().out
    g = open_gallery(target, model=model, verify=True)
    assert g.ids()[-3:] == names and Path(g.metadata("hike")["path"] or None).name == "hike.jpg"
    assert main(add) == 0 and "added 0 items" in capsys.readouterr().out  # again: skipped by id, not duplicated


def test_numbered_features_added_twice_are_not_duplicated(model, image_index, tmp_path, capsys):
    """Defect 6 (.npy half): an ``.npy`` without ids got ids '14'..'18', and adding it again
    silently duplicated it as '19'..'23'."""
    target = copy_gallery(image_index, tmp_path / "g")
    np.save(tmp_path / "more.npy", np.random.default_rng(3).random((5, 6, 16), dtype=np.float32))
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    add = ["index", "add", "--index", str(target), "--features", str(tmp_path / "more.npy"), "--model", model_dir]
    assert main(add) == 0 and "added 5 items" in capsys.readouterr().out
    assert main(add) == 0
    assert "added 0 items" in capsys.readouterr().out and len(open_gallery(target)) == N_IMAGES + 5
    assert main([*add, "--on-duplicate", "error"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"these 5 items were added already (ids {N_IMAGES}..)" in err[0], err


def test_replace_keeps_user_metadata_unless_given_anew(model, image_index, tmp_path):
    """Was: ``on_duplicate="replace"`` erased every replaced item's metadata (``--where starred``
    then found 0 of 59)."""
    target = copy_gallery(image_index, tmp_path / "g")
    g = open_gallery(target, model=model)
    first, second = g.ids()[:2]
    g.update({first: {"tag": "cat", "starred": True}, second: {"tag": "dog", "starred": False}})
    new = region_source(np.ones((2, 6, 16), dtype=np.float32), img_dim=16, ids=[first, second])
    rep = g.add(new, {second: {"tag": "wolf"}}, on_duplicate="replace", options=BuildOptions(progress=False))
    assert rep.added == 2 and len(g) == N_IMAGES
    g = open_gallery(target, model=model, verify=True)
    assert (g.metadata(first)["tag"], g.metadata(first)["starred"]) == ("cat", True)
    assert (g.metadata(second)["tag"], g.metadata(second)["starred"]) == ("wolf", False)  # the given field wins
    assert [h.id for h in g.search(QUERY, k=N_IMAGES, where="starred")] == [first]
    np.testing.assert_array_equal(*(g.store.vectors([item_record(g.store, i).row]) for i in (first, second)))


def test_add_captions(model, caption_index, tmp_path):
    target = copy_gallery(caption_index, tmp_path / "caps")
    g = open_gallery(target, model=model)
    g.add(["a green circle above a big red square and a small blue circle"], options=BuildOptions(progress=False))
    g = open_gallery(target, model=model, verify=True)
    assert len(g) == 5 * N_IMAGES + 1 and g.ids()[-1] == str(5 * N_IMAGES)
    assert g.metadata(g.ids()[-1])["id"] == str(5 * N_IMAGES)
    last = g.store.select(rows=[5 * N_IMAGES])[0]
    assert last.caption.startswith("a green circle above")


def test_one_captions_file_rule_for_index_and_embed(model, tmp_path, capsys):
    """Issue 30: `index build` read a captions .txt with 0-based ids and blank lines an error,
    `embed` with 1-based ids, blank lines skipped and ``ID<TAB>caption`` parsed. Now both read
    it by ``data.files.caption_lines``: blank lines left out, ``ID<TAB>caption`` gives the id."""
    (tmp_path / "named.txt").write_text("\ufeffc1\ta red  circle\n\nc2\ta blue square\n")
    g = build(model, str(tmp_path / "named.txt"), tmp_path / "C", kind="caption")
    assert g.ids() == ["c1", "c2"] and g.store.select(rows=[0])[0].caption == "a red circle"
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", model_dir, "--captions", str(tmp_path / "named.txt"), "--out", str(out)]) == 0
    from eslmatch.extract.embed import read_embeddings

    assert read_embeddings(out)[0] == ["c1", "c2"]
    (tmp_path / "plain.txt").write_text("a red circle\n\na blue square\n")
    assert build(model, str(tmp_path / "plain.txt"), tmp_path / "P", kind="caption").ids() == ["0", "1"]
    assert main(["embed", "--model", model_dir, "--captions", str(tmp_path / "plain.txt"), "--out", str(out)]) == 0
    assert read_embeddings(out)[0] == ["0", "1"]  # numbered as a gallery numbers them (was line numbers)
    (tmp_path / "mixed.txt").write_text("c1\ta red circle\na blue square\n")
    with pytest.raises(EslmatchError, match="line 2 names no id"):
        build(model, str(tmp_path / "mixed.txt"), tmp_path / "M", kind="caption")


def test_numbered_items_metadata_is_keyed_by_the_ids_they_receive(model, caption_index, tmp_path, capsys):
    """Was: keyed by the ids the new captions get, refused ("not among the 3 items added, e.g.
    '5'"); keyed "0", "1", "2", accepted and dropped (the store renumbered after attaching)."""
    target = copy_gallery(caption_index, tmp_path / "caps")
    start = 5 * N_IMAGES
    (tmp_path / "c2.txt").write_text("a red circle\na blue square\na green circle\n")
    (tmp_path / "m.jsonl").write_text("".join(f'{{"id": "{start + i}", "tag": "t{i}"}}\n' for i in range(3)))
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    add = ["index", "add", "--index", str(target), "--features", str(tmp_path / "c2.txt"), "--model", model_dir]
    assert main([*add, "--metadata", str(tmp_path / "m.jsonl")]) == 0, capsys.readouterr().err
    g = open_gallery(target, model=model)
    assert [g.metadata(str(start + i))["tag"] for i in range(3)] == ["t0", "t1", "t2"]
    (tmp_path / "old.jsonl").write_text('{"id": "0", "tag": "lost"}\n')  # an id these items do not get
    capsys.readouterr()
    assert main([*add, "--metadata", str(tmp_path / "old.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not among the 3 items added, e.g. '0'" in err[0], err
    assert len(open_gallery(target, model=model)) == start + 3  # nothing added
    assert open_gallery(target, model=model).delete(where='tag == "t1"') == 1  # a filter sees the metadata


# ---------------------------------------------------------------------- damage and mismatches
@pytest.fixture()
def damaged(image_index, tmp_path):
    target = tmp_path / "damaged"
    copy_to_damage(image_index, target)
    return target


def test_missing_file_refused(damaged):
    os.remove(damaged / "shards/00000/global.npy")
    with pytest.raises(GalleryIndexError, match="global.npy: missing"):
        FileStore.open(damaged)


def test_truncated_array_refused(damaged):
    side = damaged / "shards/00000/side.npy"
    data = side.read_bytes()
    side.write_bytes(data[: len(data) - 100])
    with pytest.raises(GalleryIndexError, match="side.npy: .* bytes, .* records"):
        FileStore.open(damaged)


def test_modified_bytes_refused_with_verify(damaged):
    side = damaged / "shards/00000/side.npy"
    data = bytearray(side.read_bytes())
    data[-5] ^= 0xFF
    side.write_bytes(bytes(data))
    FileStore.open(damaged)  # sizes only: not detected
    with pytest.raises(GalleryIndexError, match="sha256 differs"):
        FileStore.open(damaged, verify=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(version=99), "version 99 is not supported"),
        (lambda m: m.update(total_dim=7), "shape"),
        (lambda m: m.update(kind="video"), "kind, stages, dtype"),
        (lambda m: m.pop("model"), "missing or invalid 'model'"),
        (lambda m: m.update(dtype="int4"), "kind, stages, dtype"),
    ],
)
def test_edited_manifest_refused(damaged, edit, message):
    manifest = json.loads((damaged / "manifest.json").read_text())
    edit(manifest)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GalleryIndexError, match=message):
        FileStore.open(damaged)


def test_broken_manifest_and_non_index(damaged, tmp_path):
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(GalleryIndexError, match="not valid JSON"):
        FileStore.open(damaged)
    with pytest.raises(GalleryIndexError, match="no such index"):
        FileStore.open(tmp_path / "absent")
    (damaged / "catalog.sqlite").write_bytes(b"not a database at all" * 100)
    (damaged / "manifest.json").write_text(json.dumps({"format": "eslmatch-gallery-index"}))
    with pytest.raises(GalleryIndexError):
        FileStore.open(damaged)


def test_wrong_model_refused(model, image_index):
    other = tiny_gru_model(seed=11).eval()
    with pytest.raises(GalleryIndexError, match="built with another model"):
        open_gallery(image_index, model=other).search(QUERY)
    before = len(open_gallery(image_index, model=model))
    dim = model.config.img_dim
    new = region_source(np.ones((2, 6, dim), dtype=np.float32), img_dim=dim, ids=["x1", "x2"])
    with pytest.raises(GalleryIndexError, match="built with another model"):  # was: added, mixing the two models
        open_gallery(image_index, model=other).add(new)
    assert len(open_gallery(image_index, model=model)) == before
    wider = tiny_gru_model(embed_size=64, seed=3).eval()
    with pytest.raises(GalleryIndexError, match="fingerprint"):
        open_gallery(image_index, model=wider).search(QUERY)


def test_failed_build_keeps_existing_index(model, damaged, tmp_path):
    before = (damaged / "manifest.json").read_text()
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 9), dtype=np.float32))  # wrong feature width
    with pytest.raises(EslmatchError, match="width 9"):
        build(model, tmp_path / "bad.npy", damaged)
    assert (damaged / "manifest.json").read_text() == before
    FileStore.open(damaged, verify=True)
    assert not [p for p in damaged.parent.iterdir() if p.name.startswith(".damaged.")]
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(EslmatchError, match="not a gallery"):
        build(model, np.zeros((3, 4, 16), dtype=np.float32), tmp_path / "keep")


# ---------------------------------------------------------------------- CLI
def test_cli_build_and_search_json(model, data, tmp_path):
    model_dir = model.save_pretrained(tmp_path / "model")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "eslmatch.cli"]
    build_args = ["index", "build", "--model", str(model_dir), "--features", str(data), "--out", str(tmp_path / "idx")]
    done = subprocess.run([*cli, *build_args, "--faiss", "hnsw"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "built image gallery" in done.stdout and "hnsw" in done.stdout
    search = subprocess.run(
        [*cli, "search", "--index", str(tmp_path / "idx"), QUERY, "-k", "4", "--rerank-k", "20", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert search.returncode == 0, search.stderr
    result = json.loads(search.stdout)
    want = open_gallery(tmp_path / "idx", model=model).search(QUERY, k=4, rerank_k=20)
    assert [h["id"] for h in result["hits"]] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in result["hits"]], [h.score for h in want], rtol=1e-5)
    assert all(set(h) >= {"id", "score", "path", "metadata"} for h in result["hits"])


def test_cli_reverse_info_add_and_errors(model, data, image_index, tmp_path, capsys):
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    caps = str(tmp_path / "caps")
    assert (
        main(["index", "build", "--model", model_dir, "--features", str(data), "--kind", "caption", "--out", caps]) == 0
    )
    capsys.readouterr()
    split = open_split(data, "test")
    query = ["--image-id", split.ids[2], "--image-index", str(image_index), "--model", model_dir, "-k", "3", "--json"]
    code = main(["search", "--index", caps, *query])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["hits"]) == 3 and all("caption" in h for h in out["hits"])
    assert (
        main(["index", "add", "--index", caps, "--features", str(data), "--split", "dev", "--on-duplicate", "error"])
        == 1
    )
    assert "is in the gallery already" in capsys.readouterr().err
    assert main(["index", "add", "--index", caps, "--features", str(data), "--split", "dev"]) == 0  # skipped
    assert "added 0 items" in capsys.readouterr().out
    assert main(["index", "info", caps, "--verify"]) == 0
    text = capsys.readouterr().out
    assert "caption" in text and "verified" in text
    assert main(["search", "--index", str(image_index), QUERY]) == 1  # recorded model path does not exist
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eslmatch: error:") and "--model" in err[0]
    other = str(tiny_gru_model(seed=9).eval().save_pretrained(tmp_path / "other"))
    assert main(["search", "--index", str(image_index), QUERY, "--model", other]) == 1
    assert "built with another model" in capsys.readouterr().err
    add_other = ["index", "add", "--index", caps, "--features", str(data), "--split", "dev", "--model", other]
    assert main(add_other) == 1  # was: "added ... items", another model's vectors mixed in
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built with" in err[0], err  # another model (its weight file, then its fingerprint)


def test_search_cli_prints_the_library_query_result(model, data, tmp_path, capsys, caplog):
    """``search --json`` prints :func:`run_query`'s ``to_dict()`` and the table is
    :func:`format_query_result` (the times aside), for every kind of query; the library logs
    the missing-images warning that the command line shows."""
    from eslmatch.retrieval.query import Query, QueryResult, format_query_result, run_query

    model_dir = str(model.save_pretrained(tmp_path / "model"))
    images, caps = str(tmp_path / "images"), str(tmp_path / "caps")
    build(model, data, images, model_path=model_dir).close()
    build(model, data, caps, kind="caption", model_path=model_dir).close()
    split = open_split(data, "test")
    np.save(tmp_path / "feats.npy", split.read_images(slice(0, 1))[0])
    where = f'id != "{split.ids[1]}"'
    cases = [
        (images, Query(text=QUERY), [QUERY, "--where", where]),
        (images, Query(similar_to=split.ids[0]), ["--similar-to", split.ids[0]]),
        (caps, Query(image_id=split.ids[2], image_index=images), ["--image-id", split.ids[2], "--image-index", images]),
        (caps, Query(image_features=str(tmp_path / "feats.npy")), ["--image-features", str(tmp_path / "feats.npy")]),
    ]

    def timeless(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "seconds"}

    for index, query, args in cases:
        cli = ["search", "--index", index, *args, "-k", "4", "--rerank-k", "6"]
        assert main([*cli, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        flt = where if query.text else None
        result = run_query(open_gallery(index), query, 4, 6, flt)
        assert isinstance(result, QueryResult) and len(result.hits) == 4
        assert timeless(printed) == timeless(json.loads(result.to_json())), args
        assert main(cli) == 0
        table = capsys.readouterr().out.rstrip("\n").splitlines()
        ours = format_query_result(result).splitlines()
        assert table[:-1] == ours[:-1]
        assert table[-1].split(" ms")[1] == ours[-1].split(" ms")[1]  # "(4 of 14, N ms, filter ...)"
    caplog.clear()
    run_query(open_gallery(images), Query(text=QUERY), 2)  # the images/test/*.jpg recorded are not there
    (record,) = [r for r in caplog.records if r.name == "eslmatch.retrieval.query"]
    assert record.levelname == "WARNING" and "the result images are missing, e.g. images/test/" in record.getMessage()
    with pytest.raises(EslmatchError, match="is a caption index"):
        run_query(open_gallery(caps), Query(text=QUERY))
    with pytest.raises(EslmatchError, match="give one query"):
        Query(text=QUERY, similar_to=split.ids[0]).check()


def test_ivf_grows_then_retrains(model, tmp_path, monkeypatch):
    monkeypatch.setattr(filecommit, "TAIL_MIN", 0)  # extend FAISS on every add (no exact tail)
    rng = np.random.default_rng(2)
    first, more = rng.random((4, 6, 16), dtype=np.float32), rng.random((20, 6, 16), dtype=np.float32)
    g = build(model, first, tmp_path / "ivf", faiss_kind="ivf")
    assert g.store.layout()["faiss"]["options"]["nlist"] == 2
    g.add(more[:2], options=BuildOptions(progress=False))  # 6 <= 4 x 4: grows in place
    assert g.store.layout()["faiss"]["trained_on"] == 4 and g.store.layout()["faiss"]["rows"] == 6
    g.add(more[2:], options=BuildOptions(progress=False))  # 24 > 4 x 4: retrained
    faiss_meta = g.store.layout()["faiss"]
    assert faiss_meta["trained_on"] == 24 and faiss_meta["options"]["nlist"] == 5
    g = open_gallery(tmp_path / "ivf", model=model, verify=True)
    g.store.search_params.update(nprobe=5)
    exact = exhaustive_t2i(model, None, QUERY, None, np.concatenate([first, more]))
    hits = g.search(QUERY, k=24, rerank_k=24)
    assert [h.index for h in hits] == ranking(exact).tolist()
    assert len(list((tmp_path / "ivf" / "faiss").iterdir())) == 1  # the old FAISS files are gone


def test_an_item_is_read_in_one_snapshot_while_another_process_compacts(model, tmp_path):
    """Issue 34 D6: during another process's delete + compact, ``GET /items/{id}`` answered
    another item's fields: the row was looked up in one snapshot, the record read in the next."""
    feats = np.random.default_rng(4).random((4, 6, 16), dtype=np.float32)
    g = build(model, feats, tmp_path / "g", ids=["a", "b", "c", "d"])
    g.update({i: {"tag": i} for i in "abcd"})
    g.delete(["a"])
    reader = open_gallery(tmp_path / "g", model=model)
    rows_of = reader.store.catalog.rows_of

    def then_compact(ids):  # the row is found; another process compacts before the record is read
        found = rows_of(ids)
        if not getattr(then_compact, "done", False):
            then_compact.done = True
            other = open_gallery(tmp_path / "g", model=model)
            other.store.catalog.checkpoint = lambda: None  # it would wait for this very reader's snapshot
            other.compact()  # renumbers: c moves to row 1
        return found

    reader.store.catalog.rows_of = then_compact
    assert reader.metadata("c")["tag"] == "c"
    assert reader.metadata("d")["tag"] == "d" and (reader.metadata("d")["path"] or None) is None


@pytest.mark.parametrize(
    "args",
    [
        ["--hnsw-m", "0"],
        ["--hnsw-m", "-1"],
        ["--ef-construction", "-5"],
        ["--ef-search", "0"],
        ["--nlist", "0"],
        ["--nprobe", "-1"],
    ],  # fmt: skip
)
def test_faiss_settings_out_of_range_are_one_line(image_index, tmp_path, capsys, args):
    """Issue 34 D11: ``--hnsw-m 0`` aborted inside FAISS (SIGABRT), ``-1`` took 11 GB; the others
    were accepted or silently clamped. Now refused before anything is built."""
    kind = "hnsw" if args[0] in ("--hnsw-m", "--ef-construction", "--ef-search") else "ivf"
    out = tmp_path / "re"
    assert main(["index", "reindex", str(image_index), "--faiss", kind, *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be an integer from" in err[0] and not out.exists(), err


def test_a_gallery_rebuilt_in_place_is_read_whole(model, tmp_path):
    """Issue 34 D8: ``index build --out SAME`` under a running reader: it kept the old count,
    mixed the new ids with the old vectors (or failed with KeyError), and never saw changes
    again; the generation restarts with a new build, so it alone cannot tell. The reader now
    follows the catalogue file itself."""
    rng = np.random.default_rng(8)
    first, second = rng.random((6, 6, 16), dtype=np.float32), rng.random((3, 6, 16), dtype=np.float32)
    old_ids = [f"old{i}" for i in range(6)]
    build(model, first, tmp_path / "g", ids=old_ids, metadata={i: {"tag": i, "n": 1} for i in old_ids})
    reader = open_gallery(tmp_path / "g", model=model)
    assert len(reader) == 6 and reader.search(QUERY, k=2) and reader.metadata("old1")["tag"] == "old1"
    # rebuilt in place, with other metadata fields: the catalogue's columns differ (a live probe
    # of the server found every search failing with "no such column: f7" after such a rebuild)
    build(model, second, tmp_path / "g", ids=[f"new{i}" for i in range(3)], metadata={"new0": {"rating": 3}})
    fresh = open_gallery(tmp_path / "g", model=model)
    assert len(reader) == 3 and reader.ids() == ["new0", "new1", "new2"]
    got, want = reader.search(QUERY, k=3), fresh.search(QUERY, k=3)
    assert [h.id for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
    assert reader.metadata("new0")["rating"] == 3 and "tag" not in reader.metadata("new0")
    fresh.update({"new1": {"tag": "seen"}})  # later changes are seen
    assert reader.metadata("new1")["tag"] == "seen"
