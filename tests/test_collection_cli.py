"""The collection operations at the command line: build with metadata, add (duplicates skipped),
delete by filter and id, update, compact, filtered and image searches; and bad input, one line
each, exit 1, nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _cli import run
from _datagen import make_precomp
from _models import randomize, tiny_gru_model
from eslmatch import VSEModel
from eslmatch.cli import main
from eslmatch.retrieval import FileStore, open_gallery

N = 40


@pytest.fixture()
def setup(tmp_path):
    esl = tiny_gru_model(seed=5)
    model = VSEModel(esl.config.replace(model_type="vse"), tokenizer=esl.tokenizer)
    randomize(model)
    model_dir = str(model.eval().save_pretrained(tmp_path / "model"))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "feats.npy", rng.random((N, 6, 16), dtype=np.float32))
    np.save(tmp_path / "more.npy", rng.random((5, 6, 16), dtype=np.float32))
    make_precomp(tmp_path / "extra", splits=("test",), n_images=5, regions=6, dim=16, ids=True)  # ids 1000..1004
    meta = tmp_path / "meta.jsonl"
    meta.write_text(
        "".join(
            json.dumps({"id": str(i), "folder": "trips" if i < 10 else "home", "year": 2000 + i}) + "\n"
            for i in range(N)
        )
    )
    return tmp_path, model_dir


def one_line(capsys, argv: list[str], *needles: str) -> str:
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("eslmatch: error: "), (argv, out, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(index: Path) -> tuple:
    store = FileStore.open(index)
    return (
        store.generation,
        store.info(),
        sorted((k, str(v)) for r in store.select() for k, v in r.fields().items() if k != "added"),
    )


def test_the_collection_at_the_command_line(setup, capsys):
    root, model_dir = setup
    idx = str(root / "idx")
    code, out, _ = run(
        capsys,
        "index",
        "build",
        "--model",
        model_dir,
        "--features",
        str(root / "feats.npy"),
        "--metadata",
        str(root / "meta.jsonl"),
        "--out",
        idx,
    )
    assert code == 0 and f"({N} items" in out and "folder (str)" in out and "year (int)" in out
    code, out, _ = run(
        capsys, "search", "--index", idx, "a red circle", "--where", 'folder == "trips" and year >= 2005', "--json"
    )
    hits = json.loads(out)["hits"]
    assert code == 0 and {h["id"] for h in hits} == {str(i) for i in range(5, 10)}
    assert all(h["metadata"]["folder"] == "trips" and set(h) >= {"id", "score", "path", "metadata"} for h in hits)
    extra = str(root / "extra" / "f30k_precomp")
    code, out, _ = run(capsys, "index", "add", "--index", idx, "--features", extra)
    assert code == 0 and "added 5 items" in out and f"({N + 5} in all" in out
    code, out, _ = run(capsys, "index", "add", "--index", idx, "--features", extra)
    assert code == 0 and "added 0 items" in out and "5 already in the gallery (skipped)" in out  # twice: skipped
    code, out, _ = run(capsys, "index", "delete", "--index", idx, "--where", "year < 2003")
    assert code == 0 and "deleted 3 items" in out
    code, out, _ = run(capsys, "index", "delete", "--index", idx, "--ids", "39", "1004")
    assert code == 0 and "deleted 2 items" in out
    (root / "up.csv").write_text("id,folder,starred\n10,trips,true\n11,,false\n")
    code, out, _ = run(capsys, "index", "update", "--index", idx, "--metadata", str(root / "up.csv"))
    assert code == 0 and "updated the metadata of 2 items" in out
    g = open_gallery(idx)
    assert (
        g.metadata("10")["folder"] == "trips"
        and g.metadata("10")["starred"] is True
        and g.metadata("11")["folder"] == "home"
    )
    code, out, _ = run(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    assert info["count"] == N + 5 - 5 and info["deleted"] == 5 and info["fields"]["starred"] == "bool"
    code, out, _ = run(capsys, "index", "compact", "--index", idx)
    assert code == 0 and "5 deleted items removed" in out
    code, out, _ = run(
        capsys, "search", "--index", idx, "--similar-to", "12", "-k", "3", "--where", "starred", "--json"
    )
    assert code == 0 and [h["id"] for h in json.loads(out)["hits"]] == ["10"]
    code, out, _ = run(capsys, "index", "info", idx, "--verify")
    assert code == 0 and f"({N} items" in out and "verified" in out


def test_bad_input_is_one_line_and_changes_nothing(setup, capsys):
    root, model_dir = setup
    idx = str(root / "idx")
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                model_dir,
                "--features",
                str(root / "feats.npy"),
                "--metadata",
                str(root / "meta.jsonl"),
                "--out",
                idx,
            ]
        )
        == 0
    )
    before = snapshot(Path(idx))
    cases = [
        (["search", "--index", idx, "a red circle", "--where", "folder === 'x'"], "column 10"),
        (
            ["search", "--index", idx, "a red circle", "--where", "colour == 'red'"],
            "unknown field 'colour' (known fields: added, folder, id, path, year)",
        ),
        (["search", "--index", idx, "a red circle", "--where", "x' or 1=1 --"], "column 2"),
        (["search", "--index", idx, "a red circle", "--where", 'year == "2020"'], "'year' is an int field"),
        (["index", "delete", "--index", idx, "--where", "folder == trips"], "expected a string"),
        (["index", "delete", "--index", idx, "--ids", "nope"], "no item with id 'nope'"),
        (["search", "--index", idx, ""], "the query sentence is empty"),
        (["search", "--index", idx, "red", "-k", "0"], "-k must be a positive integer"),
        (["search", "--index", str(root / "missing"), "red"], "no such index"),
        (["search", "--index", idx, "--similar-to", "nope"], "no item with id 'nope'"),
        (["search", "--index", idx, "--image-file", str(root / "feats.npy")], "takes images"),
    ]
    (root / "unknown.jsonl").write_text('{"id": "7", "folder": "x"}\n{"id": "999", "folder": "y"}\n')
    (root / "wrongtype.jsonl").write_text('{"id": "7", "year": "two thousand"}\n')
    (root / "badjson.jsonl").write_text('{"id": "7", "year": 3\n')
    cases += [
        (["index", "update", "--index", idx, "--metadata", str(root / "unknown.jsonl")], "no item with id '999'"),
        (
            ["index", "update", "--index", idx, "--metadata", str(root / "wrongtype.jsonl")],
            "field 'year' of item '7' is a str, the gallery's 'year' is an int",
        ),
        (
            ["index", "update", "--index", idx, "--metadata", str(root / "badjson.jsonl")],
            "badjson.jsonl:1: not a JSON object",
        ),
        (["index", "update", "--index", idx, "--metadata", str(root / "none.csv")], "none.csv: no such metadata file"),
    ]
    nan = np.random.default_rng(0).random((3, 6, 16), dtype=np.float32)
    nan[1, 2, 3] = np.nan
    np.save(root / "nan.npy", nan)
    cases += [
        (
            ["index", "add", "--index", idx, "--features", str(root / "nan.npy")],
            "image '41' (item 1 of the source): its region features hold NaN",
        ),
        (
            ["index", "build", "--model", model_dir, "--features", str(root / "nan.npy"), "--out", idx],
            "hold NaN or infinite values",
        ),
        (
            [
                "index",
                "add",
                "--index",
                idx,
                "--features",
                str(root / "more.npy"),
                "--metadata",
                str(root / "unknown.jsonl"),
            ],
            "not among the 5 items added",
        ),
    ]
    for argv, needle in cases:
        one_line(capsys, argv, needle)
        assert snapshot(Path(idx)) == before, argv  # nothing changed
    FileStore.open(idx, verify=True)
