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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _models import randomize, tiny_gru_model
from _wait import HUNG, wait_until
from eslmatch import VSEModel
from eslmatch.cli import main
from eslmatch.retrieval import BuildOptions, FileStore, build_gallery, open_gallery, regions
from eslmatch.retrieval.milvus.store import MilvusStore
from eslmatch.retrieval.store import GalleryStore
from milvus_server import MilvusServer, has_grpc_server

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

g = open_gallery(*sys.argv[1:])
_ = g.model
print("ready", flush=True)
g.sync(options=BuildOptions(progress=False, batch_size=8))
print("done", flush=True)
"""
SYNC_KILLS = 15


def library_state(store: GalleryStore) -> dict[str, tuple]:
    """Every live item of a library gallery: path, metadata (but ``added``) and vector."""
    recs = store.select()
    vectors = store.vectors([r.row for r in recs])
    store.close()
    return {r.id: (r.path, json.dumps(r.metadata, sort_keys=True), vectors[j].tobytes()) for j, r in enumerate(recs)}


class Place:
    """Where the galleries of a sync test live: folders of the file store, or collections of a
    Milvus server (``uri``)."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root, self.uri = root, uri

    def args(self, name: str) -> list[str]:
        return [self.uri, name] if self.uri else [str(self.root / name)]

    def store(self, name: str, verify: bool = False) -> GalleryStore:
        if self.uri:
            return MilvusStore.open(self.uri, name)  # Milvus keeps its own checksums
        return FileStore.open(self.root / name, verify=verify)

    def state(self, name: str) -> dict[str, tuple]:
        return library_state(self.store(name))


@dataclass
class SyncSetup:
    """A library of two roots (``a``, ``b``: the same file names in both) and a gallery of it
    with tags (``base``); then changes on disk (new, overwritten, moved, deleted files) for a
    sync to find. ``before`` / ``after``: the gallery's state before and after a sync."""

    root: Path
    place: Place
    model: Any
    per_root: int
    before: dict[str, tuple] = field(default_factory=dict)
    after: dict[str, tuple] = field(default_factory=dict)
    seconds: float = 0.0

    def photo(self, path: Path, seed: int) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)

    @property
    def libs(self) -> list[Path]:
        return [self.root / "a", self.root / "b"]

    def prepare(self) -> SyncSetup:
        n = self.per_root
        self.model.save_pretrained(self.root / "model")
        for r, lib in enumerate(self.libs):
            for i in range(n):
                self.photo(lib / f"img{i:03d}.png", 1000 * r + i)
        if self.place.uri:  # a collection cannot be copied: keep the folders as they were to build each
            for lib in self.libs:
                shutil.copytree(lib, lib.with_suffix(".before"))
        self.build("base")
        for i in range(0, n // 2, 5):
            self.photo(self.libs[0] / f"img{i:03d}.png", 9000 + i)  # changed
        for i in range(1, n // 2, 10):
            os.rename(self.libs[1] / f"img{i:03d}.png", self.libs[1] / f"moved{i:03d}.png")
        for i in range(n // 2 + 1, n, 10):
            os.remove(self.libs[0] / f"img{i:03d}.png")
        for i in range(n // 2):
            self.photo(self.libs[i % 2] / "new" / f"n{i:03d}.png", 20000 + i)
        self.before = self.place.state("base")
        self.copy("after")
        t0 = time.monotonic()
        open_gallery(*self.place.args("after")).sync(options=BuildOptions(progress=False, batch_size=8))
        self.seconds = time.monotonic() - t0
        self.after = self.place.state("after")
        return self

    def build(self, name: str) -> None:
        g = build_gallery(
            self.model,
            self.libs,
            *self.place.args(name),
            options=BuildOptions(progress=False, shard_rows=16),
            model_path=self.root / "model",
            **({"milvus": {"overwrite": True}} if self.place.uri else {}),
        )
        g.update({i: {"tag": f"t{j % 5}"} for j, i in enumerate(g.ids())})
        g.close()

    def copy(self, name: str) -> None:
        """A gallery ``name`` equal to ``base``: a copy of its folder, or (Milvus) built again
        from the folders as they were, with the same tags."""
        if not self.place.uri:
            shutil.copytree(self.root / "base", self.root / name)
            return
        for lib in self.libs:
            os.rename(lib, lib.with_suffix(".after"))
            os.rename(lib.with_suffix(".before"), lib)
        try:
            self.build(name)
        finally:
            for lib in self.libs:
                os.rename(lib, lib.with_suffix(".before"))
                os.rename(lib.with_suffix(".after"), lib)

    def kill_once(self, delay: float, name: str) -> str:
        """``kill -9`` a sync of a copy of the gallery ``delay`` s after it is ready: the gallery
        opens and verifies, each item is as before or as after the sync, and a new sync
        completes it to the state an uninterrupted one leaves."""
        self.copy(name)
        proc = subprocess.Popen(
            [sys.executable, "-c", SYNC_WORKER, *self.place.args(name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))},
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(HUNG)
        self.place.store(name, verify=True).close()
        got = self.place.state(name)
        assert set(got) <= set(self.before) | set(self.after), (delay, set(got) - set(self.before) - set(self.after))
        mixed = [i for i, v in got.items() if v not in (self.before.get(i), self.after.get(i))]
        assert not mixed, (delay, mixed[:3])
        outcome = "before" if got == self.before else "after" if got == self.after else "part"
        open_gallery(*self.place.args(name)).sync(options=BuildOptions(progress=False))
        assert self.place.state(name) == self.after, delay
        if not self.place.uri:
            assert leftovers(self.root / name) == [], (delay, leftovers(self.root / name))
        return outcome


def prepare_sync(root: Path, per_root: int, uri: str | None = None) -> SyncSetup:
    import torch

    from _models import TINY_CLIP
    from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel

    torch.manual_seed(0)
    model = ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).eval()
    return SyncSetup(root, Place(root, uri), model, per_root).prepare()


def test_kill_9_once_in_the_middle_of_a_sync(tmp_path, capsys):
    setup = prepare_sync(tmp_path, 40)
    outcome = setup.kill_once(setup.seconds / 2, "killed")
    with capsys.disabled():
        print(f"\nkill -9 half-way through a sync (it takes {setup.seconds:.1f} s): {outcome}")


def kill_during_syncs(setup: SyncSetup) -> list[str]:
    rng = np.random.default_rng(30)
    return [setup.kill_once(float(rng.uniform(0.0, 1.3 * setup.seconds)), f"k{t}") for t in range(SYNC_KILLS)]


@pytest.mark.slow
def test_kill_9_at_random_moments_of_a_sync(tmp_path, capsys):
    setup = prepare_sync(tmp_path, 120)
    outcomes = kill_during_syncs(setup)
    assert main(["index", "info", str(tmp_path / f"k{SYNC_KILLS - 1}"), "--verify"]) == 0
    with capsys.disabled():
        print(f"\nkill -9 during sync x{SYNC_KILLS} (sync takes {setup.seconds:.1f} s): {outcomes}")


@pytest.mark.slow
@pytest.mark.skipif(not has_grpc_server(), reason="milvus-lite has no gRPC server")
def test_kill_9_at_random_moments_of_a_milvus_sync(tmp_path, capsys):
    """The same on Milvus (a milvus-lite server in its own process; the sync is killed)."""
    server = MilvusServer(tmp_path / "milvus").start()
    try:
        setup = prepare_sync(tmp_path, 60, server.uri)
        outcomes = kill_during_syncs(setup)
        args = ["index", "info", "--milvus", server.uri, "--collection", f"k{SYNC_KILLS - 1}", "--verify"]
        assert main(args) == 0
    finally:
        server.stop()
    with capsys.disabled():
        print(f"\nkill -9 during a Milvus sync x{SYNC_KILLS} (sync takes {setup.seconds:.1f} s): {outcomes}")


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
