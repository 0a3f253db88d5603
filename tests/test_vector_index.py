"""One-stage gallery indexes (models whose score IS the inner product of their index vectors):
exact against brute force both ways, add / reindex, damage, the two kinds kept apart, photo
folders and raw-image splits for models that take pixels, and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _datagen import make_precomp
from _gallery import copy_to_damage
from _models import ToyPixelModel, randomize, tiny_gru_model
from eslmatch import VSEModel
from eslmatch.cli import main
from eslmatch.data import open_split
from eslmatch.data.files import open_image
from eslmatch.errors import EslmatchError
from eslmatch.factory import FAMILIES
from eslmatch.retrieval import (
    BuildOptions,
    FaissOptions,
    FileStore,
    GalleryIndexError,
    build_gallery,
    captions,
    open_gallery,
    regions,
)
from eslmatch.retrieval.files.compact import copy_gallery

N_IMAGES, N_QUERIES, K = 120, 50, 10
QUERY = "the red circle left of the blue square"
ONE_STAGE_SHARD = {"global.npy", "shard.json"}  # no side, no lengths
NO_BAR = BuildOptions(progress=False)


# ---------------------------------------------------------------------- models and data
@pytest.fixture(scope="module")
def vse():
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_precomp(root, splits=("test", "dev"), n_images=N_IMAGES, regions=6, dim=16, ids=True, image_paths=True)


def build(model, inputs, out, **kw):
    return build_gallery(model, inputs, out, options=BuildOptions(progress=False, **kw.pop("options", {})), **kw)


@pytest.fixture(scope="module")
def image_index(vse, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "images"
    build(vse, data, out).close()
    return out


@pytest.fixture(scope="module")
def unique_captions(data):
    return list(dict.fromkeys(open_split(data, "test").captions))  # no exact ties between gallery items


@pytest.fixture(scope="module")
def caption_index(vse, unique_captions, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "captions"
    build(vse, unique_captions, out, kind="caption").close()
    return out


def brute_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties by row (the index's rule), per row of ``scores``."""
    return np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])


def assert_hits_exact(hits, scores: np.ndarray, k: int = K) -> None:
    """``hits`` (one list per query) are the brute-force top ``k`` of ``scores (Q, N)``."""
    top = brute_top(scores, k)
    for q, row in enumerate(hits):
        assert [h.index for h in row] == top[q].tolist()
        np.testing.assert_allclose([h.score for h in row], scores[q, top[q]], rtol=0, atol=1e-5)
        assert all(h.first_stage_score == h.score for h in row)


def t2i_scores(model, images, lengths, texts) -> np.ndarray:
    """``model.similarity`` of every text against every image ``(texts, images)``."""
    ids, lens = model.tokenize(texts)
    with torch.no_grad():
        return model.similarity(torch.as_tensor(images), lengths, ids, lens).t().double().numpy()


# ---------------------------------------------------------------------- VSE: exactness
def test_one_stage_files_and_manifest(vse, data, image_index):
    assert {p.name for p in (image_index / "shards/00000").iterdir()} == ONE_STAGE_SHARD
    g = open_gallery(image_index, model=vse, verify=True)
    m = g.store.manifest
    assert m["version"] == 4 and m["stages"] == 1 and g.stages == 1
    assert m["model"]["stages"] == 1 and m["model"]["inputs"] == "regions"
    assert g.store.total_dim == vse.config.embed_size and g.store.dtype == "float32"
    split = open_split(data, "test")
    assert g.ids() == split.ids and (g.metadata(split.ids[3])["path"] or None) == split.image_paths[3]
    with torch.no_grad():
        want = vse.embed_images(torch.from_numpy(split.read_images(slice(None)))).numpy()
    np.testing.assert_allclose(g.store.vectors(range(N_IMAGES)), want, rtol=1e-5, atol=1e-6)
    entry = g.searcher.stored(split.ids[0])
    assert entry.side is None and np.array_equal(entry.vector, g.store.vectors([0])[0])
    assert "stages=1" in repr(g)


def test_text_to_image_top10_equals_brute_force(vse, data, image_index):
    g = open_gallery(image_index, model=vse)
    split = open_split(data, "test")
    queries = split.captions[:: len(split.captions) // N_QUERIES][:N_QUERIES]
    exact = t2i_scores(vse, split.read_images(slice(None)), None, queries)
    timings: dict[str, float] = {}
    hits = g.search_texts(queries, k=K, timings=timings)
    assert len(hits) == N_QUERIES and {"encode", "first_stage"} <= set(timings)
    assert_hits_exact(hits, exact)
    # rerank_k is ignored: the first stage is exact
    for rerank_k in (0, None, 3, 1000):
        assert [h.index for h in g.search(queries[0], k=K, rerank_k=rerank_k)] == [h.index for h in hits[0]]
    assert len(g.search(QUERY, k=10_000)) == N_IMAGES  # k > N: all


def test_image_to_text_top10_equals_brute_force(vse, data, image_index, caption_index, unique_captions):
    caps = open_gallery(caption_index, model=vse)
    images = open_gallery(image_index, model=vse)
    recs = {r.row: r for r in caps.store.select(rows=range(len(caps)))}
    assert (
        caps.kind == "caption" and caps.stages == 1 and [recs[i].caption for i in range(len(caps))] == unique_captions
    )
    split = open_split(data, "test")
    feats = split.read_images(slice(0, N_QUERIES))
    exact = t2i_scores(vse, feats, None, unique_captions).T  # (images, captions)
    by_id = caps.searcher.images([images.searcher.stored(i) for i in split.ids[:N_QUERIES]], k=K)
    assert_hits_exact(by_id, exact)
    assert by_id[0][0].caption == unique_captions[by_id[0][0].index]
    by_regions = caps.search(feats[7], k=K)
    assert [h.id for h in by_regions] == [h.id for h in by_id[7]]
    np.testing.assert_allclose([h.score for h in by_regions], [h.score for h in by_id[7]], atol=1e-6)
    with pytest.raises(EslmatchError, match="takes region features, not image files"):
        caps.search(Path("photo.png"))
    with pytest.raises(EslmatchError, match="text search needs an image gallery"):
        caps.search(QUERY)


def test_ties_are_broken_by_row(vse, tmp_path):
    texts = ["a red circle", "the blue square", "a red circle", "a big green square", "a red circle"]
    caps = build(vse, texts * 3, tmp_path / "c", kind="caption")
    query = np.random.default_rng(0).random((6, 16), dtype=np.float32)
    hits = caps.search(query, k=len(caps))
    for a, b in zip(hits, hits[1:]):
        assert a.score > b.score or (a.score == b.score and a.index < b.index)
    assert len({h.score for h in hits}) == 3  # three distinct captions, several copies of each
    for k in range(1, len(caps)):  # a tie across the k-th place: the lower rows still win
        assert [h.index for h in caps.search(query, k=k)] == [h.index for h in hits[:k]]


def test_variable_region_counts(vse, tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.random((9, 5, 16), dtype=np.float32)
    lengths = np.array([5, 3, 1, 4, 5, 2, 5, 1, 3])
    np.save(tmp_path / "feats.npy", feats)
    g = build(vse, tmp_path / "feats.npy", tmp_path / "idx", lengths=lengths)
    assert g.ids() == [str(i) for i in range(9)] and (g.metadata("3")["path"] or None) is None
    exact = t2i_scores(vse, feats, torch.from_numpy(lengths), [QUERY, "a small blue circle"])
    assert_hits_exact(g.search_texts([QUERY, "a small blue circle"], k=9), exact, k=9)


# ---------------------------------------------------------------------- add and reindex
def test_add_images_and_captions(vse, data, image_index, caption_index, unique_captions, tmp_path):
    target = copy_gallery(image_index, tmp_path / "grow")
    new = np.random.default_rng(5).random((4, 8, 16), dtype=np.float32) * 2  # more regions: nothing to widen
    g = open_gallery(target, model=vse)
    src = regions(new, img_dim=16, ids=["n-a", "n-b", "n-c", "n-d"], paths=["a.png", "b.png", "c.png", "d.png"])
    g.add(src, options=NO_BAR)
    g = open_gallery(target, model=vse, verify=True)
    assert len(g) == N_IMAGES + 4 and g.ids()[-4:] == ["n-a", "n-b", "n-c", "n-d"]
    layout = g.store.layout()
    assert layout["faiss"]["rows"] == N_IMAGES and len(layout["sources"]) == 2  # the new rows: the exact tail
    assert all({p.name for p in (target / s["dir"]).iterdir()} == ONE_STAGE_SHARD for s in layout["shards"])
    old = open_split(data, "test").read_images(slice(None))
    texts = [QUERY, "a big green square", "the small blue circle above the red square"]
    exact = np.concatenate([t2i_scores(vse, old, None, texts), t2i_scores(vse, new, None, texts)], axis=1)
    assert_hits_exact(g.search_texts(texts, k=len(g)), exact, k=len(g))
    assert (g.metadata("n-b")["path"] or None) == "b.png"
    with pytest.raises(EslmatchError, match="id 'n-a' is in the gallery already"):
        g.add(regions(new[:1], img_dim=16, ids=["n-a"]), on_duplicate="error", options=NO_BAR)

    caps = open_gallery(copy_gallery(caption_index, tmp_path / "caps"), model=vse)
    caps.add(captions(["a green circle above a big red square"]), options=NO_BAR)
    assert len(caps) == len(unique_captions) + 1 and caps.ids()[-1] == str(len(unique_captions))
    hits = caps.search(old[0], k=len(caps))
    exact = t2i_scores(vse, old[:1], None, [*unique_captions, "a green circle above a big red square"]).T
    assert_hits_exact([hits], exact, k=len(caps))


def test_reindex_keeps_the_vectors(vse, image_index, tmp_path):
    want = open_gallery(image_index, model=vse).search_texts([QUERY, "a big green square"], k=K)
    for kind, opts in (("ivf", FaissOptions(nlist=4, nprobe=4)), ("hnsw", None)):  # ivf: all lists, exact
        path = copy_gallery(image_index, tmp_path / kind)
        FileStore.open(path).reindex(kind, opts)
        g = open_gallery(path, model=vse, verify=True)
        assert g.store.faiss_kind == kind and g.stages == 1
        got = g.search_texts([QUERY, "a big green square"], k=K)
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in want]
    FileStore.open(tmp_path / "hnsw").reindex("flat")  # in place
    assert FileStore.open(tmp_path / "hnsw", verify=True).faiss_kind == "flat"


# ---------------------------------------------------------------------- damage, mismatches
@pytest.fixture()
def damaged(image_index, tmp_path):
    target = tmp_path / "damaged"
    copy_to_damage(image_index, target)
    return target


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_one_stage_index_refused(damaged):
    vectors = damaged / "shards/00000/global.npy"
    data = bytearray(vectors.read_bytes())
    data[-5] ^= 0xFF
    vectors.write_bytes(bytes(data))
    FileStore.open(damaged)  # sizes only: not detected
    with pytest.raises(GalleryIndexError, match="global.npy: sha256 differs"):
        FileStore.open(damaged, verify=True)
    vectors.write_bytes(bytes(data[:-100]))
    with pytest.raises(GalleryIndexError, match="global.npy: .* bytes, .* records"):
        FileStore.open(damaged)
    vectors.unlink()
    with pytest.raises(GalleryIndexError, match="global.npy: missing"):
        FileStore.open(damaged)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(stages=3), "kind, stages, dtype or total_dim out of range"),
        (lambda m: m.pop("stages"), "missing or invalid 'stages'"),
        (lambda m: m.update(version=99), "version 99 is not supported"),
        (lambda m: m.update(stages=2), "no size/checksum recorded for shards/00000/side.npy"),  # posing as two-stage
        (lambda m: m.update(total_dim=7), "shape"),
    ],
)
def test_edited_one_stage_manifest_refused(damaged, edit, message):
    edit_manifest(damaged, edit)
    with pytest.raises(GalleryIndexError, match=message):
        FileStore.open(damaged)


def test_one_stage_and_two_stage_kept_apart(vse, data, image_index, tmp_path):
    esl = tiny_gru_model(seed=5).eval()
    with pytest.raises(GalleryIndexError, match="built by a single-vector model"):
        open_gallery(image_index, model=esl).search(QUERY)
    one = open_gallery(image_index, model=vse)
    with pytest.raises(EslmatchError, match="needs a two-stage image index of an ESL model"):
        one.attention("a red circle", one.ids()[0])
    with pytest.raises(EslmatchError, match="re-ranking needs a two-stage"):
        one.store.sides(np.array([0]))
    two = build(esl, data, tmp_path / "esl")
    assert two.stages == 2 and two.store.manifest["stages"] == 2
    with pytest.raises(GalleryIndexError, match="built by an ESL model"):
        open_gallery(tmp_path / "esl", model=vse).search(QUERY)
    other = VSEModel(vse.config, tokenizer=vse.tokenizer)
    randomize(other)
    with torch.no_grad():
        other.image_encoder.fc.weight.add_(0.5)
    with pytest.raises(GalleryIndexError, match="built with another model"):
        open_gallery(image_index, model=other.eval()).search(QUERY)


def _legacy_v2(image_index: Path, g, legacy: Path) -> None:
    """The same gallery written as eslmatch did before format 4 (version 2: one-stage vectors)."""
    legacy.mkdir()
    np.save(legacy / "global.npy", g.store.vectors(range(len(g))))
    shutil.copyfile(image_index / g.store.layout()["faiss"]["file"], legacy / "faiss.index")
    recs = {r.row: r for r in g.store.select(rows=range(len(g)))}
    (legacy / "ids.txt").write_text("".join(f"{recs[i].id}\n" for i in range(len(g))))
    (legacy / "paths.txt").write_text("".join(f"{recs[i].path}\n" for i in range(len(g))))
    manifest = {
        "format": "eslmatch-gallery-index",
        "version": 2,
        "stages": 1,
        "kind": "image",
        "created": "2026-11-01T00:00:00+00:00",
        "model": g.store.manifest["model"],
        "total_dim": g.store.total_dim,
        "width": 1,
        "count": len(g),
        "dtype": "float32",
        "grid": None,
        "faiss": {"kind": "flat", "options": {}, "trained_on": len(g)},
        "files": {
            n: {"bytes": (legacy / n).stat().st_size, "sha256": _sha(legacy / n)}
            for n in ("global.npy", "faiss.index", "ids.txt", "paths.txt")
        },
    }
    (legacy / "manifest.json").write_text(json.dumps(manifest))


def test_index_of_an_earlier_format_is_upgraded(vse, image_index, tmp_path, caplog):
    caplog.set_level("INFO", logger="eslmatch")
    g = open_gallery(image_index, model=vse)
    legacy = tmp_path / "legacy"
    _legacy_v2(image_index, g, legacy)
    before = (legacy / "global.npy").stat().st_ino
    up = open_gallery(legacy, model=vse)
    assert "upgraded" in caplog.text
    assert up.store.manifest["version"] == 4 and up.store.manifest["upgraded"]["from_version"] == 2
    assert (legacy / "shards/00000/global.npy").stat().st_ino == before  # linked, not copied
    assert [h.id for h in up.search(QUERY, k=K)] == [h.id for h in g.search(QUERY, k=K)]
    up.add(regions(np.random.default_rng(0).random((2, 6, 16), dtype=np.float32), img_dim=16), options=NO_BAR)
    grown = open_gallery(legacy, model=vse, verify=True)
    assert len(grown) == N_IMAGES + 2 and grown.ids()[-1] == str(N_IMAGES + 1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- a model that takes pixels
N_PHOTOS = 24


def write_photos(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(12, 40, size=2)
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(np.kron(blocks, np.ones((h // 4 + 1, w // 4 + 1, 1), dtype=np.uint8)))
        image.save(folder / name)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    names = [f"img_{i:02d}.png" for i in range(N_PHOTOS - 4)] + [f"more/pic_{i}.png" for i in range(4)]
    write_photos(folder, names, seed=0)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # corrupt
    (folder / "notes.txt").write_text("not a photo")  # not an image
    (folder / ".hidden.png").write_bytes(b"ignored")
    rng = np.random.default_rng(3)
    colors, shapes = ("red", "blue", "green"), ("circle", "square")
    by_words = {  # one caption per bag of words: the toy text tower scores word order alike
        " ".join(sorted(c.split())): c
        for c in (
            f"a {rng.choice(['big', 'small'])} {rng.choice(colors)} {rng.choice(shapes)} {rel} the {rng.choice(colors)} "
            f"{rng.choice(shapes)}"
            for rel in ("left of", "right of", "above") * 30
        )
    }
    captions = list(by_words.values())
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    tsv = [f"{n}\t{captions[i % len(captions)]}" for i, n in enumerate([*names[:6], "broken.png"])]
    (root / "captions.tsv").write_text("\n".join(tsv) + "\n")
    model = ToyPixelModel(seed=1).eval()
    return root, model, captions


def pixels_of(model, paths) -> torch.Tensor:
    return torch.stack([model.preprocess(open_image(Path(p))) for p in paths])


def test_photo_folder_index_is_exact_and_skips_bad_files(photos, tmp_path, caplog):
    root, model, caps_text = photos
    g = build(model, root / "photos", tmp_path / "img", options={"batch_size": 5})
    err = said(caplog)
    assert "skipping broken.png" in err and "skipping notes.txt: not an image" in err and ".hidden" not in err
    g = open_gallery(tmp_path / "img", model=model, verify=True)
    assert len(g) == N_PHOTOS and g.stages == 1 and g.store.manifest["model"]["inputs"] == "pixels"
    ids = g.ids()
    assert ids[:2] == ["img_00", "img_01"] and ids[-1] == "more/pic_3"
    recs = {r.row: r for r in g.store.select(rows=range(N_PHOTOS))}
    paths = [recs[i].path for i in range(N_PHOTOS)]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert g.metadata("more/pic_3")["folder"] == "more" and g.metadata("img_00")["folder"] == ""
    source = g.store.layout()["sources"][0]
    assert source["count"] == N_PHOTOS and source["skipped"] == 2
    assert {f["file"] for f in source["skipped_files"]} == {"broken.png", "notes.txt"}
    queries = caps_text[:N_QUERIES]
    pixels = pixels_of(model, paths)
    assert_hits_exact(g.search_texts(queries, k=K), t2i_scores(model, pixels, None, queries))

    caps = build(model, root / "captions.txt", tmp_path / "cap", kind="caption")
    exact = t2i_scores(model, pixels, None, caps_text).T  # (images, captions)
    assert_hits_exact(caps.searcher.images([g.searcher.stored(i) for i in ids], k=K), exact)
    photo = Path(paths[5])
    by_file = caps.search(photo, k=K)
    by_pil = caps.search(Image.open(photo), k=K)
    by_pixels = caps.search(model.preprocess(open_image(photo)), k=K)
    assert_hits_exact([by_file, by_pil, by_pixels], exact[[5, 5, 5]])
    similar = g.search(photo, k=3)  # image -> image on the image gallery
    assert similar[0].id == ids[5]
    assert g.similar(ids[5], k=3)[0].id != ids[5] and [h.id for h in g.similar(ids[5], k=2)] == [
        h.id for h in similar[1:3]
    ]
    with pytest.raises(EslmatchError, match="broken.png: not an image|broken.png: unreadable"):
        caps.search(root / "photos" / "broken.png")
    with pytest.raises(EslmatchError, match="this model takes images"):
        build(model, np.zeros((2, 3, 16), dtype=np.float32), tmp_path / "x")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("no photo here")
    with pytest.raises(EslmatchError, match=r"no readable image among the 1 files"):
        build(model, junk, tmp_path / "img")  # fails: the existing gallery stays
    assert len(open_gallery(tmp_path / "img", model=model, verify=True)) == N_PHOTOS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".img.")]  # no litter


def test_raw_image_splits_and_adding_photos(photos, tmp_path, caplog):
    root, model, caps_text = photos
    tsv = root / "captions.tsv"
    g = build(model, tsv, tmp_path / "split", images_dir=root / "photos")
    assert "skipping" in said(caplog)
    g = open_gallery(tmp_path / "split", model=model, verify=True)
    assert g.ids() == [f"img_{i:02d}" for i in range(6)]
    assert g.store.layout()["sources"][0]["split_file"] == str(tsv.resolve())
    caps = build(model, tsv, tmp_path / "cap", kind="caption", images_dir=root / "photos")
    assert "img_00#0" in caps.ids() and (caps.metadata("img_03#2")["path"] or None) == (
        g.metadata("img_03")["path"] or None
    )
    assert len(caps) == 7 * 5  # captions need no readable image: broken.png's are indexed too
    with pytest.raises(EslmatchError, match="needs the folder of its images"):
        build(model, tsv, tmp_path / "cap2", kind="caption")
    karpathy = {
        "images": [
            {
                "filename": f"img_{i:02d}.png",
                "split": "test" if i < 5 else "train",
                "sentences": [{"raw": "A red circle"}],
            }
            for i in range(8)
        ]
        + [{"filename": "gone.png", "split": "test", "sentences": [{"raw": "lost"}]}]
    }
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    kp = build(model, root / "karpathy.json", tmp_path / "kp", images_dir=root / "photos")
    assert len(kp) == 5 and "skipping gone.png: missing" in said(caplog)

    extra = tmp_path / "extra"
    write_photos(extra, ["new_a.png", "new_b.png"], seed=9)
    (extra / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rep = g.add(extra, options=NO_BAR)
    assert "bad.jpg" in said(caplog) and rep.added == 2 and len(rep.unreadable) == 1
    grown = open_gallery(tmp_path / "split", model=model, verify=True)
    assert grown.ids()[-2:] == ["new_a", "new_b"] and len(grown) == 8
    recs = {r.row: r for r in grown.store.select(rows=range(8))}
    pixels = pixels_of(model, [recs[i].path for i in range(8)])
    assert_hits_exact(grown.search_texts(caps_text[:5], k=8), t2i_scores(model, pixels, None, caps_text[:5]), k=8)
    again = grown.add(extra, options=NO_BAR)  # the same folder twice: skipped, reported, not an error
    assert again.added == 0 and again.duplicates == 2 and len(again.unreadable) == 1 and len(grown) == 8
    assert not (tmp_path / "split" / ".staging").exists()


# ---------------------------------------------------------------------- command line
@pytest.fixture()
def toy_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy-pixels", ToyPixelModel)


def said(caplog) -> str:
    """What the library logged since the last call (its warnings: skipped files)."""
    text = caplog.text
    caplog.clear()
    return text


def run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_photos(photos, tmp_path, capsys, toy_family):
    root, model, caps_text = photos
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    idx, cap = str(tmp_path / "idx"), str(tmp_path / "cap")
    assert main(["index", "build", "--model", model_dir, "--images", str(root / "photos"), "--out", idx]) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in err and "notes.txt" in err
    assert "stages     1" in out and f"{N_PHOTOS} items" in out and "2 unreadable files skipped" in out
    result = run_json(capsys, ["search", "--index", idx, caps_text[0], "-k", "5", "--json"])
    assert result["stages"] == 1 and result["rerank_k"] is None and len(result["hits"]) == 5
    want = open_gallery(idx, model=model).search(caps_text[0], k=5)
    assert [h["id"] for h in result["hits"]] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in result["hits"]], [h.score for h in want], atol=1e-6)
    assert main(["search", "--index", idx, caps_text[0], "--rerank-k", "0"]) == 0
    assert "one-stage: exact scores" in capsys.readouterr().out
    manifest = run_json(capsys, ["index", "info", idx, "--json", "--verify"])
    assert manifest["stages"] == 1 and manifest["version"] == 4 and manifest["count"] == N_PHOTOS
    photo = str(root / "photos" / "img_03.png")
    similar = run_json(capsys, ["search", "--index", idx, "--image-file", photo, "-k", "3", "--json"])
    assert similar["hits"][0]["id"] == "img_03"  # image -> image
    like = run_json(capsys, ["search", "--index", idx, "--similar-to", "img_03", "-k", "2", "--json"])
    assert [h["id"] for h in like["hits"]] == [h["id"] for h in similar["hits"][1:]]
    only = run_json(capsys, ["search", "--index", idx, caps_text[0], "--where", 'folder == "more"', "--json"])
    assert [h["id"] for h in only["hits"]] == [
        h.id for h in open_gallery(idx, model=model).search(caps_text[0], where='folder == "more"')
    ]
    assert len(only["hits"]) == 4 and all(h["metadata"]["folder"] == "more" for h in only["hits"])

    build_cap = ["index", "build", "--model", model_dir, "--kind", "caption", "--out", cap]
    assert main([*build_cap, "--features", str(root / "captions.txt")]) == 0
    by_file = run_json(capsys, ["search", "--index", cap, "--image-file", photo, "-k", "4", "--json"])
    by_id = run_json(
        capsys, ["search", "--index", cap, "--image-id", "img_03", "--image-index", idx, "-k", "4", "--json"]
    )
    assert [h["id"] for h in by_file["hits"]] == [h["id"] for h in by_id["hits"]]
    pixels = pixels_of(model, [photo])
    exact = t2i_scores(model, pixels, None, [h["caption"] for h in by_file["hits"]])[:, 0]
    np.testing.assert_allclose([h["score"] for h in by_file["hits"]], exact, atol=1e-5)

    split_args = ["--split-file", str(root / "captions.tsv"), "--images", str(root / "photos")]
    assert main([*build_cap, *split_args]) == 0
    assert "img_00#0" in open_gallery(cap).ids()
    extra = tmp_path / "extra"
    write_photos(extra, ["zz_1.png"], seed=4)
    assert main(["index", "add", "--index", idx, "--images", str(extra)]) == 0
    assert "added 1 item " in capsys.readouterr().out
    assert main(["index", "add", "--index", idx, "--images", str(extra)]) == 0
    assert "added 0 items" in capsys.readouterr().out  # a second time: skipped, said
    assert main(["index", "reindex", idx, "--faiss", "hnsw"]) == 0
    assert len(open_gallery(idx, model=model, verify=True)) == N_PHOTOS + 1
    assert main(["index", "reindex", "--index", idx, "--faiss", "flat"]) == 0  # as every index command
    assert "rebuilt the first stage" in capsys.readouterr().out
    assert main(["index", "reindex", "--index", idx, idx, "--faiss", "flat"]) == 1
    assert "give the gallery once" in capsys.readouterr().err

    # errors: one line each
    for argv, message in (
        (["index", "build", "--model", model_dir, "--features", str(root / "captions.txt"), "--out", idx], "--images"),
        (
            ["search", "--index", idx, "--image-id", "img_03", "--image-index", idx],
            "--image-id queries a caption index",
        ),
        (["search", "--index", cap, "--image-file", str(root / "photos" / "notes.txt")], "notes.txt: not an image"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cli_vse(vse, data, tmp_path, capsys):
    model_dir = str(vse.save_pretrained(tmp_path / "model"))
    idx, cap = str(tmp_path / "idx"), str(tmp_path / "cap")
    assert main(["index", "build", "--model", model_dir, "--features", str(data), "--out", idx, "--fp16"]) == 0
    out, err = capsys.readouterr()
    assert "stages     1" in out and "no effect on a one-stage gallery" in err
    result = run_json(capsys, ["search", "--index", idx, QUERY, "-k", "7", "--rerank-k", "3", "--json"])
    split = open_split(data, "test")
    exact = t2i_scores(vse, split.read_images(slice(None)), None, [QUERY])
    assert [h["index"] for h in result["hits"]] == brute_top(exact, 7)[0].tolist()
    assert (
        main(["index", "build", "--model", model_dir, "--features", str(data), "--kind", "caption", "--out", cap]) == 0
    )
    capsys.readouterr()
    hits = run_json(capsys, ["search", "--index", cap, "--image-id", split.ids[2], "--image-index", idx, "--json"])
    exact = t2i_scores(vse, split.read_images(slice(2, 3)), None, split.captions)
    np.testing.assert_allclose([h["score"] for h in hits["hits"]], np.sort(exact[:, 0])[::-1][:10], atol=1e-5)
    assert main(["search", "--index", cap, "--image-file", str(tmp_path / "model" / "config.json")]) == 1
    assert "needs a model that takes images" in capsys.readouterr().err
    code = main(["index", "add", "--index", idx, "--features", str(data), "--split", "dev", "--on-duplicate", "error"])
    assert code == 1 and "is in the gallery already" in capsys.readouterr().err
