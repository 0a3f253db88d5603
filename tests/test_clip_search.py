"""Exact one-stage search with ESL-CLIP over a folder of 2,000 rendered photos: the index's top
10 equals the brute-force ranking by ``model.similarity`` (text -> image and image -> text),
through the library and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _models import TINY_CLIP
from eslmatch.cli import main
from eslmatch.data.files import open_image
from eslmatch.demo.scenes import generate_split, write_split
from eslmatch.factory import load_pretrained
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from eslmatch.retrieval import BuildOptions, build_gallery

N_IMAGES, N_QUERIES, K = 2000, 50, 10


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    spec = generate_split(N_IMAGES, 11, name="test")
    write_split(spec, root / "photos", root / "captions.tsv", size=32)
    (root / "photos" / "notes.txt").write_text("not a photo")
    (root / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(strategy="adaptive", num_levels=2, clip=TINY_CLIP)).eval()
    model.save_pretrained(root / "model")
    captions = [c.text for caps in spec.captions for c in caps]
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return root, model, captions


def brute_force_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Best first, ties by row (the index's rule)."""
    return np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])


def test_text_to_image_and_image_to_text_are_exact(tmp_path, gallery, capsys, caplog):
    root, model, captions = gallery
    index = build_gallery(model, root / "photos", tmp_path / "img", options=BuildOptions(progress=False))
    captured = caplog.text  # logged as warnings
    assert "skipping" in captured and "notes.txt" in captured and "broken.png" in captured  # skipped and named
    assert len(index) == N_IMAGES and index.store.manifest["model"]["stages"] == 1
    recs = {r.row: r for r in index.store.select(rows=range(N_IMAGES))}
    pixels = torch.stack([model.preprocess(open_image(recs[i].path)) for i in range(N_IMAGES)])
    queries = captions[:: len(captions) // N_QUERIES][:N_QUERIES]
    ids, lens = model.tokenize(queries)
    with torch.no_grad():
        exact = model.similarity(pixels, None, ids, lens).t().double().numpy()  # (queries, images)
    top = brute_force_top(exact, K)
    hits = index.search_texts(queries, k=K)
    for q, row in enumerate(hits):
        assert [h.index for h in row] == top[q].tolist()
        assert np.allclose([h.score for h in row], exact[q, top[q]], rtol=1e-5, atol=1e-7)
    # image -> text on a caption index, queried by the image's stored vector
    opts = BuildOptions(progress=False)
    cap_index = build_gallery(model, root / "captions.txt", tmp_path / "cap", options=opts, kind="caption")
    cap_ids, cap_lens = model.tokenize(captions)
    with torch.no_grad():
        img_emb = model.embed_images(pixels[:N_QUERIES])
        cap_emb = torch.cat(
            [model.embed_captions(cap_ids[i : i + 2000], cap_lens[i : i + 2000]) for i in range(0, len(captions), 2000)]
        )
        i2t = model.score(img_emb, None, cap_emb, cap_lens).double().numpy()
    top = brute_force_top(i2t, K)
    for i in range(N_QUERIES):
        row = cap_index.searcher.images([index.searcher.stored(recs[i].id)], k=K)[0]
        assert [h.index for h in row] == top[i].tolist()
        assert np.allclose([h.score for h in row], i2t[i, top[i]], rtol=1e-5, atol=1e-7)


def test_command_line_search_of_photos(tmp_path, gallery, capsys):
    root, model, _ = gallery
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(root / "model"),
                "--images",
                str(root / "photos"),
                "--out",
                str(tmp_path / "idx"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["search", "--index", str(tmp_path / "idx"), "a red circle left of a blue square", "-k", "3", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and all(h["path"].endswith(".png") for h in result["hits"])
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(root / "model"),
                "--kind",
                "caption",
                "--features",
                str(root / "captions.txt"),
                "--out",
                str(tmp_path / "cap"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    photo = sorted((root / "photos").glob("test_*.png"))[0]
    assert main(["search", "--index", str(tmp_path / "cap"), "--image-file", str(photo), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    reloaded = load_pretrained(root / "model")
    with torch.no_grad():
        cap_ids, cap_lens = reloaded.tokenize([h["caption"] for h in hits])
        s = reloaded.similarity(reloaded.preprocess(open_image(photo))[None], None, cap_ids, cap_lens)[0]
    assert np.allclose([h["score"] for h in hits], s.numpy(), rtol=1e-5, atol=1e-7)


def test_serve_shows_photos_from_a_one_stage_index(tmp_path, gallery):
    from eslmatch.serve import load_app
    from test_serve import local_client

    root, model, _ = gallery
    opts = BuildOptions(progress=False)
    build_gallery(model, root / "photos", tmp_path / "idx", options=opts, model_path=root / "model").close()
    client = local_client(load_app(tmp_path / "idx"))
    r = client.post("/search", json={"text": "two green squares", "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5 and all(x["image_url"] for x in results)
    img = client.get(results[0]["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    r = client.get("/attention", params={"text": "a circle", "id": results[0]["id"]})
    assert r.status_code == 422 and "one vector per image" in r.json()["error"]
    info = client.get("/info").json()
    assert info["stages"] == 1 and info["takes_images"] and not info["writable"]  # the page shows pictures
