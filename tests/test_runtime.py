"""``--runtime auto`` (``eslmatch.export.runtime``): the fastest faithful runtime of an encoder,
measured once per machine and cached; a bad cache entry is measured again, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eslmatch.cli import main
from eslmatch.demo.settings import DemoSettings
from eslmatch.export import runtime as rt
from eslmatch.extract import BackboneOptions, build_backbone

SIZE = 64


def lite0(cache: Path, runtime: str = "auto", precision: str = "fp32"):
    options = BackboneOptions(image_size=SIZE, device="cpu", precision=precision, runtime=runtime, cache=cache)
    return build_backbone("efficientnet-lite0", options)


def choice_files(cache: Path) -> list[Path]:
    return sorted((cache / "runtimes").glob("*/choice.json"))


def test_auto_measures_once_picks_a_faithful_runtime_and_caches_it(tmp_path, monkeypatch):
    auto = lite0(tmp_path)
    (path,) = choice_files(tmp_path)
    record = json.loads(path.read_text())
    assert auto.runtime == record["runtime"] and record["runtime"] in ("torch", "onnxruntime")
    chosen = f"{record['runtime']} {record['precision']}"
    assert record["min_cosine"][chosen] >= rt.MIN_COSINE and record["bound"] == rt.MIN_COSINE
    assert set(record["items_per_second"]) >= {"torch fp32", "onnxruntime fp32"}
    assert record["machine"]["torch"] == torch.__version__ and "capability" in record["machine"]
    # the features agree with float32 eager, item by item
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert rt.per_item_cosine(lite0(tmp_path, "torch")(x), auto(x)) >= rt.MIN_COSINE
    # the next process reads the choice: nothing measured, nothing exported
    monkeypatch.setattr(rt, "_measure", lambda *a, **k: pytest.fail("a cached choice was measured again"))
    assert lite0(tmp_path).runtime == auto.runtime


def test_a_bad_cache_entry_is_measured_again(tmp_path):
    lite0(tmp_path, "onnxruntime")
    (path,) = choice_files(tmp_path)
    graph = path.parent / rt.GRAPH
    graph.write_bytes(b"not the graph that was measured")
    b = lite0(tmp_path, "onnxruntime")  # forced: the tampered graph is never run
    assert b.runtime == "onnxruntime" and json.loads(path.read_text())["graph_sha256"] != "x"
    assert rt._graph_ok(path.parent, json.loads(path.read_text()))
    path.write_text("{ half a record")
    assert lite0(tmp_path).runtime in ("torch", "onnxruntime")
    assert json.loads(path.read_text())["runtime"] in ("torch", "onnxruntime")


def test_torch_is_never_measured_and_features_record_the_runtime(tmp_path):
    t = lite0(tmp_path, "torch")
    assert t.runtime == "torch" and not (tmp_path / "runtimes").exists()
    assert "runtime" not in t.fingerprint()  # the torch path's fingerprint is what it was
    o = lite0(tmp_path, "onnxruntime")
    assert o.fingerprint()["runtime"] == "onnxruntime"


def test_an_unfaithful_candidate_is_never_chosen_however_fast(tmp_path):
    """A candidate whose output disagrees with float32 eager (cosine < 0.999) is out, even
    when it is the fastest (here: one that returns zeros at once)."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()

    def eager(x):
        with torch.inference_mode():
            return module(x)

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    paths = {"fp32": eager, "bf16": lambda x: torch.zeros(len(x), 8, 30, 30)}
    choice = rt.choose_runtime("toy", module, x, paths, {"toy": 1}, tmp_path)
    assert choice.record["min_cosine"]["torch bf16"] < rt.MIN_COSINE
    assert "torch bf16" not in choice.record["items_per_second"]
    assert (choice.runtime, choice.precision) != ("torch", "bf16")


def test_extract_records_the_runtime_and_agrees_with_torch(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    feats = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / runtime
        args = ["extract", "--images", str(photos), "--out", str(out), "--image-size", str(SIZE)]
        assert main([*args, "--device", "cpu", "--runtime", runtime, "--no-progress"]) == 0
        line = capsys.readouterr().out
        assert ("(onnxruntime)" in line) == (runtime == "onnxruntime"), line
        meta = json.loads((out / "extract_meta.json").read_text())
        assert meta["splits"]["test"]["runtime"] == runtime
        feats[runtime] = torch.from_numpy(np.load(out / "test_ims.npy"))
    assert rt.per_item_cosine(feats["torch"], feats["onnxruntime"]) >= rt.MIN_COSINE
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--images", str(photos), "--out", str(tmp_path / "x"), "--runtime", "tvm"])
    assert exc.value.code == 2


def test_the_demo_keeps_another_runtime_s_dataset_apart():
    base = DemoSettings(precision="fp32", runtime="torch")
    assert base.dataset_key() == DemoSettings(precision="fp32", runtime="torch").dataset_key()
    assert DemoSettings(precision="fp32", runtime="auto").dataset_key() != base.dataset_key()
