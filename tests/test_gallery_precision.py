"""How a gallery's items and queries are encoded (issue 18): the precision recorded in the
manifest, a query encoded otherwise stated (``index info``, ``search``), and ONNX Runtime
query encoding giving the torch results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _cli import run
from _models import tiny_gru_model

N = 24


@pytest.fixture()
def gallery(tmp_path):
    model_dir = str(tiny_gru_model(seed=3).eval().save_pretrained(tmp_path / "model"))
    np.save(tmp_path / "feats.npy", np.random.default_rng(0).random((N, 6, 16), dtype=np.float32))
    return tmp_path, model_dir


def build(capsys, tmp_path, model_dir, name: str, *extra: str) -> str:
    out = str(tmp_path / name)
    code, _, err = run(
        capsys, "index", "build", "--model", model_dir, "--features", str(tmp_path / "feats.npy"), "--out", out, *extra
    )
    assert code == 0, err
    return out


def hits(capsys, index: str, *extra: str) -> tuple[list[tuple[str, float]], str]:
    code, out, err = run(capsys, "search", "--index", index, "a red circle", "-k", "5", "--json", *extra)
    assert code == 0, err
    return [(h["id"], h["score"]) for h in json.loads(out)["hits"]], err


def test_the_precision_is_recorded_and_a_query_mismatch_is_stated(gallery, capsys):
    tmp_path, model_dir = gallery
    index = build(capsys, tmp_path, model_dir, "bf16", "--precision", "bf16")
    assert '"precision": "bf16"' in (tmp_path / "bf16" / "manifest.json").read_text()
    code, out, _ = run(capsys, "index", "info", "--index", index)
    assert code == 0 and "encoded    bf16" in out and "queries    bf16 (the gallery's)" in out
    code, out, _ = run(capsys, "index", "info", "--index", index, "--precision", "fp32")
    assert code == 0 and "queries    fp32: not the gallery's encoding" in out
    same, err = hits(capsys, index)  # queries follow the recorded precision: no note
    assert "note" not in err
    other, err = hits(capsys, index, "--precision", "fp32")
    assert "eslmatch: note: the query is encoded in fp32, the gallery in bf16" in err
    assert [i for i, _ in other][:3] == [i for i, _ in same][:3]
    assert np.allclose([s for _, s in other], [s for _, s in same], atol=0.05)


def test_onnx_runtime_queries_give_the_torch_results(gallery, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    tmp_path, model_dir = gallery
    index = build(capsys, tmp_path, model_dir, "fp32")
    code, _, err = run(capsys, "export", model_dir, "--format", "onnx", "--out", str(tmp_path / "onnx"))
    assert code == 0, err
    torch_hits, _ = hits(capsys, index)
    onnx_hits, err = hits(capsys, index, "--runtime", "onnxruntime", "--onnx", str(tmp_path / "onnx"))
    assert [i for i, _ in onnx_hits] == [i for i, _ in torch_hits]
    np.testing.assert_allclose([s for _, s in onnx_hits], [s for _, s in torch_hits], rtol=1e-4, atol=1e-6)
    assert "onnxruntime" in err  # a query encoded by another runtime than the gallery's items is stated
