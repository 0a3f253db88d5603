"""One-stage gallery indexes (models whose score IS the inner product of their index vectors):
exact against brute force both ways, add / reindex, damage, the two kinds kept apart, photo
folders and raw-image splits for models that take pixels, and the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _datagen import make_precomp
from _models import WORDS, randomize, tiny_gru_model
from eslmatch import VSEModel
from eslmatch.cli import main
from eslmatch.data import open_split
from eslmatch.data.files import open_image
from eslmatch.errors import EslmatchError
from eslmatch.factory import FAMILIES
from eslmatch.model.base import MatchingModel
from eslmatch.retrieval import (
    FaissOptions,
    GalleryIndex,
    GalleryIndexError,
    add_to_index,
    build_caption_index,
    build_image_index,
    rebuild_faiss,
)
from eslmatch.utils import l2n

N_IMAGES, N_QUERIES, K = 120, 50, 10
QUERY = "the red circle left of the blue square"
ONE_STAGE_FILES = {"manifest.json", "global.npy", "faiss.index", "ids.txt", "paths.txt"}


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


@pytest.fixture(scope="module")
def image_index(vse, data, tmp_path_factory):
    return build_image_index(vse, data, tmp_path_factory.mktemp("idx") / "images", progress=False)


@pytest.fixture(scope="module")
def unique_captions(data):
    return list(dict.fromkeys(open_split(data, "test").captions))  # no exact ties between gallery items


@pytest.fixture(scope="module")
def caption_index(vse, unique_captions, tmp_path_factory):
    return build_caption_index(vse, unique_captions, tmp_path_factory.mktemp("idx") / "captions", progress=False)


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
    assert {p.name for p in image_index.iterdir()} == ONE_STAGE_FILES  # no side, no lengths
    idx = GalleryIndex.open(image_index, model=vse, verify=True)
    m = idx.manifest
    assert m["version"] == 2 and m["stages"] == 1 and idx.stages == 1 and idx.one_stage
    assert m["model"]["stages"] == 1 and m["model"]["inputs"] == "regions"
    assert idx.width == 1 and idx.total_dim == vse.config.embed_size and idx.dtype == "float32"
    assert idx.side is None and idx.lengths is None and set(m["files"]) == ONE_STAGE_FILES - {"manifest.json"}
    split = open_split(data, "test")
    assert idx.ids == split.ids and idx.image_path(split.ids[3]) == split.image_paths[3]
    with torch.no_grad():
        want = vse.embed_images(torch.from_numpy(split.read_images(slice(None)))).numpy()
    np.testing.assert_allclose(idx.global_vectors, want, rtol=1e-5, atol=1e-6)
    entry = idx.lookup(split.ids[0])
    assert entry.side is None and np.array_equal(entry.global_vector, idx.global_vectors[0])
    assert "stages=1" in repr(idx)


def test_text_to_image_top10_equals_brute_force(vse, data, image_index):
    idx = GalleryIndex.open(image_index, model=vse)
    split = open_split(data, "test")
    queries = split.captions[:: len(split.captions) // N_QUERIES][:N_QUERIES]
    exact = t2i_scores(vse, split.read_images(slice(None)), None, queries)
    timings: dict[str, float] = {}
    hits = idx.search_texts(vse, queries, k=K, timings=timings)
    assert len(hits) == N_QUERIES and set(timings) == {"encode", "first_stage"}
    assert_hits_exact(hits, exact)
    # rerank_k is ignored: the first stage is exact
    for rerank_k in (0, None, 3, 1000):
        assert [h.index for h in idx.search_text(vse, queries[0], k=K, rerank_k=rerank_k)] == [h.index for h in hits[0]]
    assert len(idx.search_text(vse, QUERY, k=10_000)) == N_IMAGES  # k > N: all


def test_image_to_text_top10_equals_brute_force(vse, data, image_index, caption_index, unique_captions):
    caps = GalleryIndex.open(caption_index, model=vse)
    images = GalleryIndex.open(image_index, model=vse)
    assert caps.kind == "caption" and caps.one_stage and caps.captions == unique_captions
    split = open_split(data, "test")
    regions = split.read_images(slice(0, N_QUERIES))
    exact = t2i_scores(vse, regions, None, unique_captions).T  # (images, captions)
    by_id = caps.search_images(vse, split.ids[:N_QUERIES], k=K, image_index=images)
    assert_hits_exact(by_id, exact)
    assert by_id[0][0].caption == unique_captions[by_id[0][0].index]
    by_entry = caps.search_image(vse, images.lookup(split.ids[7]), k=K)
    by_regions = caps.search_image(vse, regions[7], k=K)
    assert [h.id for h in by_entry] == [h.id for h in by_regions] == [h.id for h in by_id[7]]
    np.testing.assert_allclose([h.score for h in by_regions], [h.score for h in by_id[7]], atol=1e-6)
    with pytest.raises(EslmatchError, match="takes region features, not image files"):
        caps.search_image(vse, Path("photo.png"))
    with pytest.raises(EslmatchError, match="needs an image index"):
        caps.search_text(vse, QUERY)


def test_ties_are_broken_by_row(vse, tmp_path):
    texts = ["a red circle", "the blue square", "a red circle", "a big green square", "a red circle"]
    caps = GalleryIndex.open(build_caption_index(vse, texts * 3, tmp_path / "c", progress=False), model=vse)
    hits = caps.search_image(vse, np.random.default_rng(0).random((6, 16), dtype=np.float32), k=caps.count)
    for a, b in zip(hits, hits[1:]):
        assert a.score > b.score or (a.score == b.score and a.index < b.index)
    assert len({h.score for h in hits}) == 3  # three distinct captions, several copies of each
    query = np.random.default_rng(0).random((6, 16), dtype=np.float32)
    for k in range(1, caps.count):  # a tie across the k-th place: the lower rows still win
        assert [h.index for h in caps.search_image(vse, query, k=k)] == [h.index for h in hits[:k]]


def test_variable_region_counts(vse, tmp_path):
    rng = np.random.default_rng(1)
    regions = rng.random((9, 5, 16), dtype=np.float32)
    lengths = np.array([5, 3, 1, 4, 5, 2, 5, 1, 3])
    np.save(tmp_path / "feats.npy", regions)
    idx = GalleryIndex.open(
        build_image_index(vse, tmp_path / "feats.npy", tmp_path / "idx", lengths=lengths, progress=False), model=vse
    )
    assert idx.ids == [str(i) for i in range(9)] and idx.paths == [None] * 9
    exact = t2i_scores(vse, regions, torch.from_numpy(lengths), [QUERY, "a small blue circle"])
    assert_hits_exact(idx.search_texts(vse, [QUERY, "a small blue circle"], k=9), exact, k=9)


# ---------------------------------------------------------------------- add and reindex
def test_add_images_and_captions(vse, data, image_index, caption_index, unique_captions, tmp_path):
    target = tmp_path / "grow"
    shutil.copytree(image_index, target)
    new = np.random.default_rng(5).random((4, 8, 16), dtype=np.float32) * 2  # more regions: nothing to widen
    add_to_index(target, vse, new, ids=["n-a", "n-b", "n-c", "n-d"], paths=["a.png", "b.png", "c.png", "d.png"])
    idx = GalleryIndex.open(target, model=vse, verify=True)
    assert idx.count == N_IMAGES + 4 and idx.ids[-4:] == ["n-a", "n-b", "n-c", "n-d"] and idx.width == 1
    assert {p.name for p in target.iterdir()} == ONE_STAGE_FILES
    assert idx.manifest["faiss"]["trained_on"] == N_IMAGES and len(idx.manifest["sources"]) == 2
    old = open_split(data, "test").read_images(slice(None))
    texts = [QUERY, "a big green square", "the small blue circle above the red square"]
    exact = np.concatenate([t2i_scores(vse, old, None, texts), t2i_scores(vse, new, None, texts)], axis=1)
    assert_hits_exact(idx.search_texts(vse, texts, k=idx.count), exact, k=idx.count)
    assert idx.image_path("n-b") == "b.png"
    with pytest.raises(EslmatchError, match="duplicate id 'n-a'"):
        add_to_index(target, vse, new[:1], ids=["n-a"], progress=False)

    caps_dir = tmp_path / "caps"
    shutil.copytree(caption_index, caps_dir)
    add_to_index(caps_dir, vse, ["a green circle above a big red square"], progress=False)
    caps = GalleryIndex.open(caps_dir, model=vse, verify=True)
    assert caps.count == len(unique_captions) + 1 and caps.ids[-1] == str(len(unique_captions))
    hits = caps.search_image(vse, old[0], k=caps.count)
    exact = t2i_scores(vse, old[:1], None, [*unique_captions, "a green circle above a big red square"]).T
    assert_hits_exact([hits], exact, k=caps.count)


def test_reindex_keeps_the_vectors(vse, image_index, tmp_path):
    flat = GalleryIndex.open(image_index, model=vse)
    want = flat.search_texts(vse, [QUERY, "a big green square"], k=K)
    ivf = rebuild_faiss(image_index, "ivf", FaissOptions(nlist=4, nprobe=4), out=tmp_path / "ivf")  # all lists: exact
    hnsw = rebuild_faiss(image_index, "hnsw", out=tmp_path / "hnsw")
    for path, kind in ((ivf, "ivf"), (hnsw, "hnsw")):
        assert {p.name for p in path.iterdir()} == ONE_STAGE_FILES
        idx = GalleryIndex.open(path, model=vse, verify=True)
        assert idx.faiss_kind == kind and idx.one_stage
        got = idx.search_texts(vse, [QUERY, "a big green square"], k=K)
        assert [[h.id for h in r] for r in got] == [[h.id for h in r] for r in want]
    back = rebuild_faiss(tmp_path / "hnsw", "flat")  # in place
    assert GalleryIndex.open(back, model=vse, verify=True).faiss_kind == "flat"


# ---------------------------------------------------------------------- damage, mismatches
@pytest.fixture()
def damaged(image_index, tmp_path):
    target = tmp_path / "damaged"
    shutil.copytree(image_index, target)
    return target


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_one_stage_index_refused(damaged):
    data = bytearray((damaged / "global.npy").read_bytes())
    data[-5] ^= 0xFF
    (damaged / "global.npy").write_bytes(bytes(data))
    GalleryIndex.open(damaged)  # sizes only: not detected
    with pytest.raises(GalleryIndexError, match="global.npy: sha256 differs"):
        GalleryIndex.open(damaged, verify=True)
    (damaged / "global.npy").write_bytes(bytes(data[:-100]))
    with pytest.raises(GalleryIndexError, match="global.npy: .* bytes, the manifest records"):
        GalleryIndex.open(damaged)
    (damaged / "global.npy").unlink()
    with pytest.raises(GalleryIndexError, match="global.npy: missing"):
        GalleryIndex.open(damaged)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(stages=3), "'stages' must be 1 or 2"),
        (lambda m: m.pop("stages"), "'stages' must be 1 or 2"),
        (lambda m: m.update(version=99), "version 99 is not supported"),
        (lambda m: m.update(version=1), "no size/checksum recorded for side.npy"),  # posing as two-stage
        (lambda m: m.update(stages=2), "no size/checksum recorded for side.npy"),
        (lambda m: m.update(width=4), "one-stage index has width 1"),
        (lambda m: m.update(total_dim=7), "shape"),
        (lambda m: m.update(count=3), "lines, the index holds 3"),
        (lambda m: m["files"].pop("global.npy"), "no size/checksum recorded for global.npy"),
    ],
)
def test_edited_one_stage_manifest_refused(damaged, edit, message):
    edit_manifest(damaged, edit)
    with pytest.raises(GalleryIndexError, match=message):
        GalleryIndex.open(damaged)


def test_one_stage_and_two_stage_kept_apart(vse, data, image_index, tmp_path):
    esl = tiny_gru_model(seed=5).eval()
    one = GalleryIndex.open(image_index)
    with pytest.raises(GalleryIndexError, match="built by a single-vector model"):
        one.check_model(esl)
    with pytest.raises(EslmatchError, match="needs a two-stage index of an ESL model; this index is one-stage"):
        one.attention(esl, "a red circle", one.ids[0])
    with pytest.raises(EslmatchError, match="re-ranking needs a two-stage"):
        one._esl_scores(esl, None, np.array([0]))
    two = GalleryIndex.open(build_image_index(esl, data, tmp_path / "esl", progress=False))
    assert two.stages == 2 and not two.one_stage and two.side is not None
    assert "stages" not in two.manifest and two.manifest["version"] == 1  # two-stage format unchanged
    with pytest.raises(GalleryIndexError, match="built by an ESL model"):
        two.search_text(vse, QUERY)
    other = VSEModel(vse.config, tokenizer=vse.tokenizer)
    randomize(other)
    with torch.no_grad():
        other.image_encoder.fc.weight.add_(0.5)
    with pytest.raises(GalleryIndexError, match="fingerprint mismatch"):
        GalleryIndex.open(image_index, model=other.eval())


def test_index_of_an_earlier_version_still_reads(vse, image_index, tmp_path):
    """eslmatch before format 2 wrote one-stage indexes as version 1 with a side of one vector."""
    legacy = tmp_path / "legacy"
    shutil.copytree(image_index, legacy)
    vectors = np.load(legacy / "global.npy")
    np.save(legacy / "side.npy", vectors[:, None, :])
    np.save(legacy / "lengths.npy", np.ones(len(vectors), dtype=np.int64))

    def to_v1(m):
        m.update(version=1, width=1)
        m.pop("stages")
        for name in ("side.npy", "lengths.npy"):
            m["files"][name] = {"bytes": (legacy / name).stat().st_size, "sha256": "0" * 64}

    edit_manifest(legacy, to_v1)
    idx = GalleryIndex.open(legacy, model=vse)
    assert idx.one_stage and idx.side is not None
    want = GalleryIndex.open(image_index, model=vse).search_text(vse, QUERY, k=K)
    assert [h.id for h in idx.search_text(vse, QUERY, k=K)] == [h.id for h in want]
    with pytest.raises(EslmatchError, match="two-stage"):
        idx.attention(vse, QUERY, idx.ids[0])
    edit_manifest(
        legacy, lambda m: m["files"].update({n: {**m["files"][n], "sha256": _sha(legacy / n)} for n in m["files"]})
    )
    add_to_index(legacy, vse, np.random.default_rng(0).random((2, 6, 16), dtype=np.float32), progress=False)
    grown = GalleryIndex.open(legacy, model=vse, verify=True)  # written anew in the current layout
    assert grown.manifest["version"] == 2 and grown.count == N_IMAGES + 2
    assert {p.name for p in legacy.iterdir()} == ONE_STAGE_FILES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- a model that takes pixels
TOY_WORDS = ["<pad>", "<unk>", *WORDS, "is"]


@dataclass
class ToyConfig:
    model_type: str = "toy-pixels"
    embed_size: int = 12
    image_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ToyConfig:
        return cls(**{k: data[k] for k in ("embed_size", "image_size") if k in data})


class ToyPixelModel(MatchingModel):
    """A stand-in for ESL-CLIP: 16x16 pixels -> linear image tower; bag of words -> text tower."""

    family = "toy-pixels"
    config_class = ToyConfig
    exact_index = True

    def __init__(self, config: ToyConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or ToyConfig()
        s, e = self.config.image_size, self.config.embed_size
        g = torch.Generator().manual_seed(seed)
        self.image_tower = nn.Linear(3 * s * s, e)
        self.word_vectors = nn.Embedding(len(TOY_WORDS), e, padding_idx=0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.word_vectors.weight[0] = 0
        self.tokenizer = None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        s = self.config.image_size
        pixels = np.asarray(image.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def tokenize(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[TOY_WORDS.index(w) if w in TOY_WORDS else 1 for w in t.lower().split()] or [1] for t in texts]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) for r in rows])

    def parts(self) -> dict[str, nn.Module]:
        return {"image_tower": self.image_tower, "word_vectors": self.word_vectors}

    def embed_images(self, images, image_lengths=None):
        return l2n(self.image_tower(images.to(self.device).flatten(1)))

    def embed_captions(self, captions, caption_lengths):
        summed = self.word_vectors(captions.to(self.device)).sum(1)
        return l2n(summed / torch.as_tensor(caption_lengths, device=self.device)[:, None].float())

    def score(self, image_emb, image_lengths, caption_emb, caption_lengths, options=None):
        return image_emb @ caption_emb.t()

    def index_vectors_images(self, image_emb, image_lengths=None):
        return image_emb

    def index_vectors_captions(self, caption_emb, caption_lengths):
        return caption_emb

    @classmethod
    def build_for_loading(cls, config, directory):
        return cls(config)


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


def test_photo_folder_index_is_exact_and_skips_bad_files(photos, tmp_path, capsys):
    root, model, captions = photos
    out = build_image_index(model, root / "photos", tmp_path / "img", progress=False, batch_size=5)
    err = capsys.readouterr().err
    assert "skipping broken.png" in err and "skipping notes.txt: not an image" in err and ".hidden" not in err
    idx = GalleryIndex.open(out, model=model, verify=True)
    assert {p.name for p in out.iterdir()} == ONE_STAGE_FILES
    assert idx.count == N_PHOTOS and idx.one_stage and idx.manifest["model"]["inputs"] == "pixels"
    assert idx.ids[:2] == ["img_00", "img_01"] and idx.ids[-1] == "more/pic_3"
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in idx.paths)
    source = idx.manifest["sources"][0]
    assert source["count"] == N_PHOTOS and source["skipped"] == 2
    assert {f["file"] for f in source["skipped_files"]} == {"broken.png", "notes.txt"}
    queries = captions[:N_QUERIES]
    pixels = pixels_of(model, idx.paths)
    assert_hits_exact(idx.search_texts(model, queries, k=K), t2i_scores(model, pixels, None, queries))

    caps = GalleryIndex.open(build_caption_index(model, root / "captions.txt", tmp_path / "cap", progress=False))
    exact = t2i_scores(model, pixels, None, captions).T  # (images, captions)
    assert_hits_exact(caps.search_images(model, idx.ids, k=K, image_index=idx), exact)
    photo = Path(idx.paths[5])
    by_file = caps.search_image(model, photo, k=K)
    by_pil = caps.search_image(model, Image.open(photo), k=K)
    by_pixels = caps.search_image(model, model.preprocess(open_image(photo)), k=K)
    assert_hits_exact([by_file, by_pil, by_pixels], exact[[5, 5, 5]])
    with pytest.raises(EslmatchError, match="broken.png: not an image|broken.png: unreadable"):
        caps.search_image(model, root / "photos" / "broken.png")
    with pytest.raises(EslmatchError, match="this model takes images"):
        build_image_index(model, np.zeros((2, 3, 16), dtype=np.float32), tmp_path / "x", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("no photo here")
    with pytest.raises(EslmatchError, match=r"no readable image among the 1 files \(first: notes.txt: not an image"):
        build_image_index(model, junk, out, progress=False)  # fails: the existing index stays
    assert GalleryIndex.open(out, model=model, verify=True).count == N_PHOTOS
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".img.")]  # no litter


def test_raw_image_splits_and_adding_photos(photos, tmp_path, capsys):
    root, model, captions = photos
    tsv = root / "captions.tsv"
    out = build_image_index(model, tsv, tmp_path / "split", images_dir=root / "photos", progress=False)
    assert "skipping" in capsys.readouterr().err and "broken.png" in (out / "manifest.json").read_text()
    idx = GalleryIndex.open(out, model=model, verify=True)
    assert idx.ids == [f"img_{i:02d}" for i in range(6)]
    assert idx.manifest["sources"][0]["split_file"] == str(tsv.resolve())
    caps = GalleryIndex.open(build_caption_index(model, tsv, tmp_path / "cap", images_dir=root / "photos"))
    assert "img_00#0" in caps.ids and caps.image_path("img_03#2") == idx.image_path("img_03")
    assert caps.count == 7 * 5  # captions need no readable image: broken.png's are indexed too
    with pytest.raises(EslmatchError, match="needs the folder of its images"):
        build_caption_index(model, tsv, tmp_path / "cap2")
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
    kp = GalleryIndex.open(
        build_image_index(model, root / "karpathy.json", tmp_path / "kp", images_dir=root / "photos", progress=False)
    )
    assert kp.count == 5 and kp.manifest["sources"][0]["skipped_files"][0]["file"] == "gone.png"
    assert "skipping gone.png: missing" in capsys.readouterr().err

    extra = tmp_path / "extra"
    write_photos(extra, ["new_a.png", "new_b.png"], seed=9)
    (extra / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    add_to_index(out, model, extra, progress=False)
    assert "bad.jpg" in capsys.readouterr().err
    grown = GalleryIndex.open(out, model=model, verify=True)
    assert grown.ids[-2:] == ["new_a", "new_b"] and grown.count == 8
    pixels = pixels_of(model, grown.paths)
    assert_hits_exact(grown.search_texts(model, captions[:5], k=8), t2i_scores(model, pixels, None, captions[:5]), k=8)
    with pytest.raises(EslmatchError, match="duplicate id 'new_a'"):
        add_to_index(out, model, extra, progress=False)


# ---------------------------------------------------------------------- command line
@pytest.fixture()
def toy_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy-pixels", ToyPixelModel)


def run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_photos(photos, tmp_path, capsys, toy_family):
    root, model, captions = photos
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    idx, cap = str(tmp_path / "idx"), str(tmp_path / "cap")
    assert main(["index", "build", "--model", model_dir, "--images", str(root / "photos"), "--out", idx]) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in err and "notes.txt" in err
    assert "stages     1" in out and f"{N_PHOTOS} items" in out and "2 unreadable files skipped" in out
    result = run_json(capsys, ["search", "--index", idx, captions[0], "-k", "5", "--json"])
    assert result["stages"] == 1 and result["rerank_k"] is None and len(result["hits"]) == 5
    want = GalleryIndex.open(idx, model=model).search_text(model, captions[0], k=5)
    assert [h["id"] for h in result["hits"]] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in result["hits"]], [h.score for h in want], atol=1e-6)
    assert main(["search", "--index", idx, captions[0], "--rerank-k", "0"]) == 0
    assert "one-stage: exact scores" in capsys.readouterr().out
    manifest = run_json(capsys, ["index", "info", idx, "--json", "--verify"])
    assert manifest["stages"] == 1 and manifest["version"] == 2

    build_cap = ["index", "build", "--model", model_dir, "--kind", "caption", "--out", cap]
    assert main([*build_cap, "--features", str(root / "captions.txt")]) == 0
    photo = str(root / "photos" / "img_03.png")
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
    assert "img_00#0" in (tmp_path / "cap" / "ids.txt").read_text()
    extra = tmp_path / "extra"
    write_photos(extra, ["zz_1.png"], seed=4)
    assert main(["index", "add", "--index", idx, "--images", str(extra)]) == 0
    assert "added 1 items" in capsys.readouterr().out
    assert main(["index", "reindex", idx, "--faiss", "hnsw"]) == 0
    assert GalleryIndex.open(idx, model=model, verify=True).count == N_PHOTOS + 1

    # errors: one line each
    for argv, message in (
        (["index", "build", "--model", model_dir, "--features", str(root / "captions.txt"), "--out", idx], "--images"),
        (["search", "--index", idx, "--image-file", photo], "image queries need a caption index"),
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
    assert "stages     1" in out and "--fp16 has no effect" in err
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
    assert main(["search", "--index", cap, "--image-file", "x.png"]) == 1
    assert "needs a model that takes images" in capsys.readouterr().err
    assert main(["index", "add", "--index", idx, "--features", str(data), "--split", "dev"]) == 1  # ids repeat
    assert "duplicate id" in capsys.readouterr().err
