"""SugarCrepe and Winoground: small made-up files in their layouts, real photographs, scores
held to a literal loop over ``model.similarity`` for ESL-CLIP (random tiny CLIP) and for ESL on
features made by ``eslmatch extract``; images and captions encoded once; bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _models import TINY_CLIP, randomize
from eslmatch.annotations import compositional as comp
from eslmatch.cli import main
from eslmatch.config import ESLConfig
from eslmatch.data.files import open_image
from eslmatch.errors import EslmatchError
from eslmatch.factory import load_pretrained
from eslmatch.model.esl import ESLModel
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from eslmatch.text import WordVocab

skdata = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
WORDS = "a an the cat dog on in of red white black mug cup rocket man woman sky table and with coffee sitting".split()
SUGARCREPE = {  # file -> items (image, positive, negative); images shared across files
    "replace_obj": [
        (0, "a man in a white suit", "a dog in a white suit"),
        (1, "a cat sitting on a table", "a dog sitting on a table"),
        (2, "a cup of coffee on a table", "a rocket on a table"),
    ],
    "swap_att": [
        (1, "a red cat and a white table", "a white cat and a red table"),
        (3, "a white rocket in the sky", "a sky in the white rocket"),
    ],
    "add_att": [
        (2, "a mug of coffee", "a red mug of black coffee"),
        (4, "a man with a black camera", "a man with a black camera and a red cat"),
        (0, "a man in the sky", "a man and a woman in the sky"),
    ],
}
WINOGROUND = [
    ("a cat on a table", "a table on a cat", 1, 2),
    ("a man with a rocket", "a rocket with a man", 0, 3),
    ("a white cup and black coffee", "a black cup and white coffee", 2, 4),
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Photos named as COCO val2017 and Winoground name them, the two layouts, an
    ``eslmatch extract`` features folder over the same photos, an ESL and an ESL-CLIP model."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bench")
    images = root / "images"
    images.mkdir()
    coco_names = [f"{397133 + i:012d}.jpg" for i in range(len(PHOTOS))]
    for name, file in zip(PHOTOS, coco_names):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64)).save(images / file)
    for e, (_, _, i0, i1) in enumerate(WINOGROUND):
        for j, i in enumerate((i0, i1)):
            Image.open(images / coco_names[i]).save(images / f"ex_{e}_img_{j}.png")
    sugar = root / "sugarcrepe"
    sugar.mkdir()
    for name, items in SUGARCREPE.items():
        data = {
            str(k): {"filename": coco_names[i], "caption": pos, "negative_caption": neg}
            for k, (i, pos, neg) in enumerate(items)
        }
        (sugar / f"{name}.json").write_text(json.dumps(data))
    wino = root / "winoground"
    wino.mkdir()
    lines = [
        json.dumps({"id": e, "caption_0": c0, "caption_1": c1, "image_0": f"ex_{e}_img_0", "image_1": f"ex_{e}_img_1"})
        for e, (c0, c1, _, _) in enumerate(WINOGROUND)
    ]
    (wino / "examples.jsonl").write_text("\n".join(lines) + "\n")
    code = main(
        ["extract", "--images", str(images), "--out", str(root / "feats"), "--image-size", "64"]
        + ["--no-progress", "--device", "cpu"]
    )
    assert code == 0
    for seed in (0, 1):
        torch.manual_seed(seed)
        vocab = WordVocab.build([" ".join(WORDS)])
        cfg = ESLConfig(
            embed_size=32, kernel_size=2, num_levels=2, img_dim=1280, text_encoder="gru", text_model=None,
            vocab_size=len(vocab), word_dim=16,
        )  # fmt: skip
        esl = ESLModel(cfg, tokenizer=vocab)
        randomize(esl)
        esl.eval().save_pretrained(root / f"esl{seed}")
        ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).save_pretrained(root / f"clip{seed}")
    return root


def loop_scores(model, data: comp.CompositionalData, bench, pixels: bool) -> np.ndarray:
    """Every item scored alone by ``model.similarity`` on its raw inputs: ``(I, pairs per item)``."""
    feats = np.load(bench / "feats" / "test_ims.npy")
    ids = (bench / "feats" / "test_ids.txt").read_text().split()
    out = np.zeros(data.item_pairs.shape)
    with torch.no_grad():
        for it, pairs in enumerate(data.item_pairs):
            for j, p in enumerate(pairs):
                name = data.images[data.pairs[p, 0]]
                if pixels:
                    x = model.preprocess(open_image(bench / "images" / (name if "." in name else name + ".png")))[None]
                else:
                    x = torch.from_numpy(feats[ids.index(name.rsplit(".", 1)[0])])[None]
                tokens, lens = model.tokenize([data.captions[data.pairs[p, 1]]])
                out[it, j] = float(model.similarity(x, None, tokens, lens)[0, 0])
    return out


def run_json(capsys, *args) -> dict:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.parametrize("family", ["esl-clip", "esl"])
def test_sugarcrepe_equals_a_literal_loop(capsys, bench, family):
    pixels = family == "esl-clip"
    model = load_pretrained(bench / ("clip0" if pixels else "esl0"))
    data = comp.load_sugarcrepe(bench / "sugarcrepe")
    assert len(data.images) == 5 and len(data.item_ids) == 8 and len(data.captions) == 16
    inputs = comp.resolve_inputs(data, bench / "images", comp.open_features(bench / "feats") if not pixels else None)
    seen = {"images": 0, "captions": 0}
    embed_images, embed_captions = model.embed_images, model.embed_captions

    def count_images(x, *a):
        seen["images"] += x.shape[0]
        return embed_images(x, *a)

    def count_captions(x, *a):
        seen["captions"] += x.shape[0]
        return embed_captions(x, *a)

    model.embed_images, model.embed_captions = count_images, count_captions
    scores = comp.score_compositional(model, data, inputs, batch_size=3, device="cpu")
    assert seen == {"images": 5, "captions": 16}  # each image and each caption once, though shared
    model.embed_images, model.embed_captions = embed_images, embed_captions
    expect = loop_scores(model, data, bench, pixels)
    np.testing.assert_allclose(scores[data.item_pairs], expect, rtol=1e-5, atol=1e-6)
    right = expect[:, 0] > expect[:, 1]
    assert 0 < right.sum() < len(right)  # random models: neither all right nor all wrong
    result = run_json(
        capsys,
        "eval",
        "--checkpoint",
        bench / ("clip0" if pixels else "esl0"),
        "--protocol",
        "sugarcrepe",
        "--data",
        bench / "sugarcrepe",
        *(["--image-root", bench / "images"] if pixels else ["--features", bench / "feats"]),
        "--json",
    )["sugarcrepe"]
    groups = np.array(data.item_groups)
    for name in SUGARCREPE:
        assert result["categories"][name] == {"accuracy": right[groups == name].mean(), "items": len(SUGARCREPE[name])}
    assert set(result["categories"]) == set(SUGARCREPE)  # the files present, no others
    assert result["macro_average"] == pytest.approx(np.mean([right[groups == n].mean() for n in SUGARCREPE]))
    assert result["groups"]["replace"] == result["categories"]["replace_obj"]["accuracy"]


@pytest.mark.parametrize("family", ["esl-clip", "esl"])
def test_winoground_equals_a_literal_loop(capsys, bench, family):
    pixels = family == "esl-clip"
    name = "clip" if pixels else "esl"
    data = comp.load_winoground(bench / "winoground")
    runs = []
    for seed in (0, 1):
        model = load_pretrained(bench / f"{name}{seed}")
        runs.append(loop_scores(model, data, bench, pixels))
    s = np.mean(runs, axis=0)  # an ensemble of the two: the mean of their scores
    c0i0, c1i0, c0i1, c1i1 = s.T
    text = (c0i0 > c1i0) & (c1i1 > c0i1)
    image = (c0i0 > c0i1) & (c1i1 > c1i0)
    where = ["--image-root", bench / "images"] if pixels else ["--features", bench / "feats"]
    models = ["--checkpoint", bench / f"{name}0", "--checkpoint", bench / f"{name}1"]
    out = run_json(
        capsys, "eval", *models, "--protocol", "winoground", "--data", bench / "winoground", *where, "--json"
    )
    assert out["ensemble"] == 2
    result = out["winoground"]
    assert (result["text"], result["image"], result["group"]) == (text.mean(), image.mean(), (text & image).mean())
    assert result["examples"] == 3 and result["images"] == 6


def test_the_library_returns_what_eval_prints(capsys, bench):
    from eslmatch.evaluate.run import evaluate, format_evaluation

    models, data, images = [str(bench / "clip0"), str(bench / "clip1")], str(bench / "winoground"), bench / "images"
    args = ["eval", "--checkpoint", models[0], "--checkpoint", models[1], "--protocol", "winoground"]
    args += ["--data", data, "--image-root", images, "--device", "cpu"]
    printed = json.dumps(run_json(capsys, *args, "--json"), indent=2)
    assert main([str(a) for a in args]) == 0
    table = capsys.readouterr().out
    result = evaluate("winoground", models=models, data=data, image_root=images, device="cpu")
    assert result.to_json() == printed and format_evaluation(result) + "\n" == table
    assert result.metrics["ensemble"] == 2 and result.scores.shape == (12,)


def test_sugarcrepe_and_winoground_metrics_by_hand():
    d = comp.CompositionalData(
        "winoground", None, ["a", "b"], ["", ""], ["x", "y"], np.zeros((4, 2), np.int64),
        np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), ["", ""], ["0", "1"],
    )  # fmt: skip
    # example 0: text right, image right; example 1: text right (5 > 4, 8 > 6), image wrong (5 < 6)
    scores = np.array([3.0, 1.0, 2.0, 4.0, 5.0, 4.0, 6.0, 8.0])
    m = comp.winoground_metrics(d, scores)
    assert (m["text"], m["image"], m["group"]) == (1.0, 0.5, 0.5)
    s = comp.CompositionalData(
        "sugarcrepe", None, ["a"], [""], ["x", "y"], np.zeros((6, 2), np.int64),
        np.array([[0, 1], [2, 3], [4, 5]]), ["replace_obj", "replace_obj", "add_att"], ["0", "1", "2"],
    )  # fmt: skip
    m = comp.sugarcrepe_metrics(s, np.array([2.0, 1.0, 1.0, 1.0, 0.0, 3.0]))  # right, tie (wrong), wrong
    assert m["categories"] == {"replace_obj": {"accuracy": 0.5, "items": 2}, "add_att": {"accuracy": 0.0, "items": 1}}
    assert m["macro_average"] == 0.25 and m["groups"] == {"replace": 0.5, "add": 0.0}


def one_line(capsys, args, pattern):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("eslmatch: error: "), err
    assert pattern in lines[0], lines[0]


def test_bad_input_is_one_line(capsys, bench, tmp_path):
    feats = ["--features", bench / "feats"]
    images = ["--image-root", bench / "images"]

    def esl(data, protocol="sugarcrepe", model="esl0"):
        return ["eval", "--checkpoint", bench / model, "--protocol", protocol, "--data", data]

    # a SugarCrepe file naming an image the folder lacks: refused before any model is loaded
    (tmp_path / "sc").mkdir()
    items = {"7": {"filename": "000000999999.jpg", "caption": "a cat", "negative_caption": "a dog"}}
    (tmp_path / "sc" / "swap_obj.json").write_text(json.dumps(items))
    missing = "swap_obj.json: item '7': image '000000999999.jpg' is not in"
    one_line(capsys, [*esl(tmp_path / "sc", model="no-model"), *images], missing)
    one_line(capsys, [*esl(tmp_path / "sc"), *feats], "image '000000999999.jpg' has no features in")
    sugar = bench / "sugarcrepe"
    one_line(capsys, [*esl(sugar), *images], "pass --features")
    one_line(capsys, [*esl(sugar, model="clip0"), *feats], "pass --image-root")
    one_line(capsys, esl(sugar), "pass --image-root (models that take images)")
    one_line(capsys, [*esl(tmp_path), *feats], "none of the SugarCrepe files replace_obj.json")
    (tmp_path / "sc" / "swap_obj.json").write_text(json.dumps({"1": {"filename": "x.jpg", "caption": "a cat"}}))
    one_line(capsys, [*esl(tmp_path / "sc"), *feats], "swap_obj.json: item '1': 'negative_caption' must be")
    (tmp_path / "ex.jsonl").write_text('{"image_0": "a", "image_1": "b", "caption_0": "x"}\n')
    one_line(capsys, [*esl(tmp_path / "ex.jsonl", "winoground"), *feats], "ex.jsonl: line 1: 'caption_1' must be")
    save = ["--save-scores", tmp_path / "s.npy"]
    one_line(capsys, [*esl(sugar), *feats, *save], "--save-scores does not go with --protocol sugarcrepe")
    one_line(capsys, [*esl(sugar), "--features", tmp_path], "no test_ims.npy")


def test_loading_errors_name_the_file(tmp_path):
    (tmp_path / "add_obj.json").write_text("{not json")
    with pytest.raises(EslmatchError, match=r"add_obj.json: not valid JSON"):
        comp.load_sugarcrepe(tmp_path)
    with pytest.raises(EslmatchError, match=r"no such Winoground file"):
        comp.load_winoground(tmp_path)
