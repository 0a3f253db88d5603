"""``eslmatch eval --extended eccv,cxc`` end to end on a small made-up COCO layout (Karpathy JSON,
COCO captions file, precomp features or images), the id derivation, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eslmatch.annotations.extended as ext
from _datagen import _scene, scene_captions, scene_features
from _models import TINY_CLIP, tiny_gru_model
from eslmatch.annotations.coco import (
    load_coco_captions,
    match_caption_ids,
    normalize_caption,
    read_ids,
    resolve_image_ids,
)
from eslmatch.cli import main
from eslmatch.errors import EslmatchError
from eslmatch.evaluate import evaluate_protocol

pytest.importorskip("eccv_caption", reason="the eccv-caption package (pip install 'eslmatch[eval]')")
from test_extended import package_metrics  # noqa: E402  (needs the package)

N_IMAGES = 8


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(code: int, err: str, pattern: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("eslmatch: error: "), err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Eight real COCO 5K test ids (the package's first images and their caption ids) with made-up
    captions: COCO's captions file (other case, punctuation and order, one extra annotation), the
    Karpathy JSON, a precomp folder (SCAN-style ids, one per caption) and the images."""
    root = tmp_path_factory.mktemp("coco")
    split = ext.coco_test_split()
    eccv = ext.load_positives("eccv")
    queried = [  # images that are ECCV queries with a caption that is one too: every metric has queries
        i
        for i, iid in enumerate(split.image_ids)
        if iid in eccv.i2t.keys and np.isin(split.caption_ids[5 * i : 5 * i + 5], eccv.t2i.keys).any()
    ][:N_IMAGES]
    image_ids = split.image_ids[queried]
    caption_ids = split.caption_ids[(5 * np.array(queried)[:, None] + np.arange(5)).reshape(-1)]
    rng = np.random.default_rng(0)
    scenes = [_scene(rng) for _ in range(N_IMAGES)]
    captions = [c for sc in scenes for c in scene_captions(sc)]
    assert all(len(set(captions[5 * i : 5 * i + 5])) == 5 for i in range(N_IMAGES))
    names = [f"COCO_val2014_{int(i):012d}.jpg" for i in image_ids]
    anns = []
    for i, iid in enumerate(image_ids):
        own = [(int(caption_ids[5 * i + j]), captions[5 * i + j]) for j in range(5)]
        for cid, text in reversed(own):  # another order than the split's; another case and punctuation
            anns.append({"id": cid, "image_id": int(iid), "caption": " " + text.capitalize() + ". "})
    anns.append({"id": 999999999, "image_id": int(image_ids[0]), "caption": "A sixth caption the split drops."})
    (root / "captions_val2014.json").write_text(
        json.dumps({"images": [{"id": int(i), "file_name": n} for i, n in zip(image_ids, names)], "annotations": anns})
    )
    (root / "val2014").mkdir()
    from PIL import Image

    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "val2014" / n)
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": n,
                "cocoid": int(iid),
                "split": "test",
                "sentences": [{"raw": captions[5 * i + j]} for j in range(5)],
            }
            for i, (n, iid) in enumerate(zip(names, image_ids))
        ]
    }
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    pre = root / "coco_precomp"
    pre.mkdir()
    np.save(pre / "testall_ims.npy", np.stack([scene_features(sc, 6, 16, rng) for sc in scenes]))
    (pre / "testall_caps.txt").write_text("\n".join(captions) + "\n")
    (pre / "testall_ids.txt").write_text("\n".join(str(int(i)) for i in np.repeat(image_ids, 5)) + "\n")
    (root / "image_ids.txt").write_text("\n".join(str(int(i)) for i in image_ids) + "\n")
    (root / "caption_ids.txt").write_text("\n".join(str(int(c)) for c in caption_ids) + "\n")
    tiny_gru_model(seed=0).eval().save_pretrained(root / "m1")
    tiny_gru_model(seed=1).eval().save_pretrained(root / "m2")
    return root, image_ids, caption_ids


def eval_saved(capsys, scores: Path, *args) -> tuple[dict, np.ndarray]:
    """``eslmatch eval ... --json --save-scores scores``: the result and the matrix it ranked."""
    code, out, err = run(capsys, "eval", *args, "--json", "--save-scores", scores, "--no-progress")
    assert code == 0, err
    return json.loads(out), np.load(scores)


def id_files(images: Path, captions: Path) -> list:
    return ["--image-ids", images / "image_ids.txt", "--caption-ids", captions / "caption_ids.txt"]


def extended_args(root: Path) -> list:
    return ["--protocol", "coco5k", "--extended", "eccv,cxc", "--coco-captions", root / "captions_val2014.json"]


def check_against_references(result: dict, sims: np.ndarray, image_ids, caption_ids) -> None:
    assert result["extended"] == ext.extended_metrics(sims, image_ids, caption_ids)["extended"]
    # the package's ECCV code needs R ranked places (up to 48), more than this gallery has: CxC and COCO only
    theirs = package_metrics(sims, image_ids, caption_ids, targets=("coco_5k_recalls", "cxc_recalls"))
    assert len(theirs) == 6
    for key, value in theirs.items():
        for side in ("i2t", "t2i"):
            assert abs(result["extended"][key][side] - value[side]) <= 1e-9, (key, side)
    standard = evaluate_protocol(sims, "coco5k")  # the standard table is unchanged by --extended
    assert result["i2t"] == standard["i2t"] and result["t2i"] == standard["t2i"]
    for k in (1, 5, 10):
        assert result["extended"][f"coco_5k_r{k}"]["t2i"] == pytest.approx(standard["t2i"][f"r{k}"] / 100)


def test_extended_from_features_derives_the_ids(capsys, coco, tmp_path):
    root, image_ids, caption_ids = coco
    result, sims = eval_saved(
        capsys, tmp_path / "s.npy", "--checkpoint", root / "m1", "--data", root, *extended_args(root)
    )
    info = result["extended_info"]
    assert info["sets"] == ["eccv", "cxc"] and info["queries"]["coco"] == {"i2t": N_IMAGES, "t2i": 5 * N_IMAGES}
    assert info["queries"]["cxc"]["i2t"] == N_IMAGES and not info["full_split"]
    assert set(result["extended"]) == {
        "eccv_map_at_r",
        "eccv_rprecision",
        "eccv_r1",
        *(f"{s}_r{k}" for s in ("cxc", "coco_5k") for k in (1, 5, 10)),
    }
    check_against_references(result, sims, image_ids, caption_ids)
    # a saved matrix with its id files gives the same figures; so does the table
    saved = ["--scores", tmp_path / "s.npy", "--protocol", "coco5k", *id_files(root, root)]
    code, out, err = run(capsys, "eval", *saved, "--extended", "cxc,eccv", "--json")
    assert code == 0, err
    assert json.loads(out)["extended"] == result["extended"]
    code, out, err = run(capsys, "eval", *saved, "--extended", "eccv")
    assert code == 0, err
    assert "ECCV mAP@R" in out and "COCO 5K R@1" in out and "CxC" not in out.split("extended")[1].split("queries")[0]
    assert f"{100 * result['extended']['eccv_map_at_r']['i2t']:.2f}" in out


def test_extended_on_an_ensemble(capsys, coco, tmp_path):
    root, image_ids, caption_ids = coco
    models = ["--checkpoint", root / "m1", "--checkpoint", root / "m2"]
    result, sims = eval_saved(
        capsys, tmp_path / "ens.npy", *models, "--data", root / "coco_precomp", *extended_args(root)
    )
    assert result["ensemble"] == 2
    check_against_references(result, sims, image_ids, caption_ids)


def test_extended_from_raw_images_with_esl_clip(capsys, coco, tmp_path):
    from eslmatch.factory import load_pretrained
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel

    root, image_ids, caption_ids = coco
    torch.manual_seed(0)
    ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).save_pretrained(tmp_path / "clip")
    data = ["--data", root / "dataset_coco.json", "--image-root", root, "--split", "test"]
    result, sims = eval_saved(
        capsys, tmp_path / "clip.npy", "--checkpoint", tmp_path / "clip", *data, *extended_args(root)
    )
    check_against_references(result, sims, image_ids, caption_ids)
    assert load_pretrained(tmp_path / "clip").family == "esl-clip"


def test_the_library_returns_what_eval_prints(capsys, coco, tmp_path):
    """``eslmatch.evaluate.run.evaluate`` with the ids derived from the data, and with id files."""
    from eslmatch.evaluate.run import evaluate, format_evaluation

    root, _, _ = coco
    m1, captions, saved = str(root / "m1"), str(root / "captions_val2014.json"), str(tmp_path / "s.npy")
    cli = ["--checkpoint", m1, "--data", str(root), *extended_args(root), "--save-scores", saved, "--no-progress"]
    code, printed, err = run(capsys, "eval", *cli, "--json")
    assert code == 0, err
    result = evaluate(
        "coco5k", models=[m1], data=root, extended="eccv,cxc", coco_captions=[captions], save_scores=saved,
        progress=False,
    )  # fmt: skip
    assert result.to_json() + "\n" == printed and "extended_info" in result.metrics
    np.testing.assert_array_equal(np.load(saved), result.scores)
    ids = [str(root / "image_ids.txt"), str(root / "caption_ids.txt")]
    cli = ["--scores", saved, "--protocol", "coco5k", "--extended", "cxc,eccv", "--image-ids", ids[0]]
    cli += ["--caption-ids", ids[1]]
    code, printed, err = run(capsys, "eval", *cli, "--json")
    assert code == 0, err
    code, table, err = run(capsys, "eval", *cli)
    assert code == 0, err
    result = evaluate("coco5k", scores=[saved], extended=("cxc", "eccv"), image_ids=ids[0], caption_ids=ids[1])
    assert result.to_json() + "\n" == printed and format_evaluation(result) + "\n" == table


def test_a_caption_that_matches_no_annotation_is_named(capsys, coco, tmp_path):
    root, _, _ = coco
    data = json.loads((root / "captions_val2014.json").read_text())
    wrong = next(a for a in data["annotations"] if a["id"] == int(coco[2][7]))
    wrong["caption"] = "a completely different sentence"
    (tmp_path / "captions.json").write_text(json.dumps(data))
    code, _, err = run(
        capsys,
        "eval",
        "--checkpoint",
        root / "m1",
        "--data",
        root / "coco_precomp",
        "--protocol",
        "coco5k",
        "--extended",
        "eccv",
        "--coco-captions",
        tmp_path / "captions.json",
    )
    one_line(code, err, "testall_caps.txt: caption 7 (")
    assert "matches none of the 3 unused COCO annotations of image" in err


@pytest.mark.parametrize(
    "change,pattern",
    [
        ("short_images", "image_ids.txt: 7 image ids for 8 rows"),
        ("unknown_caption", "caption_ids.txt: line 3: 5 is not a caption id of the COCO 5K test split"),
        ("not_integer", "image_ids.txt: line 2: 'x12' is not an integer id"),
        ("other_layout", "do not follow the (N, 5N) layout"),
    ],
)
def test_bad_id_files_are_one_line(capsys, coco, tmp_path, change, pattern):
    root, image_ids, caption_ids = coco
    imgs = [str(int(i)) for i in image_ids]
    caps = [str(int(c)) for c in caption_ids]
    if change == "short_images":
        imgs = imgs[:-1]
    elif change == "unknown_caption":
        caps[2] = "5"
    elif change == "not_integer":
        imgs[1] = "x12"
    elif change == "other_layout":
        caps[4], caps[5] = caps[5], caps[4]
    (tmp_path / "image_ids.txt").write_text("\n".join(imgs) + "\n")
    (tmp_path / "caption_ids.txt").write_text("\n".join(caps) + "\n")
    np.save(tmp_path / "s.npy", np.zeros((N_IMAGES, 5 * N_IMAGES), np.float32))
    saved = ["--scores", tmp_path / "s.npy", "--protocol", "coco5k", "--extended", "eccv,cxc"]
    code, _, err = run(capsys, "eval", *saved, *id_files(tmp_path, tmp_path))
    one_line(code, err, pattern)


def test_misplaced_options_and_a_missing_package_are_one_line(capsys, coco, tmp_path, monkeypatch):
    root, _, _ = coco
    np.save(tmp_path / "s.npy", np.zeros((N_IMAGES, 5 * N_IMAGES), np.float32))
    code, _, err = run(capsys, "eval", "--scores", tmp_path / "s.npy", "--protocol", "coco1k", "--extended", "eccv")
    one_line(code, err, "cover the COCO 5K test split: use --protocol coco5k, not coco1k")
    code, _, err = run(capsys, "eval", "--scores", tmp_path / "s.npy", "--protocol", "coco5k", "--extended", "eccv")
    one_line(code, err, "--extended with --scores needs --image-ids")
    code, _, err = run(
        capsys, "eval", "--scores", tmp_path / "s.npy", "--protocol", "coco5k", "--image-ids", root / "image_ids.txt"
    )
    one_line(code, err, "--image-ids goes with --extended eccv,cxc")
    code, _, err = run(
        capsys, "eval", "--checkpoint", root / "m1", "--data", root, "--protocol", "coco5k", "--extended", "eccv"
    )
    one_line(code, err, "--extended needs the COCO caption annotation id of every caption")
    monkeypatch.setattr(ext, "PACKAGE", "eccv_caption_not_installed")
    code, _, err = run(
        capsys, "eval", "--checkpoint", root / "no-such-model", "--data", root, *extended_args(root)
    )  # refused before the model is even looked at
    one_line(code, err, "pip install 'eslmatch[eval]'")


# ---------------------------------------------------------------------------------------------- the id helpers
def test_captions_match_by_normalised_text_in_file_order(coco):
    root, image_ids, caption_ids = coco
    index = load_coco_captions([root / "captions_val2014.json"])
    assert normalize_caption("  A man, riding-a WAVE. ") == "a man riding a wave"
    captions = (root / "coco_precomp" / "testall_caps.txt").read_text().splitlines()
    got = match_caption_ids(captions, np.repeat(image_ids, 5), index, "caps.txt")
    np.testing.assert_array_equal(got, caption_ids)
    # two annotations with one text are taken in file order; a third copy has no annotation left
    index.by_image[1] = [(11, "A dog."), (12, "a dog")]
    np.testing.assert_array_equal(match_caption_ids(["a dog", "a dog"], [1, 1], index, "x"), [11, 12])
    with pytest.raises(EslmatchError, match=r"x: caption 2 \('a dog'\) matches none of the 0 unused COCO"):
        match_caption_ids(["a dog", "a dog", "a dog"], [1, 1, 1], index, "x")
    with pytest.raises(EslmatchError, match=r"x: caption 0: its image 7 has no annotation in"):
        match_caption_ids(["a dog"], [7], index, "x")


def test_image_ids_from_ids_or_file_names(coco, tmp_path):
    root, image_ids, _ = coco
    index = load_coco_captions([root / "captions_val2014.json"])
    names = [f"val2014/COCO_val2014_{int(i):012d}.jpg" for i in image_ids[:2]] + [
        f"COCO_val2014_{int(image_ids[2]):012d}"
    ]
    np.testing.assert_array_equal(resolve_image_ids([*names, str(int(image_ids[3]))], index, "ids"), image_ids[:4])
    with pytest.raises(EslmatchError, match=r"ids: image 0 \('photo_1'\) is neither a COCO image id"):
        resolve_image_ids(["photo_1"], index, "ids")
    (tmp_path / "ids.txt").write_text("1\n2\n")
    assert read_ids(tmp_path / "ids.txt").tolist() == [1, 2]
    with pytest.raises(EslmatchError, match="no such id file"):
        read_ids(tmp_path / "none.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"id": 1, "caption": "x"}]}))
    with pytest.raises(EslmatchError, match=r"bad.json: annotations\[0\] needs an integer id, image_id and a caption"):
        load_coco_captions([tmp_path / "bad.json"])
