"""ESL-CLIP through the command line: eval from raw images, and bad inputs as one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from _models import TINY_CLIP
from eslmatch.cli import main
from eslmatch.demo.scenes import generate_split, write_split
from eslmatch.evaluate import recall_metrics
from eslmatch.factory import load_pretrained
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from released_clip_forward import random_release


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A Karpathy-split JSON over 10 rendered test scenes, and a tiny ESL-CLIP model folder."""
    root = tmp_path_factory.mktemp("clipdata")
    spec = generate_split(10, 3, name="test")
    files = write_split(spec, root / "images", root / "test_captions.txt", size=40)
    images = [
        {"filename": name, "split": "test", "sentences": [{"raw": c.text} for c in caps]}
        for name, caps in zip(files.image_names, spec.captions)
    ]
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP))
    model.save_pretrained(root / "model")
    return root


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_from_raw_images_encodes_once_and_matches_similarity(capsys, data):
    code, out, err = run(
        capsys,
        "eval",
        "--checkpoint",
        str(data / "model"),
        "--data",
        str(data / "dataset.json"),
        "--image-root",
        str(data / "images"),
        "--protocol",
        "f30k",
        "--json",
        "--save-scores",
        str(data / "sims.npy"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["n_images"] == 10 and result["n_captions"] == 50
    model = load_pretrained(data / "model")
    from eslmatch.data.files import open_image
    from eslmatch.data.raw import open_karpathy

    split = open_karpathy(data / "dataset.json", data / "images", "test")
    pixels = torch.stack([model.preprocess(open_image(p)) for p in split.image_paths])
    ids, lens = model.tokenize(split.captions)
    with torch.no_grad():
        expect = model.similarity(pixels, None, ids, lens).numpy()
    sims = np.load(data / "sims.npy")
    assert np.abs(sims - expect).max() <= 1e-5 * np.abs(expect).max()
    assert result["rsum"] == pytest.approx(recall_metrics(expect)["rsum"])


def assert_one_line(code, err, pattern):
    import re

    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_bad_inputs_are_one_clear_line(capsys, data, tmp_path):
    base = ["eval", "--checkpoint", str(data / "model"), "--protocol", "f30k", "--image-root", str(data / "images")]
    # a Karpathy JSON naming a file that is not there
    doc = json.loads((data / "dataset.json").read_text())
    doc["images"][3]["filename"] = "gone.png"
    (tmp_path / "missing.json").write_text(json.dumps(doc))
    assert_one_line(*run(capsys, *base, "--data", str(tmp_path / "missing.json"))[::2], "missing: gone.png")
    # a non-image file and a truncated image among the images
    images = tmp_path / "images"
    images.mkdir()
    for p in (data / "images").iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).write_text("not an image at all")
    base_bad = [*base[:-1], str(images), "--data", str(data / "dataset.json")]
    assert_one_line(*run(capsys, *base_bad)[::2], f"{names[0]}: not an image")
    (images / names[0]).write_bytes((data / "images" / names[0]).read_bytes()[:300])  # truncated PNG
    assert_one_line(*run(capsys, *base_bad)[::2], f"{names[0]}: unreadable image")
    from PIL import Image

    jpeg = tmp_path / "photo.jpg"
    Image.open(data / "images" / names[0]).convert("RGB").save(jpeg, format="JPEG")
    (images / names[0]).write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # truncated JPEG
    assert_one_line(*run(capsys, *base_bad)[::2], f"{names[0]}: unreadable image.*(?i:truncated)")
    # a checkpoint of the other family
    from _models import make_released_checkpoint

    make_released_checkpoint(tmp_path / "esl.pth.tar", "adaptive", embed_size=32, num_levels=2)
    assert main(["convert", str(tmp_path / "esl.pth.tar"), str(tmp_path / "esl")]) == 0
    capsys.readouterr()
    code, _, err = run(
        capsys,
        "eval",
        "--checkpoint",
        str(tmp_path / "esl"),
        "--protocol",
        "f30k",
        "--data",
        str(data / "dataset.json"),
        "--image-root",
        str(data / "images"),
    )
    assert_one_line(code, err, "scores region features, not images")
    with pytest.raises(Exception, match="'esl' model, not 'esl-clip'"):
        ESLClipModel.from_pretrained(tmp_path / "esl")
    torch.save(random_release("heuristic", embed=64, levels=3), tmp_path / "clip.pth")
    code, _, err = run(capsys, "info", str(tmp_path / "clip.pth"))
    assert code == 0, err
    # a wrong image size in the configuration
    cfg = {
        "data_path": str(data / "dataset.json"),
        "image_root": str(data / "images"),
        "output_dir": str(tmp_path / "r"),
        "model": {"model_type": "esl-clip", "num_levels": 2, "clip": {**TINY_CLIP, "image_size": 40}},
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert_one_line(
        *run(capsys, "train", "--config", str(tmp_path / "bad.yaml"))[::2],
        "image_size 40 must be a multiple of patch_size 16",
    )
    assert not (tmp_path / "r").exists()
