"""The demo dataset: captions true of their images, hard pairs, rendering and writing."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from eslmatch.demo import (
    COLOR_RGB,
    COLORS,
    Caption,
    Conj,
    DemoConfig,
    Desc,
    Mention,
    Obj,
    Relation,
    Scene,
    SceneConfig,
    Total,
    caption_is_true,
    generate_split,
    hard_case_captions,
    hard_case_scores,
    load_hard_cases,
    render_scene,
    write_demo_dataset,
    write_split,
)
from eslmatch.demo.grammar import meaning_key, realize
from eslmatch.errors import EslmatchError


@pytest.fixture(scope="module")
def big():
    return generate_split(2000, seed=11, hard_fraction=0.3, name="train")


def _parts(m):
    return m.parts if isinstance(m, Conj) else (m,)


def _relations(cap: Caption) -> set[str]:
    return {p.rel for p in _parts(cap.meaning) if isinstance(p, Relation)}


def _colors(cap: Caption) -> set[str]:
    out = set()
    for p in _parts(cap.meaning):
        descs = (p.a, p.b) if isinstance(p, Relation) else (p.desc,) if isinstance(p, Mention) else ()
        out |= {d.color for d in descs if d.color is not None}
    return out


# ----------------------------------------------------------------------------- truth


def test_every_caption_is_true_of_its_image(big):
    assert big.n_images == 2000 and big.n_captions == 10_000
    for scene, caps in zip(big.scenes, big.captions):
        assert len(caps) == 5
        assert 2 <= len(scene.objects) <= 4
        for cap in caps:
            assert caption_is_true(scene, cap), cap.text
            assert caption_is_true(scene, cap, strict=False), cap.text


def test_checker_hand_built_scene():
    red_l = Obj("circle", "red", "small", 0.2, 0.5)
    red_r = Obj("circle", "red", "large", 0.8, 0.5)
    blue = Obj("square", "blue", "small", 0.5, 0.5)
    s = Scene((red_l, red_r, blue))
    red_circle, blue_square = Desc("circle", "red"), Desc("square", "blue")
    # "a red circle" is not said when there are two; "two red circles" is.
    assert not caption_is_true(s, Mention(red_circle, 1))
    assert caption_is_true(s, Mention(red_circle, 1), strict=False)
    assert caption_is_true(s, Mention(red_circle, 2))
    assert not caption_is_true(s, Mention(red_circle, 3), strict=False)
    assert caption_is_true(s, Mention(Desc("circle", "red", "small"), 1))
    # Relations need unique referents (strict) and a margin.
    assert not caption_is_true(s, Relation(red_circle, "left_of", blue_square))
    assert caption_is_true(s, Relation(red_circle, "left_of", blue_square), strict=False)
    assert caption_is_true(s, Relation(Desc("circle", size="small"), "left_of", blue_square))
    assert not caption_is_true(s, Relation(Desc("circle", size="small"), "right_of", blue_square), strict=False)
    assert not caption_is_true(s, Relation(Desc("circle", size="small"), "above", blue_square), strict=False)
    close = Scene((Obj("star", "green", "small", 0.5, 0.5), Obj("cross", "black", "small", 0.55, 0.8)))
    # 0.05 to the right is under the margin, and the offset is mostly vertical.
    assert not caption_is_true(close, Relation(Desc("star"), "left_of", Desc("cross")))
    assert caption_is_true(close, Relation(Desc("star"), "left_of", Desc("cross")), strict=False)
    assert caption_is_true(close, Relation(Desc("star"), "above", Desc("cross")))
    # 0.3 - 2 * 0.08 = 0.14 apart: not "next to" strictly, still within the loose gap.
    assert not caption_is_true(close, Relation(Desc("star"), "next_to", Desc("cross")))
    assert caption_is_true(close, Relation(Desc("star"), "next_to", Desc("cross")), strict=False)
    assert caption_is_true(s, Total(3)) and not caption_is_true(s, Total(2), strict=False)
    only = Conj((Mention(red_circle, 2), Mention(blue_square, 1)), only=True)
    assert caption_is_true(s, only)
    assert not caption_is_true(s, Conj((Mention(red_circle, 2),), only=True), strict=False)
    assert not caption_is_true(s, Conj((Mention(red_circle, 2), Mention(Desc("star"), 1))))


def test_mirroring_falsifies_exactly_the_left_right_captions(big):
    flipped_lr = flipped_ud = 0
    for scene, caps in zip(big.scenes[:800], big.captions[:800]):
        mirror = replace(scene, objects=tuple(replace(o, x=1 - o.x) for o in scene.objects))
        flip = replace(scene, objects=tuple(replace(o, y=1 - o.y) for o in scene.objects))
        for cap in caps:
            rels = _relations(cap)
            lr, ud = bool(rels & {"left_of", "right_of"}), bool(rels & {"above", "below"})
            assert caption_is_true(mirror, cap, strict=False) != lr, cap.text
            assert caption_is_true(flip, cap, strict=False) != ud, cap.text
            flipped_lr += lr
            flipped_ud += ud
    assert flipped_lr > 200 and flipped_ud > 200


def test_recolouring_falsifies_exactly_the_colour_captions(big):
    changed = 0
    for scene, caps in zip(big.scenes[:800], big.captions[:800]):
        for cap in caps:
            named = _colors(cap)
            other = next(c for c in COLORS if c not in named)
            recoloured = replace(scene, objects=tuple(replace(o, color=other) for o in scene.objects))
            assert caption_is_true(recoloured, cap, strict=False) != bool(named), cap.text
            changed += bool(named)
    assert changed > 2000


def test_dropping_or_moving_objects_falsifies_some_captions(big):
    rng = random.Random(3)
    dropped_false = moved_false = moved_total = 0
    for scene, caps in zip(big.scenes[:500], big.captions[:500]):
        fewer = replace(scene, objects=scene.objects[1:])
        dropped_false += sum(not caption_is_true(fewer, c) for c in caps)
        xy = [(o.x, o.y) for o in scene.objects]
        rng.shuffle(xy)
        moved = replace(scene, objects=tuple(replace(o, x=x, y=y) for o, (x, y) in zip(scene.objects, xy)))
        for c in caps:
            if _relations(c):
                moved_total += 1
                moved_false += not caption_is_true(moved, c)
            else:  # only relations depend on positions
                assert caption_is_true(moved, c), c.text
    assert dropped_false > 0.4 * 2500
    assert moved_false > 0.3 * moved_total


# ----------------------------------------------------------------------------- hard pairs


def test_hard_pairs_differ_by_one_swap_and_have_false_captions(big):
    pairs = big.hard_pairs
    assert len(pairs) == int(2000 * 0.3) // 2 and len(big.hard_kinds) == len(pairs)
    members = [i for p in pairs for i in p]
    assert len(set(members)) == len(members)
    assert set(big.hard_kinds) == {"color", "size", "position"}
    for (a, b), kind in zip(pairs, big.hard_kinds):
        sa, sb = big.scenes[a], big.scenes[b]
        assert sa.background == sb.background and sa.noise_seed == sb.noise_seed
        diff = [k for k, (x, y) in enumerate(zip(sa.objects, sb.objects)) if x != y]
        assert len(diff) == 2
        i, j = diff
        field = {"color": "color", "size": "size", "position": "x"}[kind]
        assert getattr(sa.objects[i], field) == getattr(sb.objects[j], field)
        assert getattr(sa.objects[j], field) == getattr(sb.objects[i], field)
        assert any(not caption_is_true(sb, c, strict=False) for c in big.captions[a])
        assert any(not caption_is_true(sa, c, strict=False) for c in big.captions[b])
    # A colour swap flips the binding: "a red circle and a blue square" is false of its partner.
    binding = [
        c
        for (a, b), kind in zip(pairs, big.hard_kinds)
        if kind == "color"
        for c in big.captions[a]
        if not caption_is_true(big.scenes[b], c, strict=False) and not _relations(c)
    ]
    assert binding


def test_hard_case_captions_are_true_for_image_and_false_for_partner(big):
    cases = hard_case_captions(big)
    assert len(cases) >= 2 * len(big.hard_pairs)
    flat = [c for caps in big.captions for c in caps]
    seen_images = Counter(c.image for c in cases)
    assert set(seen_images) == {i for p in big.hard_pairs for i in p}
    for case in cases:
        assert case.caption // 5 == case.image
        assert caption_is_true(big.scenes[case.image], flat[case.caption])
        assert not caption_is_true(big.scenes[case.partner], flat[case.caption], strict=False)


def test_hard_case_scores():
    spec = generate_split(40, seed=2, hard_fraction=0.5)
    cases = hard_case_captions(spec)
    right = np.zeros((spec.n_images, spec.n_captions))
    right[np.arange(spec.n_captions) // 5, np.arange(spec.n_captions)] = 1.0
    assert hard_case_scores(right, cases) == {"r1": 1.0, "pairwise": 1.0, "count": float(len(cases))}
    wrong = right.copy()
    for c in cases:
        wrong[c.partner, c.caption] = 2.0
    scores = hard_case_scores(wrong, cases)
    assert scores["r1"] == 0.0 and scores["pairwise"] == 0.0
    with pytest.raises(EslmatchError):
        hard_case_scores(right[:3], cases)


# ----------------------------------------------------------------------------- variety, seeds


def test_determinism_from_seed():
    a, b = generate_split(150, seed=7), generate_split(150, seed=7)
    assert a.caption_texts() == b.caption_texts()
    assert a.scenes == b.scenes and a.hard_pairs == b.hard_pairs
    c = generate_split(150, seed=8)
    assert c.caption_texts() != a.caption_texts()
    assert np.array_equal(np.asarray(render_scene(a.scenes[0])), np.asarray(render_scene(b.scenes[0])))


def test_captions_vary(big):
    texts = big.caption_texts()
    assert len(set(texts)) > 0.8 * len(texts)
    vocab = {w for t in texts for w in t.replace(",", " ").replace(":", " ").split()}
    assert len(vocab) >= 60
    for word in ("left", "right", "above", "below", "over", "under", "next", "beside", "box", "disc", "two", "three"):
        assert word in vocab
    distinct = [len({meaning_key(c.meaning) for c in caps}) for caps in big.captions]
    assert sum(d == 5 for d in distinct) > 0.95 * len(distinct)
    families = Counter(c.family for caps in big.captions for c in caps)
    assert set(families) == {"mention", "conj", "relation", "total", "only"}
    assert min(families.values()) > 0.05 * len(texts)
    # A caption renders the same text from its structure.
    cap = big.captions[0][0]
    assert realize(Caption(cap.meaning, cap.template, cap.variant)) == cap.text


def test_bad_arguments():
    with pytest.raises(EslmatchError):
        generate_split(0, seed=1)
    with pytest.raises(EslmatchError):
        generate_split(10, seed=1, hard_fraction=1.5)
    with pytest.raises(EslmatchError, match="max_objects"):
        generate_split(10, seed=1, config=SceneConfig(max_objects=7))


# ----------------------------------------------------------------------------- rendering, files


def _nearest_color(pixel: np.ndarray) -> str:
    return min(COLOR_RGB, key=lambda c: float(np.sum((np.asarray(COLOR_RGB[c], float) - pixel) ** 2)))


def test_render_has_object_colours_at_centres(big):
    for scene in big.scenes[:60]:
        img = render_scene(scene)
        assert img.size == (128, 128) and img.mode == "RGB"
        px = np.asarray(img, dtype=float)
        for o in scene.objects:
            r, c = int(o.y * 128), int(o.x * 128)
            assert _nearest_color(px[r, c]) == o.color
        corners = [px[1, 1], px[1, -2], px[-2, 1], px[-2, -2]]
        assert min(float(p.mean()) for p in corners) > 190  # light background
    a, b = big.hard_pairs[0]
    assert not np.array_equal(np.asarray(render_scene(big.scenes[a])), np.asarray(render_scene(big.scenes[b])))
    assert render_scene(big.scenes[0], size=64).size == (64, 64)


def test_write_split(tmp_path):
    spec = generate_split(12, seed=4, hard_fraction=0.4, name="dev")
    files = write_split(spec, tmp_path / "images", tmp_path / "dev_caps.txt")
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == [f"dev_{i:05d}.png" for i in range(12)]  # no temporary leftovers
    with Image.open(tmp_path / "images" / "dev_00003.png") as im:
        assert im.size == (128, 128) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), np.asarray(render_scene(spec.scenes[3])))
    lines = (tmp_path / "dev_caps.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == 2 for r in rows)
    assert [r[0] for r in rows] == [n for n in names for _ in range(5)]
    assert [r[1] for r in rows] == spec.caption_texts()
    record = json.loads(files.hard_pairs_file.read_text(encoding="utf-8"))
    assert files.hard_pairs_file.name == "dev_hard_pairs.json"
    assert [(p["a"], p["b"]) for p in record["pairs"]] == spec.hard_pairs
    listed = sorted(c for p in record["pairs"] for c in p["captions_of_a_false_for_b"] + p["captions_of_b_false_for_a"])
    assert listed == sorted(c.caption for c in hard_case_captions(spec))
    assert all(p["captions_of_a_false_for_b"] and p["captions_of_b_false_for_a"] for p in record["pairs"])


def test_load_hard_cases_remaps_to_feature_rows(tmp_path):
    spec = generate_split(16, seed=9, hard_fraction=0.5, name="test")
    files = write_split(spec, tmp_path / "im", tmp_path / "caps.txt")
    cases = hard_case_captions(spec)
    assert load_hard_cases(files.hard_pairs_file) == cases
    # Features extracted in another row order, one image of the first pair missing.
    a0 = spec.hard_pairs[0][0]
    ids = [f"test_{i:05d}" for i in reversed(range(16)) if i != a0]
    row = {int(name[5:]): r for r, name in enumerate(ids)}
    moved = load_hard_cases(files.hard_pairs_file, ids)
    kept = [c for c in cases if a0 not in (c.image, c.partner)]
    assert len(moved) == len(kept) > 0
    for old, new in zip(kept, moved):
        assert (new.image, new.partner) == (row[old.image], row[old.partner])
        assert new.caption == row[old.image] * 5 + old.caption % 5
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(EslmatchError, match="bad.json"):
        load_hard_cases(tmp_path / "bad.json")


def test_write_demo_dataset_layout(tmp_path):
    out = write_demo_dataset(tmp_path, DemoConfig(n_train=4, n_dev=0, n_test=3, seed=1, image_size=32))
    assert set(out) == {"train", "test"}
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == [f"train_{i:05d}.png" for i in range(4)]
    assert len((tmp_path / "test_captions.txt").read_text(encoding="utf-8").splitlines()) == 15
    assert (tmp_path / "test_hard_pairs.json").is_file() and not (tmp_path / "dev_captions.txt").exists()
    with Image.open(tmp_path / "images" / "test" / "test_00002.png") as im:
        assert im.size == (32, 32)
    # Splits get different seeds.
    train = (tmp_path / "train_captions.txt").read_text(encoding="utf-8").splitlines()
    test = (tmp_path / "test_captions.txt").read_text(encoding="utf-8").splitlines()
    assert [t.split("\t")[1] for t in train[:15]] != [t.split("\t")[1] for t in test]


def test_split_truth_equals_the_literal_loop(big):
    from eslmatch.demo.grammar import caption_is_true, split_truth

    scenes = big.scenes[:400]
    captions = [c for caps in big.captions[:400] for c in caps]
    fast = split_truth(scenes, captions)
    literal = [[k for k, s in enumerate(scenes) if caption_is_true(s, c)] for c in captions]
    assert fast == literal
    assert all(c // 5 in t for c, t in enumerate(fast))  # every caption is true of its own image
    assert max(len(t) for t in fast) > 20 and min(len(t) for t in fast) == 1  # broad and narrow ones


def test_write_split_writes_the_truth(tmp_path):
    from eslmatch.truth import load_truth

    spec = generate_split(15, seed=5, hard_fraction=0.4, name="test")
    files = write_split(spec, tmp_path / "images", tmp_path / "test_caps.txt")
    assert files.truth_file == tmp_path / "test_truth.json"
    truth = load_truth(files.truth_file, 15, 75)
    record = json.loads(files.truth_file.read_text(encoding="utf-8"))
    assert record["image_names"] == spec.image_names() and record["reading"] == "strict"
    from eslmatch.demo.grammar import caption_is_true

    for c, cap in enumerate(c for caps in spec.captions for c in caps):
        assert truth[c].tolist() == [k for k, s in enumerate(spec.scenes) if caption_is_true(s, cap)]
