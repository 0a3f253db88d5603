"""Atomic files and folders, device names, masks: the shared utilities."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from eslmatch.errors import EslmatchError
from eslmatch.utils import (
    atomic_dir,
    atomic_write_text,
    clean_stale,
    lengths_to_mask,
    masked_mean,
    resolve_device,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_replaces_whole_and_leaves_no_litter(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_write_leaves_the_old_folder_and_no_litter(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_litter_of_a_killed_process_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "index"
    pid = dead_pid()
    (tmp_path / f".index.tmp-{pid}").mkdir()
    (tmp_path / f".index.old-{pid}").mkdir()
    (tmp_path / f".index.tmp-{pid}" / "x").write_text("partial")
    alive = tmp_path / f".index.tmp-{os.getppid()}"  # a live writer's folder is left alone
    alive.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "ok").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "index"]
    assert clean_stale(target) == []


def test_atomic_write_text(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(EslmatchError, match="invalid device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EslmatchError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_masks():
    lengths = torch.tensor([1, 3, 2])
    assert lengths_to_mask(lengths, 3).tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    x = torch.arange(18, dtype=torch.float32).view(3, 3, 2)
    expected = torch.stack([x[i, :n].mean(0) for i, n in enumerate(lengths.tolist())])
    assert torch.allclose(masked_mean(x, lengths), expected)


def _half_replaced(tmp_path, keep_new: bool):
    """A replace_dir that died between its two renames: ``dst`` moved aside, ``src`` not yet in."""
    import json

    dst, src = tmp_path / "index", tmp_path / ".index.tmp-4242"
    old = tmp_path / ".index.old-4242"
    old.mkdir()
    (old / "v").write_text("old")
    if keep_new:
        src.mkdir()
        (src / "v").write_text("new")
    (tmp_path / ".index.replace").write_text(json.dumps({"new": src.name, "old": old.name, "pid": 2**22 + 1}))
    return dst


@pytest.mark.parametrize("keep_new, want", [(True, "new"), (False, "old")])
def test_a_replacement_killed_between_its_renames_is_finished_or_rolled_back(tmp_path, keep_new, want):
    from eslmatch.utils import atomic_dir, recover_replace

    dst = _half_replaced(tmp_path, keep_new)
    assert not dst.exists()  # what 'index info' used to call "no such index"
    assert recover_replace(dst) is True
    assert (dst / "v").read_text() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # journal and the other copy gone
    assert recover_replace(dst) is False  # nothing left to do
    # the next atomic write recovers first, never deleting both complete copies
    dst2 = _half_replaced(tmp_path / "b", keep_new) if (tmp_path / "b").mkdir() is None else None
    with atomic_dir(dst2) as tmp:
        assert (dst2 / "v").read_text() == want
        (tmp / "v").write_text("newer")
    assert (dst2 / "v").read_text() == "newer"
