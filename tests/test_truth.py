"""Truth-based retrieval metrics (``eslmatch.truth``) and ``eslmatch eval --truth``."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import eslmatch.evaluate as ev
import eslmatch.truth as tr
from eslmatch.cli import main
from eslmatch.errors import EslmatchError


# ---------------------------------------------------------------------- the loop definition
def loop_order(row: np.ndarray, ties: str) -> list[int]:
    """The ranking of one row, literally as defined (scores in float64)."""
    row = np.asarray(row, dtype=np.float64)
    if ties == "released":
        return [int(j) for j in np.argsort(row)[::-1]]  # as eslmatch.evaluate ranks
    return [int(j) for j in np.argsort(-row, kind="stable")]  # equal scores: lower index first


def loop_side(queries, ranked_rows, relevant, ks, ties):
    """Mean P@K, R@K (percent) over the queries with at least one relevant answer."""
    p = {k: [] for k in ks}
    r = {k: [] for k in ks}
    sizes, excluded = [], 0
    for q in queries:
        if not relevant[q]:
            excluded += 1
            continue
        order = loop_order(ranked_rows(q), ties)
        for k in ks:
            top = order[:k]
            hits = sum(1 for j in top if j in relevant[q])
            p[k].append(hits / len(top))
            r[k].append(1.0 if hits > 0 else 0.0)
        sizes.append(len(relevant[q]))
    out = {f"p{k}": 100.0 * float(np.mean(p[k])) if sizes else None for k in ks}
    out.update({f"r{k}": 100.0 * float(np.mean(r[k])) if sizes else None for k in ks})
    out.update(queries=len(sizes), no_truth=excluded, mean_true=float(np.mean(sizes)) if sizes else None)
    return out


def loop_truth(sims, truth, ks=(1, 5, 10), ties="released", caption_mask=None, image_mask=None) -> dict:
    sims = np.asarray(sims, dtype=np.float64)
    n, m = sims.shape
    cap_true = [set(int(i) for i in t) for t in truth]
    img_true = [{c for c in range(m) if i in cap_true[c]} for i in range(n)]
    captions = [c for c in range(m) if caption_mask is None or caption_mask[c]]
    images = [i for i in range(n) if image_mask is None or image_mask[i]]
    return {
        "t2i": loop_side(captions, lambda c: sims[:, c], cap_true, ks, ties),
        "i2t": loop_side(images, lambda i: sims[i], img_true, ks, ties),
    }


def random_truth(rng, n: int, m: int, k: int | None = None, empty: float = 0.2, big: float = 0.05) -> list[list[int]]:
    """Random truth lists: some empty, some true of most images, else a few images
    (with the caption's own image ``c // k`` when ``k`` is given)."""
    out = []
    for c in range(m):
        u = rng.random()
        if u < empty:
            t = []
        elif u < empty + big:
            t = list(rng.choice(n, size=max(1, int(0.8 * n)), replace=False))
        else:
            t = list(rng.choice(n, size=int(rng.integers(1, min(n, 6) + 1)), replace=False))
        if k is not None and t:
            t.append(c // k)
        out.append([int(i) for i in t])
    return out


def assert_matches_loop(got: dict, want: dict) -> None:
    for side in ("t2i", "i2t"):
        assert set(want[side]) <= set(got[side])
        for key, value in want[side].items():
            if value is None:
                assert got[side][key] is None, (side, key)
            else:
                assert got[side][key] == pytest.approx(value, abs=1e-9), (side, key, got[side][key], value)


# ---------------------------------------------------------------------- against the loop
@pytest.mark.parametrize("ties", ["released", "stable"])
@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("shape", [(23, 115), (40, 37), (3, 12), (12, 4), (1, 5)])
def test_vectorised_metrics_equal_the_loop(shape, decimals, ties, monkeypatch):
    n, m = shape
    rng = np.random.default_rng(n * 100 + m + (decimals or 7))
    sims = rng.standard_normal(shape).astype(np.float32)
    if decimals is not None:  # many ties (decimals=0: a handful of distinct values)
        sims = np.round(sims * 2, decimals).astype(np.float32)
    truth = random_truth(rng, n, m)
    ks = (1, 5, 10)
    want = loop_truth(sims, truth, ks, ties)
    got = tr.truth_metrics(sims, truth, ks, ties=ties)
    assert_matches_loop(got, want)
    assert (got["n_images"], got["n_captions"], got["ties"], got["ks"]) == (n, m, ties, [1, 5, 10])
    assert got["true_pairs"] == sum(len(set(t)) for t in truth)
    monkeypatch.setattr(tr, "_CHUNK_BYTES", 1)  # one query per chunk: the same answer
    assert tr.truth_metrics(sims, truth, ks, ties=ties) == got


@pytest.mark.parametrize("ties", ["released", "stable"])
def test_all_ties_and_odd_ks(ties):
    sims = np.zeros((17, 30))
    rng = np.random.default_rng(1)
    truth = random_truth(rng, 17, 30)
    for ks in [(1, 5, 10), (2, 3), (1, 17, 40), (30,)]:
        assert_matches_loop(tr.truth_metrics(sims, truth, ks, ties=ties), loop_truth(sims, truth, ks, ties))


@pytest.mark.parametrize("ties", ["released", "stable"])
def test_top_columns_is_the_head_of_the_ranking(ties):
    rng = np.random.default_rng(3)
    for decimals in (None, 1, 0):
        rows = rng.standard_normal((50, 40))
        if decimals is not None:
            rows = np.round(rows, decimals)
        rows[0] = 0.0
        rows[1, :12] = 5.0  # a tie straddling the cut
        for k in (1, 5, 10, 40):
            want = np.array([loop_order(r, ties)[:k] for r in rows])
            np.testing.assert_array_equal(tr.top_columns(rows, k, ties), want)


def test_large_random_matrix_with_ties_equals_the_loop():
    """400 images x 2,000 captions, scores on a coarse grid, truth as a dataset has it."""
    rng = np.random.default_rng(11)
    n, k = 400, 5
    sims = np.round(rng.standard_normal((n, k * n)), 1).astype(np.float32)
    truth = random_truth(rng, n, k * n, k=k, empty=0.02, big=0.01)
    for ties in ("released", "stable"):
        start = time.perf_counter()
        got = tr.truth_metrics(sims, truth, ties=ties)
        took = time.perf_counter() - start
        want = loop_truth(sims, truth, (1, 5, 10), ties)
        assert_matches_loop(got, want)
        print(f"{ties}: {n} x {k * n} in {took * 1000:.0f} ms")


# ---------------------------------------------------------------------- hand-made cases
def test_hand_made_small_case():
    sims = np.array(
        [
            [0.9, 0.1],  # image 0
            [0.5, 0.8],  # image 1
            [0.7, 0.8],  # image 2
        ]
    )
    truth = [[1, 2], []]  # caption 0 is true of images 1 and 2; caption 1 of none
    res = tr.truth_metrics(sims, truth, ks=(1, 2, 3))
    # t2i: caption 0 ranks images 0, 2, 1 -> hits at positions 2 and 3; caption 1 is left out
    assert res["t2i"] == {
        "p1": 0.0,
        "p2": 50.0,
        "p3": pytest.approx(200 / 3),
        "r1": 0.0,
        "r2": 100.0,
        "r3": 100.0,
        "queries": 1,
        "no_truth": 1,
        "mean_true": 2.0,
    }
    # i2t: image 0 has no true caption (left out); images 1 and 2 rank caption 1 (untrue) first
    assert res["i2t"] == {
        "p1": 0.0,
        "p2": 50.0,
        "p3": 50.0,
        "r1": 0.0,
        "r2": 100.0,
        "r3": 100.0,
        "queries": 2,
        "no_truth": 1,
        "mean_true": 1.0,
    }
    assert res["true_pairs"] == 2


def test_hand_made_ties_and_gallery_smaller_than_k():
    # 4 images all scored 0.5 by caption 0; caption 0 is true of image 0 only.
    sims = np.full((4, 1), 0.5)
    stable = tr.truth_metrics(sims, [[0]], ks=(1, 10), ties="stable")
    assert stable["t2i"]["r1"] == 100.0 and stable["t2i"]["p1"] == 100.0  # lower index first
    assert stable["t2i"]["p10"] == 25.0 and stable["t2i"]["r10"] == 100.0  # P@10 over the 4 images there are
    released = tr.truth_metrics(sims, [[0]], ks=(1,))
    first = int(np.argsort(sims[:, 0])[::-1][0])  # where eslmatch.evaluate's ranking puts the tie
    assert released["t2i"]["r1"] == (100.0 if first == 0 else 0.0)
    # a caption true of every image: P@K = R@K = 100
    perfect = tr.truth_metrics(np.random.default_rng(0).standard_normal((6, 2)), [list(range(6)), [5]])
    assert perfect["t2i"]["p5"] == pytest.approx(50.0 + 10.0) and perfect["t2i"]["r10"] == 100.0


def test_semantic_recall_of_own_images_is_the_standard_recall():
    """With truth = each caption's own image only, semantic R@K is exactly eslmatch.evaluate's R@K,
    ties included (released rule): the two rankings agree."""
    rng = np.random.default_rng(4)
    for k in (5, 2, 1):
        for decimals in (None, 1, 0):
            n = 31
            sims = rng.standard_normal((n, k * n))
            if decimals is not None:
                sims = np.round(sims, decimals)
            own = [[c // k] for c in range(k * n)]
            sem = tr.truth_metrics(sims, own)
            std = ev.recall_metrics(sims, k)
            for side in ("i2t", "t2i"):
                for key in ("r1", "r5", "r10"):
                    assert sem[side][key] == pytest.approx(std[side][key]), (k, decimals, side, key)
            # more true pairs can only add hits
            wider = [sorted({c // k, *rng.choice(n, 3).tolist()}) for c in range(k * n)]
            sem2 = tr.truth_metrics(sims, wider)
            assert all(sem2["t2i"][f"r{j}"] >= std["t2i"][f"r{j}"] - 1e-9 for j in (1, 5, 10))
            assert all(sem2["i2t"][f"r{j}"] >= std["i2t"][f"r{j}"] - 1e-9 for j in (1, 5, 10))


# ---------------------------------------------------------------------- subsets and protocols
def test_caption_and_image_masks():
    rng = np.random.default_rng(8)
    n, m = 20, 100
    sims = np.round(rng.standard_normal((n, m)), 1)
    truth = random_truth(rng, n, m)
    specific = tr.truth_sizes(truth) <= 3  # captions true of at most 3 images (empty ones too)
    got = tr.truth_metrics(sims, truth, caption_mask=specific)
    want = loop_truth(sims, truth, caption_mask=specific)
    assert_matches_loop(got, want)
    assert got["caption_subset"] == int(specific.sum())
    assert got["t2i"]["queries"] + got["t2i"]["no_truth"] == int(specific.sum())
    assert got["i2t"] == tr.truth_metrics(sims, truth)["i2t"]  # image-to-text is unchanged
    images = np.arange(n) % 2 == 0
    got = tr.truth_metrics(sims, truth, image_mask=images, ties="stable")
    assert_matches_loop(got, loop_truth(sims, truth, ties="stable", image_mask=images))
    assert got["image_subset"] == n // 2
    none = tr.truth_metrics(sims, truth, caption_mask=np.zeros(m, bool))
    assert none["t2i"]["queries"] == 0 and none["t2i"]["r1"] is None and none["t2i"]["mean_true"] is None
    with pytest.raises(EslmatchError, match=r"caption_mask: expected a boolean array of shape \(100,\)"):
        tr.truth_metrics(sims, truth, caption_mask=np.ones(99, bool))
    with pytest.raises(EslmatchError, match="image_mask"):
        tr.truth_metrics(sims, truth, image_mask=np.arange(n))


def test_evaluate_truth_protocols():
    rng = np.random.default_rng(9)
    fold, k = 4, 5
    n = 5 * fold
    sims = np.round(rng.standard_normal((n, k * n)), 1)
    truth = random_truth(rng, n, k * n, k=k)
    whole = tr.evaluate_truth(sims, truth, "f30k")
    assert whole["protocol"] == "f30k" and whole["own_image_missing"] == sum(1 for t in truth if not t)
    assert {key: whole[key] for key in ("i2t", "t2i")} == {
        key: tr.truth_metrics(sims, truth)[key] for key in ("i2t", "t2i")
    }
    res = tr.evaluate_truth(sims, truth, "coco1k", fold_size=fold)
    assert res["protocol"] == "coco1k" and len(res["folds"]) == 5 and res["fold_size"] == fold
    for f in range(5):
        i0, i1 = f * fold, (f + 1) * fold
        sub = [[i - i0 for i in t if i0 <= i < i1] for t in truth[i0 * k : i1 * k]]  # shifted into the fold
        want = loop_truth(sims[i0:i1, i0 * k : i1 * k], sub)
        assert_matches_loop(res["folds"][f], want)
    for side in ("i2t", "t2i"):
        for key in ("p1", "p5", "r1", "r10"):
            assert res[side][key] == pytest.approx(np.mean([fr[side][key] for fr in res["folds"]]))
        assert res[side]["queries"] == sum(fr[side]["queries"] for fr in res["folds"])
    assert res["n_images"] == n and res["true_pairs"] == sum(len(set(t)) for t in truth)
    with pytest.raises(EslmatchError, match="5 folds of 1000 images"):
        tr.evaluate_truth(sims, truth, "coco1k")
    text = tr.format_truth_metrics(res)
    assert "mean over 5 folds" in text and "P@1" in text and "R@10" in text


def test_own_image_missing():
    assert tr.own_image_missing([np.array([0]), np.array([1]), np.array([], np.int64), np.array([0, 1])], 2) == 2
    assert tr.own_image_missing([], 5) == 0


# ---------------------------------------------------------------------- loading
def write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_load_truth_valid(tmp_path):
    path = write(
        tmp_path / "test_truth.json",
        {"captions": [[2, 0, 2], [], [1]], "images_per_caption": [2, 0, 1], "note": "extra keys are fine"},
    )
    truth = tr.load_truth(path, 3, 3)
    assert [t.tolist() for t in truth] == [[0, 2], [], [1]]  # sorted, duplicates once
    assert all(t.dtype == np.int64 for t in truth)
    assert [t.tolist() for t in tr.load_truth(path, None, None)] == [[0, 2], [], [1]]
    assert tr.truth_path(tmp_path, "test") == tmp_path / "test_truth.json"


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON"),
        ([[0], [1]], "expected a JSON object"),
        ({"images": [[0]]}, "expected a JSON object"),
        ({"captions": {"0": [0]}}, "expected a JSON object"),
        ({"captions": [[0], 1, [2]]}, "caption 1: expected a list of image indices, got int"),
        ({"captions": [[0], [[1]]]}, "caption 1: image index [1] is not an integer"),
        ({"captions": [[0], [1, 2.0]]}, "caption 1: image index 2.0 is not an integer"),
        ({"captions": [[0], [True]]}, "caption 1: image index True is not an integer"),
        ({"captions": [[0], ["1"]]}, "caption 1: image index '1' is not an integer"),
        ({"captions": [[0], [1], [3]]}, "caption 2: image index 3 out of range (the split has 3 images)"),
        ({"captions": [[0], [-1], [2]]}, "caption 1: image index -1 out of range"),
        ({"captions": [[0], [1]]}, "holds 2 caption lists; the split has 3 captions"),
        ({"captions": [[0], [1], [2], []]}, "holds 4 caption lists; the split has 3 captions"),
    ],
)
def test_load_truth_errors_name_the_file_and_entry(tmp_path, content, fragment):
    path = write(tmp_path / "test_truth.json", content)
    with pytest.raises(EslmatchError) as info:
        tr.load_truth(path, 3, 3)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message, message


def test_load_truth_missing_and_huge(tmp_path):
    with pytest.raises(EslmatchError, match="no such truth file"):
        tr.load_truth(tmp_path / "nope.json", 3, 3)
    with pytest.raises(EslmatchError, match="is a directory"):
        tr.load_truth(tmp_path, 3, 3)
    path = write(tmp_path / "t.json", '{"captions": [[99999999999999999999999]]}')
    with pytest.raises(EslmatchError, match="caption 0: image index out of range"):
        tr.load_truth(path, None, None)


def test_truth_metrics_checks_its_inputs():
    sims = np.zeros((3, 4))
    with pytest.raises(EslmatchError, match="holds 3 caption lists; the scores have 4 captions"):
        tr.truth_metrics(sims, [[0], [1], [2]])
    with pytest.raises(EslmatchError, match="caption 2: image index 3 out of range"):
        tr.truth_metrics(sims, [[0], [1], [3], []])
    with pytest.raises(EslmatchError, match="caption 0: expected a flat list of integer"):
        tr.truth_metrics(sims, [[0.5], [1], [2], []])
    with pytest.raises(EslmatchError, match="non-finite score at image 1, caption 2"):
        bad = sims.copy()
        bad[1, 2] = np.nan
        tr.truth_metrics(bad, [[0]] * 4)
    with pytest.raises(EslmatchError, match="unknown tie rule"):
        tr.truth_metrics(sims, [[0]] * 4, ties="random")
    with pytest.raises(EslmatchError, match="ks must be positive"):
        tr.truth_metrics(sims, [[0]] * 4, ks=(0, 5))


# ---------------------------------------------------------------------- the command
def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def scores_and_truth(tmp_path):
    rng = np.random.default_rng(12)
    n, k = 10, 5
    sims = np.round(rng.standard_normal((n, k * n)), 1).astype(np.float32)
    truth = random_truth(rng, n, k * n, k=k)
    np.save(tmp_path / "s.npy", sims)
    write(tmp_path / "test_truth.json", {"captions": truth})
    return sims, truth, tmp_path / "s.npy", tmp_path / "test_truth.json"


def test_eval_truth_json(scores_and_truth, capsys):
    sims, truth, s, t = scores_and_truth
    code, out, _ = run_cli(capsys, "eval", "--scores", s, "--protocol", "f30k", "--truth", t, "--json")
    assert code == 0
    res = json.loads(out)
    assert res["rsum"] == pytest.approx(ev.recall_metrics(sims)["rsum"])  # the standard metrics are still there
    assert res["truth"]["file"] == str(t) and res["truth"]["protocol"] == "f30k"
    assert_matches_loop(res["truth"], loop_truth(sims, truth))
    assert res["truth"]["t2i"]["no_truth"] == sum(1 for x in truth if not x)
    code, out, _ = run_cli(
        capsys, "eval", "--scores", s, "--protocol", "coco1k", "--fold-size", 2, "--truth", t, "--json"
    )
    assert code == 0
    res = json.loads(out)
    assert len(res["folds"]) == 5 and len(res["truth"]["folds"]) == 5
    assert res["truth"]["t2i"]["r1"] == pytest.approx(tr.evaluate_truth(sims, truth, "coco1k", 2)["t2i"]["r1"])


def test_eval_truth_text(scores_and_truth, capsys):
    sims, truth, s, t = scores_and_truth
    code, out, _ = run_cli(capsys, "eval", "--scores", s, "--protocol", "coco5k", "--truth", t)
    assert code == 0
    assert "rsum" in out and "truth-based (semantic) retrieval" in out
    lines = out.splitlines()
    head = next(ln for ln in lines if "P@1" in ln)
    assert head.split() == ["P@1", "P@5", "P@10", "R@1", "R@5", "R@10", "queries"]
    res = tr.evaluate_truth(sims, truth, "coco5k")
    t2i = next(ln for ln in lines if ln.startswith("t2i") and "P@" not in ln and len(ln.split()) == 8)
    assert t2i.split()[1:] == [f"{res['t2i'][key]:.1f}" for key in ("p1", "p5", "p10", "r1", "r5", "r10")] + [
        str(res["t2i"]["queries"])
    ]
    assert f"{res['t2i']['no_truth']} captions true of no image" in out


def test_eval_truth_errors_are_one_line(scores_and_truth, tmp_path, capsys):
    _, truth, s, _ = scores_and_truth
    cases = [
        (write(tmp_path / "short.json", {"captions": truth[:-1]}), "holds 49 caption lists; the scores have 50"),
        (write(tmp_path / "range.json", {"captions": [[10]] + truth[1:]}), "caption 0: image index 10 out of range"),
        (write(tmp_path / "bad.json", {"captions": [[0], "x"]}), "caption 1: expected a list"),
        (str(tmp_path / "missing.json"), "no such truth file"),
    ]
    for path, fragment in cases:
        code, out, err = run_cli(capsys, "eval", "--scores", s, "--protocol", "f30k", "--truth", path, "--json")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and out == "" and len(lines) == 1, err
        assert lines[0].startswith("eslmatch: error: ") and path in lines[0] and fragment in lines[0], lines[0]
    # a bad file is refused before any model is loaded or data read
    code, _, err = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        tmp_path / "no-model",
        "--data",
        tmp_path / "no-data",
        "--protocol",
        "f30k",
        "--truth",
        tmp_path / "bad.json",
    )
    assert code == 1 and "bad.json" in err and "caption 1" in err
