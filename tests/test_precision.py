"""Precision of the encoders (``eslmatch.utils.precision``): the ``auto`` rule, bf16 autocast
with float32 outputs, channels-last bf16 feature extraction on real photos (recorded in
``extract_meta.json``, never mixed with fp32 chunks on resume) and bf16 training on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _models import randomize, tiny_bert_config
from eslmatch.config import ESLConfig
from eslmatch.errors import EslmatchError
from eslmatch.model.encoders import bert_from_config
from eslmatch.model.esl import ESLModel
from eslmatch.training import TrainConfig, Trainer
from eslmatch.training.trainer import uses_bf16
from eslmatch.utils import precision as P

_SCRIPT = Path(sys.executable).with_name("eslmatch")
ESLMATCH = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "eslmatch.cli"]


def fake_cpu(monkeypatch, amx: bool, avx512: bool) -> None:
    caps = {
        "capability": "AVX512",
        "cpu_name": "test",
        "architecture": "x86_64",
        "amx_bf16": amx,
        "avx512_bf16": avx512,
    }
    monkeypatch.setattr(P, "cpu_capabilities", lambda: caps)


@pytest.mark.parametrize(
    ("amx", "avx512", "expected"), [(True, True, "bf16"), (False, True, "bf16"), (False, False, "fp32")]
)
def test_auto_follows_the_cpu_bf16_features(monkeypatch, amx, avx512, expected):
    fake_cpu(monkeypatch, amx, avx512)
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.resolve_precision("auto") == expected  # no device: the CPU
    assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert P.resolve_precision("bf16", "cpu") == "bf16"  # asked for: even where emulated


def test_this_cpu_is_reported_as_torch_sees_it():
    caps = P.cpu_capabilities()
    print(f"cpu capabilities: {caps}")
    assert caps["capability"] == torch.backends.cpu.get_cpu_capability()
    native = any(caps[f] for f in P.CPU_BF16_FEATURES)
    assert P.native_bf16("cpu") == native
    assert P.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


def test_unknown_precision_is_one_clear_error():
    with pytest.raises(EslmatchError, match=r"precision 'fp16': choose from auto, fp32, bf16"):
        P.resolve_precision("fp16", "cpu")


def test_encode_in_bf16_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(10, 64)
    with torch.no_grad():
        ref = P.encode_in("fp32", "cpu", layer, x)
        out = P.encode_in("bf16", "cpu", layer, x)
        with P.inference_precision("bf16", "cpu") as used:
            raw = layer(x)
    assert used == "bf16" and raw.dtype == torch.bfloat16
    assert ref.dtype == out.dtype == torch.float32
    assert torch.equal(ref, layer(x))  # fp32 is plain PyTorch
    cos = torch.nn.functional.cosine_similarity(ref, out)
    assert float(cos.min()) > 0.995 and not torch.equal(ref, out)
    assert P.to_float32({"a": (raw, torch.ones(2, dtype=torch.long))})["a"][0].dtype == torch.float32


# ---------------------------------------------------------------------------- extraction
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    return folder


def test_bf16_backbone_channels_last_close_to_fp32(photos):
    from eslmatch.data.files import open_image
    from eslmatch.extract import BackboneOptions, build_backbone

    fp32 = build_backbone("efficientnet-lite0", BackboneOptions(device="cpu", precision="fp32"))
    bf16 = build_backbone("efficientnet-lite0", BackboneOptions(device="cpu", precision="bf16"))
    assert (fp32.precision, fp32.channels_last) == ("fp32", False)
    assert (bf16.precision, bf16.channels_last) == ("bf16", True)
    assert next(bf16.model.parameters()).dtype == torch.float32  # master weights stay float32
    batch = torch.stack([fp32.preprocess(open_image(p)) for p in sorted(photos.iterdir())])
    ref, out = fp32(batch), bf16(batch)
    with torch.inference_mode():  # the fp32 path is the network itself, untouched
        plain = fp32.model.extract_features(batch).flatten(2).transpose(1, 2)
    assert torch.equal(ref, plain)
    assert out.dtype == torch.float32 and out.shape == ref.shape == (4, 49, 1280)
    per_image = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1))
    per_region = torch.nn.functional.cosine_similarity(ref.reshape(-1, 1280), out.reshape(-1, 1280))
    print(
        f"bf16 vs fp32 features: min cosine per image {float(per_image.min()):.5f}, per region {float(per_region.min()):.5f}"
    )
    # measured here: 0.9963 per image, 0.961 per region (bf16 rounding accumulates over 16 blocks)
    assert float(per_image.min()) > 0.99 and float(per_region.min()) > 0.9
    assert fp32.fingerprint() != bf16.fingerprint()  # chunks of one are never reused by the other


def test_extract_records_precision_and_never_mixes_chunks(photos, tmp_path):
    from eslmatch.extract import extract_folder

    out = tmp_path / "ds"
    quiet = dict(chunk=2, batch_size=2, progress=False, device="cpu")
    bf16 = extract_folder(photos, out, precision="bf16", **quiet)
    meta = json.loads((out / "extract_meta.json").read_text())
    assert bf16["precision"] == meta["splits"]["test"]["precision"] == "bf16"
    assert meta["splits"]["test"]["backbone_info"]["channels_last"] is True
    feats_bf16 = np.load(out / "test_ims.npy")
    fp32 = extract_folder(photos, tmp_path / "ref", precision="fp32", **quiet)
    assert fp32["precision"] == "fp32" and fp32["reused_chunks"] == 0
    feats = np.load(tmp_path / "ref" / "test_ims.npy")
    cos = (feats * feats_bf16).sum(-1) / (np.linalg.norm(feats, axis=-1) * np.linalg.norm(feats_bf16, axis=-1) + 1e-12)
    assert cos.min() > 0.9 and cos.mean() > 0.99 and not np.array_equal(feats, feats_bf16)


def test_extract_resume_refuses_chunks_of_another_precision(photos, tmp_path, monkeypatch, caplog):
    from eslmatch.extract import extract_folder

    out = tmp_path / "ds"
    quiet = dict(chunk=2, batch_size=2, progress=False, device="cpu")
    caplog.set_level("INFO", logger="eslmatch")

    def stop_after_first(index: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_folder(photos, out, precision="fp32", on_chunk=stop_after_first, **quiet)
    again = extract_folder(photos, out, precision="bf16", **quiet)
    assert again["reused_chunks"] == 0 and again["computed_images"] == 4
    assert any("starting over" in n for n in caplog.messages)


def test_cli_refuses_an_unknown_precision(photos, tmp_path):
    bad = subprocess.run(
        [*ESLMATCH, "extract", "--images", str(photos), "--out", str(tmp_path / "x"), "--precision", "fp16"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "invalid choice: 'fp16'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- training
def tiny_bert_esl(train_layers: int = 1):
    torch.manual_seed(0)
    bert_cfg = tiny_bert_config()
    bert_cfg.num_hidden_layers = 2
    cfg = ESLConfig(
        embed_size=32, num_levels=2, img_dim=16, text_encoder="bert", text_model=None, text_train_layers=train_layers
    )
    model = ESLModel(cfg, bert_from_config(bert_cfg))
    randomize(model)
    return model.train()


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.relu(torch.randn(n, 5, 16, generator=g))
    img_len = torch.full((n,), 5)
    cap_len = torch.randint(3, 8, (n,), generator=g)
    caps = torch.zeros(n, 8, dtype=torch.long)
    for j, k in enumerate(cap_len.tolist()):
        caps[j, :k] = torch.randint(5, 60, (k,), generator=g)
    return images, img_len, caps, cap_len


def test_bf16_config_values():
    assert TrainConfig(bf16="auto").bf16 == "auto"
    with pytest.raises(EslmatchError, match="bf16 must be true, false or auto"):
        TrainConfig(bf16="yes").validate()
    assert TrainConfig.from_dict({"bf16": "auto"}).bf16 == "auto"
    cpu = torch.device("cpu")
    assert uses_bf16(True, cpu) and not uses_bf16(False, cpu)
    assert uses_bf16("auto", cpu) == (P.resolve_precision("auto", cpu) == "bf16")


def test_one_bf16_cpu_step_moves_weights_and_its_loss_is_close_to_fp32():
    """A bf16 training step on CPU (autocast, float32 master weights) against the same step
    in fp32 from the same weights: the loss agrees to bf16 rounding and the weights move."""
    data = batch()
    cfg = dict(region_drop=0.0, word_mask=0.0, device="cpu", lr=1e-3)
    results = {}
    for mode in (False, True):
        model = tiny_bert_esl()
        before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        trainer = Trainer(model, TrainConfig(bf16=mode, **cfg))
        assert trainer.bf16 is mode
        trainer.start_epoch(0)
        loss = float(trainer.step(*data))
        moved = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
        dtypes = {p.dtype for p in model.parameters()} | {
            s.dtype for st in trainer.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim()
        }
        results[mode] = (loss, len(moved), len(before), dtypes)
    (l32, _, _, _), (l16, moved, total, dtypes) = results[False], results[True]
    print(f"one step: loss fp32 {l32:.5f}, bf16 {l16:.5f}; {moved} of {total} trainable tensors moved")
    assert abs(l16 - l32) <= 0.02 * abs(l32)
    assert moved == total and dtypes == {torch.float32}


def test_frozen_text_cache_keeps_bf16_states_apart():
    """Hidden states of the frozen lower layers computed under bf16 autocast are cached apart
    from float32 ones: an fp32 evaluation after bf16 training reads float32 states."""
    model = tiny_bert_esl().eval()
    images, img_len, caps, cap_len = batch()
    with torch.no_grad():
        ref = model.embed_captions(caps, cap_len)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.embed_captions(caps, cap_len)
        again = model.embed_captions(caps, cap_len)
    enc = model.text_encoder
    fp32, bf16 = enc._caches["fp32"], enc._caches["bf16"]
    assert bf16 is not fp32 and fp32.keys() == bf16.keys()
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)  # computed apart
    assert torch.equal(ref, again)
