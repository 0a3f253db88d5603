"""Raw-image caption datasets: Karpathy JSON and captions.tsv, missing and corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eslmatch.data.raw import (
    BadImageLog,
    ImageCaptionDataset,
    collate_pixels,
    open_caption_tsv,
    open_image_split,
    open_karpathy,
)
from eslmatch.errors import EslmatchError


def pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def tokenize(texts):
    ids = [[1, *(2 + (ord(ch) % 50) for ch in t[:6]), 3] for t in texts]
    width = max(map(len, ids))
    out = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return out, torch.tensor([len(r) for r in ids])


@pytest.fixture()
def karpathy(tmp_path):
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "test", "train"]):
        name = f"im{i}.jpg"
        Image.new("RGB", (20, 16), (40 * i, 10, 200)).save(root / "val2014" / name)
        n_caps = 5 if i != 5 else 2
        entries.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "imgid": i,
                "sentences": [{"raw": f"Image {i} Caption {j}."} for j in range(n_caps)],
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries}))
    return path, root


def test_karpathy_splits_restval_and_caption_order(karpathy):
    path, root = karpathy
    train = open_karpathy(path, root, "train")
    assert train.n_images == 3 and train.ids == ["0", "1", "5"]  # train + restval
    assert open_karpathy(path, root, "train", restval=False).n_images == 2
    assert open_karpathy(path, root, "dev").ids == ["2"]
    test = open_image_split(path, root, "test")
    assert test.n_images == 2 and test.n_captions == 10
    assert test.captions[5] == "image 4 caption 0." and test.image_of_caption(5) == 1  # lower-cased, image-major
    assert train.captions[10:] == ["image 5 caption 0.", "image 5 caption 1."] * 2 + ["image 5 caption 0."]
    assert test.head(1).n_captions == 5


def test_missing_files_are_named(karpathy):
    path, root = karpathy
    (root / "val2014" / "im3.jpg").unlink()
    test = open_karpathy(path, root, "test")
    assert test.missing == ["val2014/im3.jpg"] and test.n_images == 1
    with pytest.raises(EslmatchError, match="1 image file.*missing: val2014/im3.jpg"):
        test.require_complete()
    with pytest.raises(EslmatchError, match="not a Karpathy-split file"):
        bad = path.with_name("bad.json")
        bad.write_text("[1, 2]")
        open_karpathy(bad, root, "test")
    with pytest.raises(EslmatchError, match=r"images\[0\] lacks 'sentences'"):
        bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
        open_karpathy(bad, root, "test")


def test_a_corrupt_image_is_reported_and_replaced_by_the_next_pair(karpathy, caplog):
    path, root = karpathy
    (root / "val2014" / "im3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    split = open_karpathy(path, root, "test")
    ds = ImageCaptionDataset(split, pixels, tokenize, BadImageLog())
    item = ds[0]  # image 3 is corrupt: the same-rank caption of the next image comes instead
    assert item["index"] == 5 and item["image"].shape == (3, 8, 8)
    assert len(caplog.messages) == 1 and "im3.jpg" in caplog.messages[0]
    ds[1]
    assert len(caplog.messages) == 1  # reported once
    batch = collate_pixels([ds[i] for i in range(5, 10)])
    assert batch.images.shape == (5, 3, 8, 8) and batch.captions.shape[0] == 5
    assert batch.indices.tolist() == [5, 6, 7, 8, 9]
    assert torch.equal(batch.caption_lengths, (batch.captions != 0).sum(1))


def test_caption_tsv_layout(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (9, 9)).save(root / name)
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("a.png\tA Dog\nb\tA cat\nb.png\tTwo cats\n")
    split = open_caption_tsv(tsv, root, captions_per_image=2)
    assert split.ids == ["a", "b"] and split.captions == ["a dog", "a dog", "a cat", "two cats"]
    tsv.write_text("a.png A dog without a tab\n")
    with pytest.raises(EslmatchError, match="line 1: no tab"):
        open_caption_tsv(tsv, root)


def test_the_branch_per_split_coco_files(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val2014" / "COCO_val2014_1.jpg")
    doc = {"images": [{"file_name": "COCO_val2014_1.jpg", "sentences": [{"raw": "A Cat."}] * 5}]}
    (tmp_path / "testall_coco.json").write_text(json.dumps(doc))
    split = open_karpathy(tmp_path / "testall_coco.json", root, "test")
    assert split.n_images == 1 and split.image_paths[0].name == "COCO_val2014_1.jpg" and split.captions[0] == "a cat."
