"""``eslmatch embed``: index vectors of captions, region features and photos to .npy / .parquet,
equal to the model's own ``index_vectors_*(embed_*(...))``; killed mid-run, a rerun computes
only the missing chunks; bad input is one line before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _models import TINY_CLIP, WORDS, randomize, tiny_gru_model
from eslmatch.extract.embed import caption_items, embed_to_file, feature_items, photo_items, read_embeddings
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from eslmatch.retrieval.policy import item_record

_SCRIPT = Path(sys.executable).with_name("eslmatch")
ESLMATCH = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "eslmatch.cli"]
pa = pytest.importorskip("pyarrow")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ESLMATCH, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def esl(tmp_path_factory):
    model = tiny_gru_model(img_dim=16).eval()
    folder = tmp_path_factory.mktemp("m") / "esl"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory) -> Path:
    g = np.random.default_rng(0)
    lines = [f"cap{i}\t{' '.join(g.choice(WORDS, size=g.integers(2, 8)))}" for i in range(23)]
    lines.insert(5, "")  # blank lines are left out
    path = tmp_path_factory.mktemp("caps") / "captions.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def direct_caption_vectors(model, path: Path) -> np.ndarray:
    texts = [line.split("\t", 1)[1] for line in path.read_text().splitlines() if line.strip()]
    ids, lens = model.tokenize(texts)
    with torch.no_grad():
        return model.index_vectors_captions(model.embed_captions(ids, lens), lens).numpy()


def write_precomp(folder: Path, x: torch.Tensor, captions: bool = False) -> Path:
    """A precomp ``test`` split of the region features ``x (N, R, D)``, ids ``img0..``; with
    ``captions`` five per image too (what ``index build`` reads)."""
    folder.mkdir()
    np.save(folder / "test_ims.npy", x.numpy())
    (folder / "test_ids.txt").write_text("".join(f"img{i}\n" for i in range(len(x))))
    if captions:
        (folder / "test_caps.txt").write_text("a red circle\n" * (5 * len(x)))
    return folder


def tiny_clip_model() -> ESLClipModel:
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(strategy="heuristic", num_levels=2, clip=TINY_CLIP))
    randomize(model)
    return model.eval()


def write_photos(folder: Path, names: list[str]) -> Path:
    """skimage's photographs ``names`` as PNGs in ``folder``."""
    skdata = pytest.importorskip("skimage.data")
    folder.mkdir()
    for n in names:
        Image.fromarray(getattr(skdata, n)()).save(folder / f"{n}.png")
    return folder


def test_captions_to_npy_and_parquet(esl, captions_file, tmp_path):
    model, folder = esl
    want = direct_caption_vectors(model, captions_file)
    for name in ("vecs.npy", "vecs.parquet"):
        run = cli("embed", "--model", str(folder), "--captions", str(captions_file), "--out", str(tmp_path / name),
                  "--precision", "fp32", "--batch-size", "4", "--chunk", "10", "--no-progress")  # fmt: skip
        assert run.returncode == 0, run.stderr
        ids, vectors = read_embeddings(tmp_path / name)
        assert ids == [f"cap{i}" for i in range(23)]
        assert vectors.dtype == np.float32 and vectors.shape == want.shape == (23, model.config.total_dim)
        np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-6)
        assert not (tmp_path / f".{name}.partial").exists()
    meta = json.loads((tmp_path / "vecs.meta.json").read_text())
    assert (meta["precision"], meta["kind"], meta["count"]) == ("fp32", "captions", 23)
    table = pa.parquet.read_table(tmp_path / "vecs.parquet")
    assert (
        table.column_names == ["id", "vector"]
        and json.loads(table.schema.metadata[b"eslmatch"])["dim"] == want.shape[1]
    )


def test_region_features_equal_the_model(esl, tmp_path):
    model, _ = esl
    x = torch.relu(torch.randn(9, 6, 16, generator=torch.Generator().manual_seed(3)))
    data = write_precomp(tmp_path / "precomp", x)
    summary = embed_to_file(
        model, feature_items(model, data), tmp_path / "ims.npy", chunk=4, batch_size=3, progress=False
    )
    with torch.no_grad():
        want = model.index_vectors_images(model.embed_images(x)).numpy()
    ids, got = read_embeddings(tmp_path / "ims.npy")
    assert ids == [f"img{i}" for i in range(9)] and summary["count"] == 9
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_photos_with_a_pixel_model_skip_bad_files(tmp_path):
    model = tiny_clip_model()
    names = ["astronaut", "chelsea", "coffee"]
    photos = write_photos(tmp_path / "photos", names)
    (photos / "notes.txt").write_text("not an image")
    source = photo_items(model, photos)
    summary = embed_to_file(model, source, tmp_path / "p.parquet", batch_size=2, progress=False)
    assert [s[0] for s in summary["skipped"]] == ["notes.txt"]
    ids, got = read_embeddings(tmp_path / "p.parquet")
    assert ids == ["astronaut", "chelsea", "coffee"]
    from eslmatch.data.files import open_image

    pixels = torch.stack([model.preprocess(open_image(photos / f"{n}.png")) for n in names])
    with torch.no_grad():
        want = model.index_vectors_images(model.embed_images(pixels)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="take region features, not photos"):
        photo_items(tiny_gru_model(img_dim=16), photos)


def test_bf16_embeddings_close_to_fp32(esl, captions_file, tmp_path):
    model, _ = esl
    ref = embed_to_file(model, caption_items(model, captions_file), tmp_path / "a.npy", progress=False)
    low = embed_to_file(
        model, caption_items(model, captions_file), tmp_path / "b.npy", precision="bf16", progress=False
    )
    assert (ref["precision"], low["precision"]) == ("fp32", "bf16")
    a, b = read_embeddings(tmp_path / "a.npy")[1], read_embeddings(tmp_path / "b.npy")[1]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"bf16 caption vectors (GRU model): min cosine to fp32 {cos.min():.5f}")
    assert cos.min() > 0.99


def test_killed_then_rerun_resumes(esl, captions_file, tmp_path):
    """A run stopped hard (no cleanup) after 2 of its 5 chunks; the rerun computes 3."""
    model, folder = esl
    out = tmp_path / "v.npy"
    args = ["embed", "--model", str(folder), "--captions", str(captions_file), "--out", str(out),
            "--precision", "fp32", "--chunk", "5", "--no-progress"]  # fmt: skip
    killed = cli(*args, env={"ESLMATCH_TEST_STOP_AFTER_CHUNKS": "2"})
    assert killed.returncode == 75, killed.stderr
    partial = tmp_path / ".v.npy.partial"
    assert sorted(p.name for p in partial.glob("chunk_*.npy")) == ["chunk_00000.npy", "chunk_00001.npy"]
    assert not out.exists()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 of 5 chunks" in again.stderr
    assert "2 chunks reused, 13 items computed now" in again.stdout
    np.testing.assert_allclose(
        read_embeddings(out)[1], direct_caption_vectors(model, captions_file), rtol=1e-5, atol=1e-6
    )
    assert not partial.exists()
    # another precision never reuses fp32 chunks
    bf16 = [("bf16" if a == "fp32" else a) for a in args]
    assert cli(*bf16, env={"ESLMATCH_TEST_STOP_AFTER_CHUNKS": "1"}).returncode == 75
    other = cli(*args)
    assert other.returncode == 0 and "starting over" in other.stderr and "resumed" not in other.stdout


@pytest.mark.slow
def test_vectors_equal_the_gallery_index(esl, tmp_path):
    """What ``embed`` writes is what ``index build`` stores: same ids, same vectors (region
    features of a two-stage ESL model, and photos of a one-stage ESL-CLIP model)."""
    from eslmatch import open_gallery

    _, folder = esl
    x = torch.relu(torch.randn(7, 6, 16, generator=torch.Generator().manual_seed(5)))
    data = write_precomp(tmp_path / "precomp", x, captions=True)
    photos = write_photos(tmp_path / "photos", ["astronaut", "chelsea", "coffee", "rocket"])
    clip_dir = tmp_path / "clip"
    tiny_clip_model().save_pretrained(clip_dir)
    for name, model_dir, source, count in (
        ("regions", folder, ["--features", str(data)], 7),
        ("photos", clip_dir, ["--images", str(photos)], 4),
    ):
        index, out = tmp_path / f"{name}-index", tmp_path / f"{name}.parquet"
        common = ["--model", str(model_dir), *source, "--precision", "fp32"]
        built = cli("index", "build", *common, "--out", str(index))
        assert built.returncode == 0, built.stderr
        run = cli("embed", *common, "--out", str(out), "--no-progress")
        assert run.returncode == 0, run.stderr
        ids, got = read_embeddings(out)
        gallery = open_gallery(index)
        try:
            assert sorted(ids) == sorted(gallery.ids()) and len(ids) == count
            stored = gallery.store.vectors([item_record(gallery.store, i).row for i in ids])
        finally:
            gallery.close()
        np.testing.assert_allclose(got, stored, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--captions", "{caps}", "--out", "{tmp}/x.csv"], "must end in .npy or .parquet"),
        (["--captions", "{tmp}/missing.txt", "--out", "{tmp}/x.npy"], "missing.txt: no such file or folder"),
        (["--captions", "{caps}", "--out", "{tmp}/x.npy", "--batch-size", "0"], "--batch-size 0: must be a positive"),
        (["--images", "{tmp}", "--out", "{tmp}/x.npy"], "take region features, not photos"),
        (["--captions", "{caps}", "--out", "{tmp}/x.npy", "--model-missing"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line(esl, captions_file, tmp_path, args, message):
    _, folder = esl
    filled = [a.format(caps=captions_file, tmp=tmp_path) for a in args]
    run = cli("embed", "--model", str(folder), *filled)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    if "unrecognized" not in message:
        assert len(run.stderr.strip().splitlines()) == 1


def test_bad_caption_names_its_line(esl, tmp_path):
    _, folder = esl
    caps = tmp_path / "c.txt"
    caps.write_text("id1\ta red circle\n   \nid7\t!!!\n")
    run = cli("embed", "--model", str(folder), "--captions", str(caps), "--out", str(tmp_path / "o.npy"))
    assert run.returncode == 1 and "c.txt: line 3" in run.stderr and "Traceback" not in run.stderr, run.stderr
