"""Item metadata: JSON Lines and CSV files, field types, what photos record by themselves."""

from __future__ import annotations

import pytest
from PIL import Image

from eslmatch.retrieval.metadata import MetadataError, exif_taken, folder_of, merge_types, read_metadata


def test_json_lines_and_csv(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        '{"id": "a", "tag": "beach", "year": 2024, "starred": true, "rating": 4}\n\n{"id": "b", "rating": 2.5}\n'
    )
    assert read_metadata(jsonl) == {
        "a": {"tag": "beach", "year": 2024, "starred": True, "rating": 4},
        "b": {"rating": 2.5},
    }
    csv = tmp_path / "m.csv"
    csv.write_text("id,tag,year,starred,rating,note\na,beach,2024,true,4,\nb,sea,2023,FALSE,2.5,x y\n")
    assert read_metadata(csv) == {
        "a": {"tag": "beach", "year": 2024, "starred": True, "rating": 4.0},  # an empty cell is no value
        "b": {"tag": "sea", "year": 2023, "starred": False, "rating": 2.5, "note": "x y"},
    }
    # the gallery's types decide how cells read: "2024" stays text in a str field
    assert read_metadata(csv, {"year": "str"})["a"]["year"] == "2024"


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ('{"id": "a"}\n{"id": "a"}\n', ".jsonl", "id 'a' appears twice"),
        ('{"tag": "x"}\n', ".jsonl", "needs a non-empty string 'id'"),
        ('{"id": "a", "v": [1, 2]}\n', ".jsonl", "values are strings, integers, floats or booleans, not list"),
        ('{"id": "a", "v": NaN}\n', ".jsonl", "not a JSON object"),
        ('{"id": "a", "row": 1}\n', ".jsonl", "'row' is a reserved field name"),
        ('{"id": "a", "bad name": 1}\n', ".jsonl", "field name 'bad name' is not valid"),
        ('{"id": "a", "y": 1}\n{"id": "b", "y": "x"}\n', ".jsonl", "field 'y' of item 'b' is a str"),
        ("tag,year\nx,1\n", ".csv", "needs an 'id' column"),
        ("id,y\na,1\nb\n", ".csv", ":3: 1 cells, the header has 2"),
        ("", ".csv", "empty metadata file"),
        ('{"id": "a", "v": "\\u0000"}\n', ".jsonl", "NUL"),
    ],
)
def test_bad_files_are_one_line(tmp_path, text, suffix, message):
    path = tmp_path / f"m{suffix}"
    path.write_text(text)
    with pytest.raises(MetadataError, match=message) as info:
        read_metadata(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_types_are_fixed_on_first_sight():
    types = merge_types({}, [{"id": "a", "year": 2024, "rating": 4}])
    assert types == {"year": "int", "rating": "int"}
    assert merge_types({"rating": "float"}, [{"id": "a", "rating": 4}]) == {"rating": "float"}  # int into float
    with pytest.raises(MetadataError, match="field 'year' of item 'b' is a float, the gallery's 'year' is an int"):
        merge_types(types, [{"id": "b", "year": 2024.5}])


def test_photos_record_folder_and_exif_date(tmp_path):
    assert folder_of("trips/2024/a.jpg") == "trips/2024" and folder_of("a.jpg") == ""
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    assert exif_taken(plain) is None
    dated = tmp_path / "dated.jpg"
    img = Image.new("RGB", (8, 8))
    exif = img.getexif()
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 14:03:22"
    img.save(dated, exif=exif)
    assert exif_taken(dated) == "2024-05-01T14:03:22"
    (tmp_path / "notes.txt").write_text("not an image")
    assert exif_taken(tmp_path / "notes.txt") is None
