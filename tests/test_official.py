"""Parity with the released implementation and safe loading of released checkpoints."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch

import eslmatch
from _models import FIXTURES, make_released_checkpoint, needs_fixtures, released_inputs
from eslmatch.errors import CheckpointError
from released_forward import image_embed, levels, released_similarity

CKPT = FIXTURES / "official_adaptive.pth.tar"
IO = FIXTURES / "official_adaptive_io.npz"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fixture_io():
    return dict(np.load(IO))


@pytest.fixture(scope="module")
def official():
    return eslmatch.load_official_checkpoint(CKPT)


def released_image_levels(images: torch.Tensor) -> np.ndarray:
    """The level features of the released transcription (tests/released_forward.py), float32."""
    from eslmatch.compat.official import read_checkpoint

    img, _, sim = ({k.removeprefix("module."): v for k, v in sd.items()} for sd in read_checkpoint(CKPT)["model"])
    n_levels = len([k for k in sim if k.startswith("plus_encoder.encoders_1.image_levels.")])
    with torch.no_grad():
        return levels(sim, image_embed(img, images), "image", n_levels, False).numpy()


@needs_fixtures
def test_fixture_parity_every_stage(official, fixture_io):
    d = fixture_io
    images = torch.from_numpy(d["images"])
    caps, lens = torch.from_numpy(d["captions"]), torch.from_numpy(d["cap_lens"])
    valid = np.arange(caps.shape[1])[None, :] < d["cap_lens"][:, None]
    with torch.no_grad():
        assert rel_err(official.encode_images(images), d["img_emb"]) <= 1e-5
        assert rel_err(official.encode_captions(caps, lens).numpy()[valid], d["cap_emb"][valid]) <= 1e-5
        for ours, released, ref in (
            (official.embed_images(images), released_image_levels(images), d["img_levels"]),
            (official.embed_captions(caps, lens).numpy()[valid], None, d["cap_levels"][valid]),
        ):
            if released is None:
                assert rel_err(ours, ref) <= 1e-5
                continue
            # The deepest level (2-d vectors, l2-normalised after sums that nearly cancel) amplifies
            # float32 rounding: on some CPUs (AVX-512 kernels) the released formula itself, run here
            # in float32, is ~2.4e-5 from the fixture written on another machine. So the level
            # features are held to the released code run here (1e-5), and to the fixture within 1e-5
            # beyond the released code's own distance from it; the scores below stay within 1e-5.
            assert rel_err(ours, released) <= 1e-5
            assert rel_err(ours, ref) <= 1e-5 + rel_err(released, ref)
        sims = official.similarity(images, torch.from_numpy(d["image_lengths"]).long(), caps, lens)
    assert sims.shape == (12, 20)
    assert rel_err(sims, d["sims"]) <= 1e-5


@needs_fixtures
def test_loaded_model_is_in_eval_mode_and_adaptive(official):
    assert not official.training
    assert official.config.strategy == "adaptive"
    assert official.config.embed_size == 512 and official.config.num_levels == 8
    assert official.text_encoder.backbone.config.num_hidden_layers == 1
    assert official.text_encoder.backbone.config.intermediate_size == 128


@needs_fixtures
def test_transcription_of_released_forward_matches_fixture(fixture_io):
    """The test-side transcription used for ESL-H below reproduces the real fixture."""
    from eslmatch.compat.official import read_checkpoint

    d = fixture_io
    sims = released_similarity(
        read_checkpoint(CKPT),
        torch.from_numpy(d["images"]),
        torch.from_numpy(d["captions"]),
        torch.from_numpy(d["cap_lens"]),
    )
    assert rel_err(sims, d["sims"]) <= 1e-5


@pytest.mark.parametrize(
    "strategy,embed,k,levels",
    [
        ("heuristic", 512, 2, 8),
        ("heuristic", 64, 2, 3),
        ("heuristic", 81, 3, 4),
        ("adaptive", 64, 2, 5),
        ("adaptive", 48, 4, 2),
    ],
)
def test_released_format_parity_both_strategies(tmp_path, strategy, embed, k, levels):
    path = tmp_path / "ckpt.pth.tar"
    ckpt = make_released_checkpoint(path, strategy, embed_size=embed, kernel_size=k, num_levels=levels)
    model = eslmatch.load_official_checkpoint(path)
    assert model.config.strategy == strategy and model.config.num_levels == levels
    images, caps, lens = released_inputs()
    with torch.no_grad():
        ours = model.similarity(images, None, caps, lens)
    ref = released_similarity(ckpt, images, caps, lens)
    assert rel_err(ours, ref) <= 1e-5


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        eslmatch.load_official_checkpoint(tmp_path / "nope.pth.tar")


@needs_fixtures
def test_truncated_file(tmp_path):
    data = CKPT.read_bytes()
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        eslmatch.load_official_checkpoint(bad)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('ESL_EVIL_MARKER', '/tmp/esl-evil-marker')}",))


def test_disallowed_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("ESL_EVIL_MARKER", str(marker))
    bad = tmp_path / "evil.pth.tar"
    torch.save({"model": [{}, {}, {}], "opt": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="refused to load"):
        eslmatch.load_official_checkpoint(bad)
    assert not marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    bad = tmp_path / "plain.pkl"
    bad.write_bytes(pickle.dumps({"model": [_Evil()]}))
    with pytest.raises(CheckpointError):
        eslmatch.load_official_checkpoint(bad)


def test_checkpoint_of_another_model_names_missing_keys(tmp_path):
    path = tmp_path / "other.pth.tar"
    ckpt = make_released_checkpoint(path, "adaptive")
    del ckpt["model"][2]["module.sims.calculator_1.lynorm_1.bias"]
    ckpt["model"][0]["module.extra_head.weight"] = torch.zeros(2)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        eslmatch.load_official_checkpoint(path)
    msg = str(info.value)
    assert "correspondence.ln_bias.1" in msg or "lynorm_1.bias" in msg
    assert "extra_head.weight" in msg


def test_not_an_esl_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match="not a released ESL checkpoint"):
        eslmatch.load_official_checkpoint(path)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@needs_fixtures
def test_convert_then_from_pretrained_reloads_identical_scores(tmp_path, fixture_io, official, no_network):
    from eslmatch.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(CKPT), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "text_encoder" / "config.json").is_file()
    again = eslmatch.ESLModel.from_pretrained(out)
    d = fixture_io
    args = (torch.from_numpy(d["images"]), None, torch.from_numpy(d["captions"]), torch.from_numpy(d["cap_lens"]))
    with torch.no_grad():
        a, b = official.similarity(*args), again.similarity(*args)
    assert torch.equal(a, b)
    assert rel_err(b, d["sims"]) <= 1e-5
