"""Nothing is lost: ``kill -9`` at random moments of add, delete, update and compact on a file
gallery. Afterwards the gallery opens, its checksums verify, its content equals the state
before or after the killed operation, and the next operation leaves no temporary file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from _models import randomize, tiny_gru_model
from _wait import HUNG, wait_until
from eslmatch import VSEModel
from eslmatch.cli import main
from eslmatch.retrieval import BuildOptions, FileStore, build_gallery, open_gallery, regions

N, N_ADD, R, D, SHARD = 20000, 20000, 6, 16, 2000
KILLS_PER_OP = 6
OPS = ("add", "delete", "update", "compact")
SRC = str(Path(__file__).resolve().parents[1] / "src")
WORKER = """
import sys
import numpy as np
from eslmatch.retrieval import BuildOptions, open_gallery, regions

path, op, arg = sys.argv[1:4]
g = open_gallery(path)
if op == "add":
    feats = np.load(arg)
    ids = [f"new{i:05d}" for i in range(len(feats))]
    meta = {i: {"group": j % 10, "tag": "added"} for j, i in enumerate(ids)}
    src = regions(feats, img_dim=feats.shape[2], ids=ids)
    _ = g.model
    print("ready", flush=True)
    g.add(src, meta, options=BuildOptions(progress=False, batch_size=200))
else:
    print("ready", flush=True)
    if op == "delete":
        g.delete(where="group == 3")
    elif op == "update":
        g.update(arg)
    else:
        g.compact()
print("done", flush=True)
"""


def state(path: Path) -> dict[str, tuple]:
    """What the gallery holds: every live item's row, path, metadata (but ``added``) and vector
    (a compaction changes only the rows)."""
    store = FileStore.open(path)
    with store.snapshot() as s:
        rows = np.setdiff1d(np.arange(s.rows), s.deleted)
        recs = {r.row: r for r in store.select(rows=rows.tolist())}
        vectors = store.vectors(rows.tolist())
    return {
        recs[int(r)].id: (
            int(r),
            recs[int(r)].path,
            json.dumps(recs[int(r)].metadata, sort_keys=True),
            vectors[j].tobytes(),
        )
        for j, r in enumerate(rows)
    }


def leftovers(path: Path) -> list[str]:
    """Files no committed layout names, and temporary files."""
    store = FileStore.open(path)
    layout = store.layout()
    named = {s["dir"] for s in layout["shards"]} | {(layout.get("faiss") or {}).get("file")}
    out = [str(p.relative_to(path)) for p in path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".replace")]
    out += [f"shards/{p.name}" for p in (path / "shards").iterdir() if f"shards/{p.name}" not in named]
    out += [f"faiss/{p.name}" for p in (path / "faiss").iterdir() if f"faiss/{p.name}" not in named]
    if (path / ".staging").exists():
        out.append(".staging")
    out += [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    return out


def prepare(root: Path, n: int, n_add: int, shard: int, ops: tuple[str, ...]) -> Prepared:
    """A gallery of ``n`` items in ``root/base`` (one group deleted, for compact to reclaim), the
    inputs of each operation, the state before, and for each of ``ops`` the state after it ran
    to its end once and how long it took."""
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    model.eval().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.standard_normal((n, R, D)), 0).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(n)]
    meta = {i: {"group": j % 10, "tag": ["a", "b", "c"][j % 3]} for j, i in enumerate(ids)}
    opts = BuildOptions(progress=False, shard_rows=shard, batch_size=500)
    g = build_gallery(
        model, regions(feats, img_dim=D, ids=ids), root / "base", metadata=meta, options=opts, model_path=root / "model"
    )
    g.delete(where="group == 9")  # something for compact to reclaim
    np.save(root / "more.npy", np.maximum(rng.standard_normal((n_add, R, D)), 0).astype(np.float32))
    (root / "meta.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "tag": "changed", "rating": 2.5}) + "\n"
            for i in ids[: n * 2 // 5]
            if int(i[3:]) % 10 != 9
        )
    )
    args = {"add": str(root / "more.npy"), "delete": "-", "update": str(root / "meta.jsonl"), "compact": "-"}
    before = state(root / "base")
    after, seconds = {}, {}
    for op in ops:  # each operation run to its end once: the state after, and how long it takes
        target = root / f"after-{op}"
        shutil.copytree(root / "base", target)
        proc = run_worker(target, op, args[op])
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()  # the operation itself: from "ready" to "done"
        assert proc.stdout.readline().strip() == "done"
        seconds[op] = time.monotonic() - t0
        assert proc.wait(HUNG) == 0
        after[op] = state(target)
        assert after[op] != before
    return Prepared(root, args, before, after, seconds)


@dataclass
class Prepared:
    root: Path
    args: dict[str, str]
    before: dict[str, tuple]
    after: dict[str, dict[str, tuple]]
    seconds: dict[str, float]

    def kill_once(self, op: str, delay: float, target: Path) -> str:
        """Run ``op`` on a copy of the gallery in ``target``, ``kill -9`` it ``delay`` seconds after
        it is ready, and check what is left: "before" or "after" (anything else fails); the next
        operation leaves no temporary file."""
        shutil.copytree(self.root / "base", target)
        proc = run_worker(target, op, self.args[op])
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(HUNG)
        got = state(target)  # opens (finishing or rolling back what the kill left)
        FileStore.open(target, verify=True)
        outcome = "before" if got == self.before else "after" if got == self.after[op] else "neither"
        assert outcome != "neither", (op, delay)
        g = open_gallery(target)  # the next operation cleans what the killed one left
        g.update({"img00000": {"tag": "next"}})
        assert leftovers(target) == [], (op, delay, leftovers(target))
        return outcome


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Prepared:
    return prepare(tmp_path_factory.mktemp("crash"), N, N_ADD, SHARD, OPS)


def run_worker(path: Path, op: str, arg: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), op, arg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def test_kill_9_once_in_the_middle_of_an_add(tmp_path, capsys):
    """The fast tier's representative of the loop below: a small gallery, one kill -9 half-way
    through an add (by the time a full add took), then the same checks."""
    small = prepare(tmp_path / "small", 2000, 2000, 200, ("add",))
    outcome = small.kill_once("add", small.seconds["add"] / 2, tmp_path / "killed")
    assert main(["index", "info", str(tmp_path / "killed"), "--verify"]) == 0
    with capsys.disabled():
        print(f"\nkill -9 half-way through an add (it takes {small.seconds['add']:.1f} s): {outcome}")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_kill_9_at_random_moments(setup, op, tmp_path, capsys):
    rng = np.random.default_rng(abs(hash(op)) % 2**32)
    outcomes = []
    for trial in range(KILLS_PER_OP):
        # a few land after the end: both outcomes seen
        delay = float(rng.uniform(0.0, 1.5 * setup.seconds[op]))
        outcomes.append(setup.kill_once(op, delay, tmp_path / f"g{trial}"))
    assert main(["index", "info", str(tmp_path / f"g{KILLS_PER_OP - 1}"), "--verify"]) == 0
    with capsys.disabled():
        print(f"\nkill -9 during {op} x{KILLS_PER_OP} (op takes {setup.seconds[op]:.1f} s): {outcomes}")


# ---------------------------------------------------------------------- kill -9 during index sync
SYNC_WORKER = """
import sys
from eslmatch.retrieval import BuildOptions, open_gallery

g = open_gallery(sys.argv[1])
_ = g.model
print("ready", flush=True)
g.sync(options=BuildOptions(progress=False, batch_size=8))
print("done", flush=True)
"""
SYNC_KILLS = 15


def library_state(path: Path) -> dict[str, tuple]:
    """Every live item of a library gallery: path, metadata (but ``added``) and vector."""
    store = FileStore.open(path)
    recs = store.select()
    vectors = store.vectors([r.row for r in recs])
    return {r.id: (r.path, json.dumps(r.metadata, sort_keys=True), vectors[j].tobytes()) for j, r in enumerate(recs)}


@dataclass
class SyncSetup:
    root: Path
    before: dict[str, tuple]
    after: dict[str, tuple]
    seconds: float

    def kill_once(self, delay: float, target: Path) -> str:
        """``kill -9`` a sync of a copy of the gallery ``delay`` s after it is ready: the gallery
        opens and verifies, each item is as before or as after the sync, and a new sync
        completes it to the state an uninterrupted one leaves."""
        shutil.copytree(self.root / "base", target)
        proc = subprocess.Popen(
            [sys.executable, "-c", SYNC_WORKER, str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))},
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(HUNG)
        FileStore.open(target, verify=True)
        got = library_state(target)
        assert set(got) <= set(self.before) | set(self.after), (delay, set(got) - set(self.before) - set(self.after))
        mixed = [i for i, v in got.items() if v not in (self.before.get(i), self.after.get(i))]
        assert not mixed, (delay, mixed[:3])
        outcome = "before" if got == self.before else "after" if got == self.after else "part"
        open_gallery(target).sync(options=BuildOptions(progress=False))
        assert library_state(target) == self.after, delay
        assert leftovers(target) == [], (delay, leftovers(target))
        return outcome


def prepare_sync(root: Path, per_root: int) -> SyncSetup:
    """A library of two roots (same file names in both) in a gallery with tags, then changes on
    disk (new, overwritten, moved, deleted files) for a sync to find; the states before and after."""
    from PIL import Image

    from _models import TINY_CLIP
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel

    def photo(path: Path, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)

    import torch

    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).eval()
    model.save_pretrained(root / "model")
    libs = [root / "a", root / "b"]
    for r, lib in enumerate(libs):
        for i in range(per_root):
            photo(lib / f"img{i:03d}.png", 1000 * r + i)
    g = build_gallery(
        model, libs, root / "base", options=BuildOptions(progress=False, shard_rows=16), model_path=root / "model"
    )
    g.update({i: {"tag": f"t{j % 5}"} for j, i in enumerate(g.ids())})
    for i in range(0, per_root // 2, 5):
        photo(libs[0] / f"img{i:03d}.png", 9000 + i)  # changed
    for i in range(1, per_root // 2, 10):
        os.rename(libs[1] / f"img{i:03d}.png", libs[1] / f"moved{i:03d}.png")
    for i in range(per_root // 2 + 1, per_root, 10):
        os.remove(libs[0] / f"img{i:03d}.png")
    for i in range(per_root // 2):
        photo(libs[i % 2] / "new" / f"n{i:03d}.png", 20000 + i)
    before = library_state(root / "base")
    shutil.copytree(root / "base", root / "after")
    t0 = time.monotonic()
    open_gallery(root / "after").sync(options=BuildOptions(progress=False, batch_size=8))
    seconds = time.monotonic() - t0
    return SyncSetup(root, before, library_state(root / "after"), seconds)


def test_kill_9_once_in_the_middle_of_a_sync(tmp_path, capsys):
    setup = prepare_sync(tmp_path, 40)
    outcome = setup.kill_once(setup.seconds / 2, tmp_path / "killed")
    with capsys.disabled():
        print(f"\nkill -9 half-way through a sync (it takes {setup.seconds:.1f} s): {outcome}")


@pytest.mark.slow
def test_kill_9_at_random_moments_of_a_sync(tmp_path, capsys):
    setup = prepare_sync(tmp_path, 120)
    rng = np.random.default_rng(30)
    outcomes = [
        setup.kill_once(float(rng.uniform(0.0, 1.3 * setup.seconds)), tmp_path / f"k{trial}")
        for trial in range(SYNC_KILLS)
    ]
    assert main(["index", "info", str(tmp_path / f"k{SYNC_KILLS - 1}"), "--verify"]) == 0
    with capsys.disabled():
        print(f"\nkill -9 during sync x{SYNC_KILLS} (sync takes {setup.seconds:.1f} s): {outcomes}")


def test_index_info_says_what_an_interrupted_write_left(tmp_path, capsys):
    """Issue 34 (minor): ``.staging/`` stays after a kill until the next write, unsaid. ``index
    info`` now says how much it holds and what becomes of it; the next write removes it."""
    small = prepare(tmp_path / "small", 400, N_ADD, SHARD, ())
    target = tmp_path / "g"
    shutil.copytree(small.root / "base", target)
    proc = run_worker(target, "add", small.args["add"])
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    staged = lambda: any(p.is_file() for p in (target / ".staging").rglob("*"))  # noqa: E731
    wait_until(lambda: staged() or proc.poll() is not None, "the add to stage a chunk", every=0.01)
    assert proc.poll() is None, "the add ended before anything could be seen staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait(HUNG)
    capsys.readouterr()
    assert main(["index", "info", str(target), "--verify"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("staging")]
    assert len(line) == 1 and "interrupted write" in line[0], line
    open_gallery(target).update({"img00000": {"tag": "next"}})
    assert main(["index", "info", str(target)]) == 0
    assert "staging" not in capsys.readouterr().out and not (target / ".staging").exists()
