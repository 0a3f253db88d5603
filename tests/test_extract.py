"""``eslmatch extract``: region features from real photographs, skipping, captions, resume, boxes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _wait import HUNG
from eslmatch.errors import EslmatchError, InputError
from eslmatch.extract import (
    BackboneOptions,
    BoxPoolingBackbone,
    EfficientNetLite0,
    JsonBoxes,
    build_backbone,
    caption_lookup,
    extract_folder,
    fit_captions,
    list_images,
    open_image,
    parse_captions,
    roi_pool,
)

skdata = pytest.importorskip("skimage.data")

_SCRIPT = Path(sys.executable).with_name("eslmatch")
ESLMATCH = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "eslmatch.cli"]
PHOTOS = {"astronaut": "png", "camera": "png", "chelsea": "png", "coffee": "jpg", "rocket": "jpg"}
CAT_CLASSES = range(281, 286)  # ImageNet tabby .. Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def save_photo(name: str, folder: Path, ext: str | None = None) -> Path:
    ext = ext or PHOTOS[name]
    path = folder / f"{name}.{ext}"
    Image.fromarray(getattr(skdata, name)()).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = path.parent / "_full.jpg"
    Image.fromarray(skdata.coffee()).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        save_photo(name, folder)
    return folder


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return EfficientNetLite0(image_size=224, device="cpu")


@pytest.fixture(scope="module")
def baseline(photos, lite0, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run over the five photos (chunks of 2, batches of 2)."""
    out = tmp_path_factory.mktemp("baseline")
    summary = extract_folder(photos, out, backbone=lite0, chunk=2, batch_size=2, progress=False)
    return out, summary


def test_extract_real_photos(photos, lite0, baseline):
    out, summary = baseline
    feats = np.load(out / "test_ims.npy", allow_pickle=False)
    assert feats.shape == (5, 49, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    # ReLU6 output: inside [0, 6], and the regions of one image differ from each other.
    assert feats.min() >= 0 and feats.max() <= 6 and feats[0].std(axis=0).mean() > 0.01
    ids = (out / "test_ids.txt").read_text().split()
    assert ids == sorted(PHOTOS)
    paths = (out / "test_images.txt").read_text().splitlines()
    assert [Path(p).name for p in paths] == [f"{n}.{e}" for n, e in sorted(PHOTOS.items())]
    assert all(Path(p).is_file() for p in paths)
    assert not (out / "test_caps.txt").exists()  # features only without a captions file
    assert not (out / ".extract_partial").exists()
    meta = json.loads((out / "extract_meta.json").read_text())
    assert meta["backbone"] == "efficientnet-lite0" and meta["dim"] == 1280 and meta["regions"] == 49
    assert meta["splits"]["test"]["n_images"] == 5 and meta["splits"]["test"]["skipped"] == []
    assert summary["images_per_second"] > 0
    # The real ImageNet weights and preprocessing: the classifier head on the pooled regions
    # recognises the cat and the coffee.
    with torch.no_grad():
        logits = lite0.model._fc(torch.from_numpy(feats.mean(axis=1)))
    top = logits.argmax(1).tolist()
    assert top[ids.index("chelsea")] in CAT_CLASSES, top
    assert top[ids.index("coffee")] in COFFEE_CLASSES, top


def test_grayscale_and_alpha_become_rgb(tmp_path):
    cam = open_image(save_photo("camera", tmp_path))
    assert cam.mode == "RGB"
    arr = np.asarray(cam)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], skdata.camera())
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(open_image(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[7, 7].tolist() == [255, 255, 255]
    deep = skdata.camera().astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale
    assert np.abs(np.asarray(open_image(tmp_path / "deep.png"))[..., 0].astype(int) - skdata.camera()).max() <= 1


def test_same_image_same_features(photos, lite0, baseline, tmp_path):
    again = extract_folder(photos, tmp_path / "again", backbone=lite0, chunk=2, batch_size=2, progress=False)
    assert again["shape"] == [5, 49, 1280]
    first = np.load(baseline[0] / "test_ims.npy")
    assert np.array_equal(np.load(tmp_path / "again" / "test_ims.npy"), first)
    # The same photo under another name, in another batch, gets the same features.
    folder = tmp_path / "dup"
    folder.mkdir()
    save_photo("chelsea", folder)
    save_photo("coffee", folder)
    (folder / "zz_copy.png").write_bytes((folder / "chelsea.png").read_bytes())
    extract_folder(folder, tmp_path / "dup_out", backbone=lite0, batch_size=2, progress=False)
    feats = np.load(tmp_path / "dup_out" / "test_ims.npy")
    np.testing.assert_allclose(feats[2], feats[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[0], first[sorted(PHOTOS).index("chelsea")], rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats[0], feats[1], atol=1e-2)


def test_cli_skips_corrupt_and_non_image_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_photo("chelsea", folder)
    save_photo("rocket", folder)
    truncated_jpeg(folder / "broken.jpg")
    (folder / "notes.txt").write_text("not a picture\n")
    out = tmp_path / "ds"
    proc = subprocess.run(
        [
            *ESLMATCH,
            "extract",
            "--images",
            str(folder),
            "--out",
            str(out),
            "--image-size",
            "96",
            "--no-progress",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=HUNG,
    )
    assert proc.returncode == 0, proc.stderr
    feats = np.load(out / "test_ims.npy")
    assert feats.shape == (2, 9, 1280) and np.isfinite(feats).all()  # 96 px -> 3x3 regions
    assert (out / "test_ids.txt").read_text().split() == ["chelsea", "rocket"]
    assert "skipped 2 files" in proc.stdout
    assert "broken.jpg: unreadable image" in proc.stdout and "notes.txt: not an image" in proc.stdout
    meta = json.loads((out / "extract_meta.json").read_text())["splits"]["test"]
    assert {s["file"] for s in meta["skipped"]} == {"broken.jpg", "notes.txt"}
    assert meta["image_size"] == 96 and meta["regions"] == 9


def test_cli_empty_folder_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [*ESLMATCH, "extract", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "ds")],
        capture_output=True,
        text=True,
        timeout=HUNG,
    )
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("eslmatch: error: ") and "no image files" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ds" / "test_ims.npy").exists()


def test_only_bad_files_is_an_error(tmp_path, lite0):
    folder = tmp_path / "bad"
    folder.mkdir()
    truncated_jpeg(folder / "broken.jpg")
    (folder / "readme.md").write_text("# hi\n")
    with pytest.raises(InputError, match="no usable image: all 2 files were skipped"):
        extract_folder(folder, tmp_path / "ds", backbone=lite0, progress=False)
    assert not (tmp_path / "ds" / "test_ims.npy").exists()


def test_parse_captions(tmp_path):
    for name in ("a.jpg", "b.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    entries, refused = list_images(tmp_path)
    assert [e.id for e in entries] == ["a", "b", "c"] and refused == []
    caps = tmp_path / "caps.tsv"
    caps.write_text(
        "a.jpg\tA dog runs.\n"  # 1: with extension
        "a\tA  dog\tjumps \n"  # 2: without extension; inner tab / spaces collapsed
        "\n"  # 3: blank, ignored
        "no tab here\n"  # 4
        "b.png#0\tFlickr style.\n"  # 5: name#k accepted
        "zebra.jpg\tunknown image\n"  # 6
        "c.jpg\t   \n"  # 7: empty caption
        "\tno name\n"  # 8
        "b\tsecond for b\n",  # 9
        encoding="utf-8",
    )
    table = parse_captions(caps, caption_lookup(entries))
    assert table.by_id == {"a": ["A dog runs.", "A dog jumps"], "b": ["Flickr style.", "second for b"]}
    assert [n for n, _ in table.bad_lines] == [4, 6, 7, 8]
    reasons = dict(table.bad_lines)
    assert "no tab" in reasons[4] and "unknown image 'zebra.jpg'" in reasons[6]
    assert "empty caption" in reasons[7] and "empty image name" in reasons[8]
    assert fit_captions(["x", "y"], 5) == ["x", "y", "x", "y", "x"]
    assert fit_captions(list("abcdefg"), 5) == list("abcde")


def test_extract_with_captions(photos, lite0, baseline, tmp_path, caplog):
    caps = tmp_path / "caps.txt"
    lines = [f"chelsea.png\tcat {i}" for i in range(7)]  # more than K: first 5 kept
    lines += ["coffee\ta cup of coffee", "coffee.jpg\tespresso"]  # fewer than K: repeated
    lines += ["rocket\ta rocket on the pad", "nowhere\tunknown"]
    caps.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    summary = extract_folder(photos, out, backbone=lite0, captions=caps, split="dev", progress=False)
    assert (out / "dev_ids.txt").read_text().split() == ["chelsea", "coffee", "rocket"]
    written = (out / "dev_caps.txt").read_text().splitlines()
    assert written[:5] == [f"cat {i}" for i in range(5)]
    assert written[5:10] == ["a cup of coffee", "espresso", "a cup of coffee", "espresso", "a cup of coffee"]
    assert written[10:] == ["a rocket on the pad"] * 5
    assert summary["captions_repeated"] == 2 and summary["captions_truncated"] == 1
    assert sorted(summary["no_caption"]) == ["astronaut.png", "camera.png"]
    assert summary["bad_caption_lines"] == [{"line": 11, "reason": "unknown image 'nowhere'"}]
    assert any("2 image(s) have fewer than 5 captions" in m for m in caplog.messages)
    assert any("line 11" in m for m in caplog.messages)
    feats = np.load(out / "dev_ims.npy")
    base = np.load(baseline[0] / "test_ims.npy")
    order = sorted(PHOTOS)
    np.testing.assert_allclose(
        feats, base[[order.index(n) for n in ("chelsea", "coffee", "rocket")]], rtol=1e-4, atol=1e-4
    )
    from eslmatch.data import open_split

    split = open_split(out, "dev", img_dim=1280)
    assert split.n_images == 3 and split.captions_per_image == 5 and split.ids == ["chelsea", "coffee", "rocket"]
    assert split.image_of_caption(7) == 1


def test_resume_reuses_finished_chunks(photos, lite0, baseline, tmp_path, monkeypatch, caplog):
    out = tmp_path / "ds"

    class Interrupted(Exception):
        pass

    def stop_after_first(index, n_chunks):
        assert n_chunks == 3
        if index == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        extract_folder(
            photos,
            out,
            backbone=lite0,
            chunk=2,
            batch_size=2,
            progress=False,
            on_chunk=stop_after_first,
        )
    partial = out / ".extract_partial" / "test"
    assert (partial / "chunk_00000.npy").is_file() and (partial / "progress.json").is_file()
    assert not (out / "test_ims.npy").exists()

    seen: list[int] = []
    original = lite0.run

    def counting(batch, extras):
        seen.append(batch.shape[0])
        return original(batch, extras)

    monkeypatch.setattr(lite0, "run", counting)
    caplog.set_level("INFO", logger="eslmatch")
    summary = extract_folder(photos, out, backbone=lite0, chunk=2, batch_size=2, progress=False)
    assert sum(seen) == 3  # only the files of chunks 1 and 2 went through the backbone
    assert summary["reused_chunks"] == 1 and summary["computed_images"] == 3
    assert any("resuming" in m for m in caplog.messages)
    assert np.array_equal(np.load(out / "test_ims.npy"), np.load(baseline[0] / "test_ims.npy"))
    assert (out / "test_ids.txt").read_text() == (baseline[0] / "test_ids.txt").read_text()
    assert not (out / ".extract_partial").exists()


def test_resume_starts_over_when_files_change(photos, lite0, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        (folder / f"{name}.{PHOTOS[name]}").write_bytes((photos / f"{name}.{PHOTOS[name]}").read_bytes())
    out = tmp_path / "ds"

    def stop(index, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_folder(folder, out, backbone=lite0, chunk=1, progress=False, on_chunk=stop)
    save_photo("astronaut", folder)  # the file list changed: old chunks must not be reused
    seen: list[int] = []
    original = lite0.run
    monkeypatch.setattr(lite0, "run", lambda b, e: (seen.append(b.shape[0]), original(b, e))[1])
    caplog.set_level("INFO", logger="eslmatch")
    summary = extract_folder(folder, out, backbone=lite0, chunk=1, progress=False)
    assert sum(seen) == 4 and summary["reused_chunks"] == 0
    assert any("starting over" in m for m in caplog.messages)


def test_roi_pool_math():
    h = w = 7
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([torch.full((h, w), 3.0), 2 * xs + 0.5 * ys])[None]  # (1, 2, 7, 7)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [2 / 7, 1 / 7, 5 / 7, 6 / 7], [0.3, 0.4, 0.5, 0.45]]])
    pooled = roi_pool(ramp, boxes, samples=7)
    assert pooled.shape == (1, 3, 2)
    assert torch.allclose(pooled[0, :, 0], torch.full((3,), 3.0))  # constant map -> constant
    # whole-image box with 7x7 samples = every cell centre once = the map's mean
    assert torch.allclose(pooled[0, 0, 1], ramp[0, 1].mean(), atol=1e-5)
    # bilinear sampling is exact on a linear map away from the border: the box centre's value
    for k in (1, 2):
        cx = (boxes[0, k, 0] + boxes[0, k, 2]) / 2 * w - 0.5  # image fraction -> cell coordinate
        cy = (boxes[0, k, 1] + boxes[0, k, 3]) / 2 * h - 0.5
        assert torch.allclose(pooled[0, k, 1], 2 * cx + 0.5 * cy, atol=1e-4)


def test_box_pooling_backbone(photos, lite0, baseline, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        (folder / f"{name}.{PHOTOS[name]}").write_bytes((photos / f"{name}.{PHOTOS[name]}").read_bytes())
    ch_h, ch_w = skdata.chelsea().shape[:2]
    co_h, co_w = skdata.coffee().shape[:2]
    boxes = {
        "chelsea.png": [[0, 0, ch_w, ch_h], [120, 20, 300, 200], [-50, -50, 100, 80]],  # last one clipped
        "coffee": [[50, 40, 400, 300]],  # one box: repeated to fill R
    }  # astronaut: no boxes -> skipped
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(boxes))
    model = BoxPoolingBackbone(JsonBoxes(path), lite0, regions=3)
    summary = extract_folder(folder, tmp_path / "ds", backbone=model, batch_size=2, progress=False)
    feats = np.load(tmp_path / "ds" / "test_ims.npy")
    assert feats.shape == (2, 3, 1280) and np.isfinite(feats).all()
    assert (tmp_path / "ds" / "test_ids.txt").read_text().split() == ["chelsea", "coffee"]
    assert summary["skipped"] == [{"file": "astronaut.png", "reason": "no boxes for it in boxes.json"}]
    grid = np.load(baseline[0] / "test_ims.npy")[sorted(PHOTOS).index("chelsea")]  # (49, 1280)
    np.testing.assert_allclose(feats[0, 0], grid.mean(0), rtol=1e-4, atol=1e-4)  # whole-image box
    assert not np.allclose(feats[0, 1], feats[0, 0], atol=1e-2)
    assert np.array_equal(feats[1, 0], feats[1, 1]) and np.array_equal(feats[1, 0], feats[1, 2])
    # The same through the registry: R defaults to the most boxes of any image.
    built = build_backbone("efficientnet-lite0-boxes", BackboneOptions(boxes=str(path), device="cpu"))
    assert built.regions == 3 and built.dim == 1280
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x.jpg": [[10, 10, 5, 20]]}))
    with pytest.raises(InputError, match="x2 <= x1"):
        JsonBoxes(bad)


def test_backbone_errors(tmp_path):
    with pytest.raises(EslmatchError, match="unknown backbone 'nope'.*efficientnet-lite0"):
        build_backbone("nope")
    with pytest.raises(EslmatchError, match="needs --weights"):
        build_backbone("resnet152", BackboneOptions(device="cpu"))
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(EslmatchError, match="needs torchvision"):
            build_backbone("resnet152", BackboneOptions(weights=str(tmp_path / "w.pt"), device="cpu"))
    with pytest.raises(EslmatchError, match="needs --boxes"):
        build_backbone("efficientnet-lite0-boxes", BackboneOptions(device="cpu"))
    with pytest.raises(EslmatchError, match="cannot read efficientnet-lite0 weights safely"):
        build_backbone("efficientnet-lite0", BackboneOptions(weights=str(tmp_path / "w.pt"), device="cpu"))
