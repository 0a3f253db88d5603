"""ECCV Caption / CxC metrics: held to the eccv-caption package's own code on the same rankings,
and the id checks with their one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import eslmatch.annotations.extended as ext
import eslmatch.evaluate as ev
from eslmatch.errors import EslmatchError

pytest.importorskip("eccv_caption", reason="the eccv-caption package (pip install 'eslmatch[eval]')")
ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("extended_eval", ROOT / "benchmarks" / "extended_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark()
signal_matrix = bench.signal_matrix  # random scores, COCO / ECCV / CxC positives raised


def package_metrics(sims: np.ndarray, image_ids: np.ndarray, caption_ids: np.ndarray, targets=bench.TARGETS) -> dict:
    """eccv_caption.Metrics on rankings derived from ``sims`` as eslmatch ranks (argsort reversed),
    its annotations restricted to the queries present (it requires every query ranked)."""
    return bench.package_metrics(*bench.package_rankings(sims, image_ids, caption_ids), targets)


@pytest.fixture(scope="module")
def subset():
    """The first 1,000 test images of the package's order and their 5,000 captions."""
    split = ext.coco_test_split()
    return split.image_ids[:1000], split.caption_ids[:5000]


@pytest.mark.parametrize("decimals", [None, 1])
def test_every_metric_equals_the_package_on_the_same_ranking(subset, decimals):
    image_ids, caption_ids = subset
    sims = signal_matrix(image_ids, caption_ids, seed=3, decimals=decimals)
    if decimals is not None:
        top = np.sort(sims, axis=1)[:, -10:]
        assert (np.diff(top, axis=1) == 0).any(axis=1).mean() > 0.3  # ties within the first 10 places
    ours = ext.extended_metrics(sims, image_ids, caption_ids)
    theirs = package_metrics(sims, image_ids, caption_ids)
    assert set(ours["extended"]) == set(theirs)
    for key, value in theirs.items():
        for side in ("i2t", "t2i"):
            assert abs(ours["extended"][key][side] - value[side]) <= 1e-9, (key, side)
    for key in ("eccv_map_at_r", "eccv_rprecision", "cxc_r1", "coco_5k_r1"):  # far from 0 and 1
        assert 0.05 < ours["extended"][key]["i2t"] < 0.95 and 0.05 < ours["extended"][key]["t2i"] < 0.95, key
    # COCO 5K R@K is the standard protocol's R@K on the same ranking (fractions, not percent)
    std = ev.recall_metrics(sims)
    for k in (1, 5, 10):
        assert ours["extended"][f"coco_5k_r{k}"]["i2t"] == pytest.approx(std["i2t"][f"r{k}"] / 100, abs=1e-12)
        assert ours["extended"][f"coco_5k_r{k}"]["t2i"] == pytest.approx(std["t2i"][f"r{k}"] / 100, abs=1e-12)
    info = ours["info"]
    assert info["queries"]["coco"] == {"i2t": 1000, "t2i": 5000} and not info["full_split"]
    assert info["unreachable_positives"]["eccv"]["i2t"] > 0  # positives among the 4,000 images left out


def test_chunked_ranking_gives_the_same_metrics(subset, monkeypatch):
    image_ids, caption_ids = subset[0][:200], subset[1][:1000]
    sims = signal_matrix(image_ids, caption_ids, seed=5, decimals=1)
    whole = ext.extended_metrics(sims, image_ids, caption_ids)
    monkeypatch.setattr(ext, "_CHUNK_BYTES", 1)  # one query per chunk
    assert ext.extended_metrics(sims, image_ids, caption_ids) == whole


def test_ranking_metrics_by_hand():
    # query 0: R = 3, hits at places 1 and 3 -> R-P = 2/3, AP@R = (1/1 + 2/3) / 3
    # query 1: R = 2, hit at place 2 only -> R-P = 1/2, AP@R = (1/2) / 2
    hits = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=bool)
    out = ext.ranking_metrics(hits, np.array([3, 2]), ks=(1, 2))
    assert out["r1"] == 0.5 and out["r2"] == 1.0
    assert out["rprecision"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert out["map_at_r"] == pytest.approx(((1 + 2 / 3) / 3 + (1 / 2) / 2) / 2)
    # a gallery shorter than R: the places beyond it are misses
    out = ext.ranking_metrics(np.array([[1, 1]]), np.array([4]))
    assert out["rprecision"] == 0.5 and out["map_at_r"] == pytest.approx((1 + 1) / 4)


def test_positives_come_from_the_package_files():
    eccv = ext.load_positives("eccv")
    assert (len(eccv.i2t.keys), len(eccv.t2i.keys)) == (1261, 1332)
    assert (int(eccv.i2t.sizes.sum()), int(eccv.t2i.sizes.sum())) == (22550, 11279)
    split = ext.coco_test_split()
    assert len(split.caption_ids) == 25000 and len(np.unique(split.image_ids)) == 5000
    assert (split.image_of_caption.reshape(5000, 5) == split.image_ids[:, None]).all()  # 5 consecutive per image


def test_id_checks_name_the_bad_entry(subset):
    image_ids, caption_ids = subset[0][:4], subset[1][:20]
    ext.check_ids(image_ids, caption_ids, (4, 20), 5)
    with pytest.raises(EslmatchError, match=r"rows.txt: 3 ids for the 4 image rows"):
        ext.check_ids(image_ids[:3], caption_ids, (4, 20), 5, image_source="rows.txt")
    with pytest.raises(EslmatchError, match=r"cols.txt: 19 ids for the 20 caption columns"):
        ext.check_ids(image_ids, caption_ids[:19], (4, 20), 5, caption_source="cols.txt")
    bad = image_ids.copy()
    bad[2] = 12345678
    with pytest.raises(EslmatchError, match=r"rows.txt: line 3: 12345678 is not an image id of the COCO 5K test"):
        ext.check_ids(bad, caption_ids, (4, 20), 5, image_source="rows.txt")
    dup = caption_ids.copy()
    dup[7] = dup[1]
    with pytest.raises(EslmatchError, match=rf"caption id {dup[1]} appears twice \(lines 2 and 8\)"):
        ext.check_ids(image_ids, dup, (4, 20), 5)
    swapped = caption_ids.copy()
    swapped[[4, 5]] = swapped[[5, 4]]  # a caption of image 1 in the columns of image 0
    with pytest.raises(EslmatchError, match=r"line 5: caption .* do not follow the \(N, 5N\) layout"):
        ext.check_ids(image_ids, swapped, (4, 20), 5)


def test_extended_names_are_checked():
    assert ext.parse_extended("cxc, eccv") == ("eccv", "cxc")
    assert ext.parse_extended(None) == ()
    with pytest.raises(EslmatchError, match="choose from eccv, cxc"):
        ext.parse_extended("eccv,pmrp")


def test_a_missing_package_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(ext, "PACKAGE", "eccv_caption_not_installed")
    with pytest.raises(
        EslmatchError, match=r"eccv-caption package, which is not installed: pip install 'eslmatch\[eval\]'"
    ):
        ext.annotation_dir()


def test_the_benchmark_script_runs_and_agrees(tmp_path):
    assert bench.main(["--images", "300", "--out", str(tmp_path), "--name", "small"]) == 0
    payload = json.loads((tmp_path / "small.json").read_text())
    assert (payload["images"], payload["captions"]) == (300, 1500) and len(payload["matrices"]) == 2
    for r in payload["matrices"].values():
        assert r["max_abs_difference"] <= 1e-9 and r["max_abs_difference_to_standard_protocol"] <= 1e-12
        assert set(r["seconds"]) == {"ours", "package_ranking", "package_metrics", "package_total"}
    assert "| eccv_map_at_r |" in (tmp_path / "small.md").read_text()
