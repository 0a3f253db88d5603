"""A gallery that mirrors a photo library (``retrieval/library.py``): roots, stable ids, ``index
sync``, exclusions and ``index restore``, the same on the file store and on Milvus (milvus-lite).

Each test of a defect of issue 30 names it; the acceptance check is
:func:`test_sync_equals_a_fresh_build`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _models import TINY_CLIP
from eslmatch.cli import main
from eslmatch.factory import load_model
from eslmatch.model.esl_clip import ESLClipConfig, ESLClipModel
from eslmatch.retrieval import BuildOptions, build_gallery, open_gallery
from eslmatch.retrieval.policy import item_record
from milvus_server import MilvusServer

QUIET = BuildOptions(progress=False)
STORES = ("files", "milvus")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model") / "clip"
    ESLClipModel(ESLClipConfig(num_levels=2, clip=TINY_CLIP)).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    srv = MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield srv
    srv.stop()


class Place:
    """Where galleries of one store go: ``build(name, folders)`` and ``open(name)``."""

    def __init__(self, store: str, root: Path, request: pytest.FixtureRequest) -> None:
        self.store, self.root = store, root
        self.uri = request.getfixturevalue("milvus").uri if store == "milvus" else None

    def build(self, model, name: str, folders, **kw):
        if self.uri is not None:
            return build_gallery(model, folders, self.uri, name, options=QUIET, milvus={"overwrite": True}, **kw)
        return build_gallery(model, folders, self.root / name, options=QUIET, **kw)

    def open(self, model, name: str):
        return open_gallery(self.uri, name, model=model) if self.uri else open_gallery(self.root / name, model=model)


@pytest.fixture(params=STORES)
def place(request, tmp_path) -> Place:
    return Place(request.param, tmp_path, request)


def photo(path: Path, seed: int, size: int = 40) -> Path:
    """A small random photo (its pixels fixed by ``seed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def vector(g, item_id: str) -> np.ndarray:
    return np.asarray(g.store.vectors([item_record(g.store, item_id).row])[0])


def by_path(g) -> dict[str, dict]:
    """Every live item, keyed by its file's path: id and fields (but ``added``)."""
    return {r.path: {"id": r.id, **r.metadata} for r in g.store.select()}


# ---------------------------------------------------------------------- the defects of issue 30
def test_same_named_photos_in_two_roots_never_collide(model, place, tmp_path):
    """Defect 3: ``cp photos/rocket.jpg cameraB/chelsea.jpg; index add --images cameraB/`` added 0
    items ("1 already in the gallery") and with replace overwrote the real chelsea."""
    photos, camera_b = tmp_path / "photos", tmp_path / "cameraB"
    for i, name in enumerate(("chelsea", "coffee", "rocket")):
        photo(photos / f"{name}.jpg", i)
    camera_b.mkdir()
    shutil.copy(photos / "rocket.jpg", camera_b / "chelsea.jpg")
    g = place.build(model, "g", photos)
    chelsea = vector(g, "chelsea")
    for on_duplicate in ("skip", "replace"):
        rep = g.add(camera_b, on_duplicate=on_duplicate, options=QUIET)
        assert sorted(g.ids()) == ["cameraB/chelsea", "chelsea", "coffee", "rocket"]
        np.testing.assert_array_equal(vector(g, "chelsea"), chelsea)  # the real chelsea untouched
        np.testing.assert_allclose(vector(g, "cameraB/chelsea"), vector(g, "rocket"), atol=1e-6)
        assert g.metadata("cameraB/chelsea")["root"] == "cameraB"
    assert rep.count == 4
    assert [r["label"] for r in g.store.library()["roots"]] == ["photos", "cameraB"]


def test_a_changed_photo_is_re_encoded_keeping_its_tags(model, place, tmp_path):
    """Defect 4: after overwriting coffee.jpg, ``add`` kept the old vector silently, and
    ``--on-duplicate replace`` erased every replaced item's metadata."""
    photos = tmp_path / "photos"
    for i in range(5):
        photo(photos / f"p{i}.jpg", i)
    g = place.build(model, "g", photos)
    g.update({f"p{i}": {"starred": True} for i in range(5)})
    old = vector(g, "p1")
    photo(photos / "p1.jpg", 99)  # the user edits the photo
    rep = g.add(photos, options=QUIET)
    assert (rep.changed, rep.added, rep.duplicates) == (1, 0, 4)
    assert not np.allclose(vector(g, "p1"), old)
    assert g.metadata("p1")["starred"] is True
    g.add(photos, on_duplicate="replace", options=QUIET)
    assert len(g.search("a photo", k=10, where="starred")) == 5  # was 0 of 59
    assert g.sync().changes == 0


def no_encoding_on_the_file_store(place, g, monkeypatch) -> None:
    """The file store keeps a deleted item's vector until ``compact`` (a return is not
    encoded); Milvus deletes are final (it is)."""
    if place.store == "files":
        monkeypatch.setattr(type(g), "_write", lambda *a, **k: pytest.fail("a file that came back was re-encoded"))
    else:
        monkeypatch.undo()


def test_deleted_files_leave_the_results_and_come_back_with_their_tags(model, place, tmp_path, monkeypatch):
    """Defect 5: a photo removed from disk kept being returned. After ``sync`` it is not; its
    metadata is kept until ``compact``, so when the file returns it has its id and tags (and,
    on the file store, its vector, without encoding)."""
    photos = tmp_path / "photos"
    for i in range(4):
        photo(photos / f"p{i}.jpg", i)
    g = place.build(model, "g", photos)
    g.update({"p2": {"album": "summer"}})
    before = vector(g, "p2")
    kept = tmp_path / "elsewhere.jpg"
    shutil.move(photos / "p2.jpg", kept)
    plan = g.sync()
    assert (len(plan.gone), plan.changes) == (1, 1)
    assert "p2" not in g.ids()
    assert all(h.id != "p2" for h in g.search("a photo", k=10))
    assert g.store.library()["gone"]["p2"]["metadata"] == {"album": "summer"}
    shutil.move(kept, photos / "back" / "p2.jpg") if (photos / "back").mkdir() is None else None
    no_encoding_on_the_file_store(place, g, monkeypatch)
    plan = g.sync()
    assert plan.counts()["new"] == 1 and g.metadata("p2")["album"] == "summer"
    assert g.metadata("p2")["file"] == "back/p2.jpg"
    assert g.search("a photo", k=10)[0].id in g.ids()
    np.testing.assert_allclose(vector(g, "p2"), before, atol=1e-6)
    assert g.sync().changes == 0
    # gone, then back in its place with other content: encoded anew, never the stale vector
    monkeypatch.undo()
    (photos / "back" / "p2.jpg").unlink()
    assert len(g.sync().gone) == 1
    photo(photos / "back" / "p2.jpg", 77)
    assert g.sync().counts()["new"] == 1
    assert not np.allclose(vector(g, "p2"), before, atol=1e-3) and g.metadata("p2")["album"] == "summer"
    # gone, compacted (forgotten), back: a new item
    (photos / "back" / "p2.jpg").unlink()
    g.sync()
    g.compact()
    photo(photos / "back" / "p2.jpg", 77)
    assert g.sync().counts()["new"] == 1 and "album" not in g.metadata("back/p2")


def test_a_deleted_photo_stays_deleted_until_restored(model, place, tmp_path, capsys, monkeypatch):
    """Defect 7: ``index delete --ids coffee`` then ``index add --images photos/`` encoded and
    returned the deleted photo again."""
    photos = tmp_path / "photos"
    for i, name in enumerate(("chelsea", "coffee", "rocket", "camera", "moon")):
        photo(photos / f"{name}.jpg", i)
    g = place.build(model, "g", photos)
    g.update({"coffee": {"cup": "espresso"}})
    assert g.delete(["coffee"]) == 1
    rep = g.add(photos, options=QUIET)
    assert (rep.added, rep.excluded, rep.duplicates) == (0, 1, 4)
    plan = g.sync()
    assert (plan.changes, plan.excluded) == (0, 1)
    assert "coffee" not in g.ids()
    before = len(g)
    with monkeypatch.context() as m:
        no_encoding_on_the_file_store(place, g, m)
        g.restore(["coffee"], options=QUIET)
    assert len(g) == before + 1
    assert g.metadata("coffee")["cup"] == "espresso"
    assert g.sync().excluded == 0 and len(g) == 5
    with pytest.raises(Exception, match="'moon' is not an excluded item"):
        g.restore(["moon"])
    # an explicit add of the file brings it back too; a single new file is added; a file in no root is refused
    g.delete(["coffee"])
    assert g.add(photos / "coffee.jpg", options=QUIET).added == 1 and g.metadata("coffee")["cup"] == "espresso"
    photo(photos / "sub" / "new.jpg", 50)
    assert g.add(photos / "sub" / "new.jpg", options=QUIET).added == 1 and g.metadata("sub/new")["folder"] == "sub"
    photo(tmp_path / "elsewhere.jpg", 51)
    with pytest.raises(Exception, match="is in none of the gallery's folders"):
        g.add(tmp_path / "elsewhere.jpg")


def test_moves_keep_the_vector_and_metadata_without_re_encoding(model, place, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    for i in range(4):
        photo(photos / f"p{i}.jpg", i)
    g = place.build(model, "g", photos)
    g.update({"p0": {"album": "x"}})
    before = vector(g, "p0")
    (photos / "2024").mkdir()
    os.rename(photos / "p0.jpg", photos / "2024" / "renamed.jpg")
    monkeypatch.setattr(type(g), "_write", lambda *a, **k: pytest.fail("a move re-encoded"))
    plan = g.sync()
    assert (len(plan.moved), plan.changes) == (1, 1)
    meta = g.metadata("p0")
    assert (meta["album"], meta["file"], meta["folder"]) == ("x", "2024/renamed.jpg", "2024")
    assert meta["path"] == str((photos / "2024" / "renamed.jpg").resolve())
    np.testing.assert_array_equal(vector(g, "p0"), before)
    # an add of the folder with metadata for a file it finds moved: the metadata is set (it was
    # refused as "not among the files of the folder")
    os.rename(photos / "p1.jpg", photos / "2024" / "p1-moved.jpg")
    rep = g.add(photos, metadata={"p1": {"album": "y"}}, options=QUIET)
    assert rep.moved == 1 and g.metadata("p1")["album"] == "y" and g.metadata("p1")["file"] == "2024/p1-moved.jpg"


# ---------------------------------------------------------------------- acceptance: sync == fresh build
def random_changes(roots: list[Path], rng: np.random.Generator, seed0: int) -> dict[str, int]:
    """Add 5%, overwrite 2%, move 1%, delete 2% of the files under ``roots``."""
    files = sorted(p for r in roots for p in r.rglob("*.png"))
    n = len(files)
    picked = rng.permutation(n)
    k_over, k_move, k_del = max(1, n * 2 // 100), max(1, n // 100), max(1, n * 2 // 100)
    for j in picked[:k_over]:
        photo(files[j], seed0 + 10_000 + int(j))
    for j in picked[k_over : k_over + k_move]:
        target = files[j].parent / "moved" / f"m{j}.png"
        target.parent.mkdir(exist_ok=True)
        os.rename(files[j], target)
    for j in picked[k_over + k_move : k_over + k_move + k_del]:
        os.remove(files[j])
    k_add = max(1, n * 5 // 100)
    for j in range(k_add):
        photo(roots[j % len(roots)] / "new" / f"n{j}.png", seed0 + 20_000 + j)
    return {"new": k_add, "changed": k_over, "moved": k_move, "gone": k_del}


def test_sync_equals_a_fresh_build(model, place, tmp_path):
    """Two roots with same-named files and metadata, random changes, ``sync``: for 100 text
    queries the top 10 (ids mapped by path) and scores equal those of a fresh build; user
    metadata is kept for changed and moved items; a second sync changes nothing."""
    rng = np.random.default_rng(7)
    roots = [tmp_path / "lib" / "a", tmp_path / "lib" / "b"]
    for r, root in enumerate(roots):
        for i in range(100):
            photo(root / f"d{i % 3}" / f"img{i:03d}.png", 1000 * r + i)  # same names in both roots
    g = place.build(model, "synced", roots)
    ids = g.ids()
    assert len(ids) == 200 and len(set(ids)) == 200
    g.update({i: {"tag": f"t{j % 7}"} for j, i in enumerate(ids)})
    tags_by_sha = {m["file_sha256"]: m["tag"] for m in by_path(g).values()}
    expected = random_changes(roots, rng, 5000)
    plan = g.sync()
    got = plan.counts()
    assert {k: got[k] for k in expected} == expected, plan.line()
    fresh = place.build(model, "fresh", roots)
    assert sorted(by_path(g)) == sorted(by_path(fresh))
    words = ["a", "photo", "of", "red", "noise", "the", "cat", "and", "green", "sky"]
    queries = [" ".join(rng.choice(words, 4)) for _ in range(100)]
    path_of = {r.id: r.path for r in g.store.select()}
    fresh_path = {r.id: r.path for r in fresh.store.select()}
    for hs, hf in zip(g.search_texts(queries, k=10), fresh.search_texts(queries, k=10)):
        assert [path_of[h.id] for h in hs] == [fresh_path[h.id] for h in hf]
        np.testing.assert_allclose([h.score for h in hs], [h.score for h in hf], atol=1e-5)
    for meta in by_path(g).values():  # changed and moved items kept their tags
        if meta.get("file_sha256") in tags_by_sha and "/new/" not in meta["file"]:
            assert meta.get("tag") == tags_by_sha[meta["file_sha256"]] or meta["id"] in dict(plan.changed)
    for item_id, _ in plan.changed + plan.moved:
        assert "tag" in g.metadata(item_id)
    assert g.sync().changes == 0


# ---------------------------------------------------------------------- the command line
def test_sync_restore_and_info_at_the_command_line(model_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(3):
        photo(a / f"x{i}.png", i)
        photo(b / f"x{i}.png", 10 + i)
    out = str(tmp_path / "G")
    assert (
        main(["index", "build", "--model", str(model_dir), "--images", str(a), "--images", str(b), "--out", out]) == 0
    )
    capsys.readouterr()
    assert main(["index", "info", out]) == 0
    info = capsys.readouterr().out
    assert f"root       a: {a.resolve()}" in info and f"root       b: {b.resolve()}" in info
    photo(a / "x3.png", 50)
    os.remove(b / "x0.png")
    assert main(["index", "sync", "--index", out, "--dry-run"]) == 0
    assert "would change: 1 new, 0 changed, 0 moved, 1 gone, 5 unchanged" in capsys.readouterr().out
    assert main(["index", "sync", "--index", out, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["new"], counts["gone"], counts["unchanged"], counts["dry_run"]) == (1, 1, 5, False)
    assert main(["index", "delete", "--index", out, "--ids", "b/x1"]) == 0
    assert main(["index", "sync", "--index", out]) == 0
    assert "1 file you deleted left out (index restore brings them back)" in capsys.readouterr().out
    assert main(["index", "info", out]) == 0
    assert "1 excluded" in capsys.readouterr().out
    assert main(["index", "restore", "--index", out, "--ids", "b/x1"]) == 0
    assert "restored 1 item " in capsys.readouterr().out
    # one line, no traceback, for what cannot be done
    assert main(["index", "restore", "--index", out, "--ids", "nope"]) == 1
    err = capsys.readouterr().err
    assert "'nope' is not an excluded item" in err and "Traceback" not in err
    assert main(["index", "sync", "--index", str(tmp_path / "missing")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_an_unreadable_root_is_left_alone_and_a_gallery_without_roots_says_so(model, tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    for i in range(3):
        photo(photos / f"p{i}.jpg", i)
    g = build_gallery(model, photos, tmp_path / "G", options=QUIET)
    os.rename(photos, tmp_path / "unmounted")  # a disk that is not mounted
    plan = g.sync()
    assert plan.unreachable == ["photos"] and plan.changes == 0 and len(g) == 3
    assert "cannot be read: its items are left as they are" in caplog.text
    os.rename(tmp_path / "unmounted", photos)
    assert g.sync().changes == 0
    named = build_gallery(model, photos, tmp_path / "N", options=QUIET, ids=["a", "b", "c"])  # ids given: no root
    with pytest.raises(Exception, match="records no folder of photos to sync: build or add it with --images FOLDER"):
        named.sync()


# ---------------------------------------------------------------------- region models (ESL, VSE)
def test_a_region_gallery_takes_photos_through_the_extractor_it_records(tmp_path):
    """Defect 6: an ESL gallery could not take new photos without captions. A gallery built from
    photos records its extractor (EfficientNet-Lite0 by default); one built from an ``extract``
    folder records that folder's; ``add`` / ``sync`` with photos run it, giving the same
    features (and scores) as ``eslmatch extract`` does."""
    from _models import tiny_gru_model
    from eslmatch.extract import extract_folder

    model = tiny_gru_model(img_dim=1280, seed=2).eval()
    photos, more = tmp_path / "photos", tmp_path / "more"
    for i in range(3):
        photo(photos / f"p{i}.png", i, size=64)
    photo(more / "m0.png", 10, size=64)
    g = build_gallery(model, photos, tmp_path / "G", options=QUIET)
    assert g.store.library()["extractor"]["backbone"] == "efficientnet-lite0" and g.store.grid == (7, 7)
    extract_folder(photos, tmp_path / "data", device="cpu", progress=False)
    from_features = build_gallery(model, tmp_path / "data", tmp_path / "F", options=QUIET, images_dir=photos)
    hits = g.search("a red circle", k=3)
    same = from_features.search("a red circle", k=3)
    assert [h.id for h in hits] == [h.id for h in same]
    np.testing.assert_allclose([h.score for h in hits], [h.score for h in same], atol=1e-5)
    # new photos: sync (a root) and add (a features-built gallery records the extract folder's extractor)
    photo(photos / "p3.png", 3, size=64)
    assert g.sync().counts()["new"] == 1 and len(g) == 4
    assert from_features.store.library()["extractor"]["backbone"] == "efficientnet-lite0"
    rep = from_features.add(more, options=QUIET)
    assert rep.added == 1 and from_features.metadata("m0")["root"] == "more"
    np.testing.assert_allclose(vector(from_features, "p0"), vector(g, "p0"), atol=1e-5)
    # a gallery of features from elsewhere records no extractor: photos are refused in one line
    plain = build_gallery(
        model, np.random.default_rng(0).random((2, 49, 1280), dtype=np.float32), tmp_path / "P", options=QUIET
    )
    with pytest.raises(Exception, match="records no extractor to make them from photos"):
        plain.add(more)


def test_a_region_gallery_from_photos_is_the_same_on_milvus(place, tmp_path):
    from _models import tiny_gru_model

    model = tiny_gru_model(img_dim=1280, seed=2).eval()
    photos = tmp_path / "photos"
    for i in range(3):
        photo(photos / f"p{i}.png", i, size=64)
    files = build_gallery(model, photos, tmp_path / "F", options=QUIET)
    g = place.build(model, "regions", photos)
    photo(photos / "p3.png", 3, size=64)
    assert g.sync().counts()["new"] == 1 and files.sync().counts()["new"] == 1
    for a, b in zip(
        g.search_texts(["a red circle", "the blue square"], k=4),
        files.search_texts(["a red circle", "the blue square"], k=4),
    ):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_a_sync_that_finds_nothing_to_encode_imports_no_torch(model_dir, tmp_path):
    """A sync with nothing new or changed needs no model: it imported torch anyway (2 of its
    2.5 s on a 2-core AMD EPYC). Only a sync that encodes loads it, and an ESL-CLIP model loads
    without transformers (its CLIP classes took 4 to 7 s to import)."""
    import subprocess
    import sys

    for i in range(3):
        photo(tmp_path / "lib" / f"p{i}.png", i)
    out = str(tmp_path / "G")
    assert main(["index", "build", "--model", str(model_dir), "--images", str(tmp_path / "lib"), "--out", out]) == 0
    probe = (
        "import json, sys\nfrom eslmatch.cli import main\ncode = main(sys.argv[1:])\n"
        "print(json.dumps({'code': code, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))"
    )

    def sync() -> tuple[dict, str]:
        run = subprocess.run(
            [sys.executable, "-c", probe, "index", "sync", "--index", out], capture_output=True, text=True, check=True
        )
        lines = run.stdout.strip().splitlines()
        return json.loads(lines[-1]), lines[0]

    got, said = sync()
    assert got == {"code": 0, "heavy": []} and "3 unchanged" in said, (got, said)
    photo(tmp_path / "lib" / "p1.png", 99)  # changed: now the model is needed
    got, said = sync()
    assert got["code"] == 0 and got["heavy"] == ["torch"] and "1 changed" in said, (got, said)  # no transformers


def test_a_sync_removes_the_staging_of_a_write_killed_after_its_commit(model, tmp_path, monkeypatch):
    """Found by the random kill -9 test (1 run in 3): a sync killed after its add committed but
    before the add removed its staging left ``.staging`` (its shards' bytes) behind for good,
    since the next sync found nothing to do and wrote nothing. A sync now always ends with a
    write, which removes what a killed write left."""
    from eslmatch.retrieval.files import store as file_store
    from eslmatch.retrieval.layout import STAGING

    for i in range(3):
        photo(tmp_path / "lib" / f"p{i}.png", i)
    out = tmp_path / "G"
    build_gallery(model, tmp_path / "lib", out, options=BuildOptions(progress=False)).close()
    photo(tmp_path / "lib" / "p3.png", 3)
    real = file_store.collect_garbage

    def killed_after_commit(path, layout, keep_staging=None):
        if keep_staging is None and (Path(path) / STAGING).exists():
            raise KeyboardInterrupt  # as a kill -9 between the add's commit and its clean-up
        real(path, layout, keep_staging)

    monkeypatch.setattr(file_store, "collect_garbage", killed_after_commit)
    with pytest.raises(KeyboardInterrupt):
        open_gallery(out, model=model).sync(options=BuildOptions(progress=False))
    monkeypatch.setattr(file_store, "collect_garbage", real)
    assert (out / STAGING).is_dir()
    g = open_gallery(out, model=model)
    assert len(g) == 4  # the add committed
    plan = g.sync(options=BuildOptions(progress=False))
    assert plan.counts()["new"] == 0 and not (out / STAGING).exists()
