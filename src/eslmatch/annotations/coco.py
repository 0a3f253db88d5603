"""COCO ids of a split: the image id of each row, the caption annotation id of each column.

The ECCV Caption and CxC annotations (:mod:`.extended`) are keyed by COCO image ids and COCO
caption annotation ids. A saved score matrix comes with two id files (one integer per line:
:func:`read_ids`); a dataset's ids are derived from what users have:

- image ids: the Karpathy JSON's ``cocoid`` (raw-image splits), a precomp folder's
  ``{split}_ids.txt`` (the SCAN files hold COCO image ids; ``eslmatch extract`` writes file
  names, e.g. ``COCO_val2014_000000391895``), resolved by :func:`resolve_image_ids`: an
  integer is an image id, a name is looked up among the ``file_name`` of COCO's captions
  files;
- caption ids: COCO's own ``captions_train2014.json`` / ``captions_val2014.json``
  (``annotations``: ``id``, ``image_id``, ``caption``) give each image's annotations; each
  caption of the split is matched by text to one annotation of its image
  (:func:`match_caption_ids`). Texts are compared after :func:`normalize_caption` (lower case,
  every run of characters other than letters and digits one space), so the Karpathy JSON's
  raw sentences, the precomp captions and the annotations agree whatever their spacing and
  punctuation. A caption matching no annotation of its image is an error naming it, never a
  guess; two annotations of one image with the same text are taken in file order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.precomp import read_lines
from ..errors import EslmatchError
from .files import read_json

_NOT_WORD = re.compile(r"[^0-9a-z]+")


def normalize_caption(text: str) -> str:
    """Lower case, every run of characters other than ``[0-9a-z]`` one space, stripped."""
    return _NOT_WORD.sub(" ", text.lower()).strip()


def read_ids(path: str | Path, count: int | None = None, what: str = "ids") -> np.ndarray:
    """One integer id per line (UTF-8, no blank lines): ``(L,)`` int64.

    Raises:
        EslmatchError: naming the file and line of the first non-integer entry, or the
        wrong count when ``count`` is given.
    """
    p = Path(path)
    if not p.is_file():
        raise EslmatchError(f"{p}: no such id file")
    lines = read_lines(p, what)
    out = np.empty(len(lines), dtype=np.int64)
    for n, text in enumerate(lines):
        try:
            out[n] = int(text)
        except (ValueError, OverflowError):
            raise EslmatchError(f"{p}: line {n + 1}: {text[:40]!r} is not an integer id") from None
    if count is not None and len(out) != count:
        raise EslmatchError(f"{p}: {len(out)} {what} for {count} {'rows' if 'image' in what else 'columns'}")
    return out


@dataclass
class CocoCaptions:
    """COCO's caption annotations, by image: ``by_image[image id] = [(annotation id, caption)]``
    in file order; ``file_ids`` maps each image's ``file_name`` (and its stem) to its id."""

    sources: list[str]
    by_image: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    file_ids: dict[str, int] = field(default_factory=dict)


def load_coco_captions(paths: Sequence[str | Path]) -> CocoCaptions:
    """Read COCO captions files (``captions_train2014.json``, ``captions_val2014.json``...).

    Raises:
        EslmatchError: an unreadable file or one without ``annotations`` entries holding
        ``id``, ``image_id`` and ``caption`` (naming the first bad entry).
    """
    out = CocoCaptions([str(p) for p in paths])
    for path in map(Path, paths):
        data = read_json(path, "COCO captions file")
        anns = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(anns, list):
            raise EslmatchError(f"{path}: not a COCO captions file (no 'annotations' list)")
        for i, ann in enumerate(anns):
            try:
                image_id, ann_id, text = int(ann["image_id"]), int(ann["id"]), str(ann["caption"])
            except (KeyError, TypeError, ValueError):
                raise EslmatchError(f"{path}: annotations[{i}] needs an integer id, image_id and a caption") from None
            out.by_image.setdefault(image_id, []).append((ann_id, text))
        for img in data.get("images") or []:
            if isinstance(img, dict) and "file_name" in img and "id" in img:
                name = str(img["file_name"])
                out.file_ids[name] = int(img["id"])
                out.file_ids[name.rsplit(".", 1)[0]] = int(img["id"])
    return out


def resolve_image_ids(names: Sequence[str], coco: CocoCaptions | None, source: str) -> np.ndarray:
    """COCO image ids of a split's images: ``(N,)`` int64.

    Args:
        names: one per image: a COCO image id (``"391895"``) or a file name, with or without
            extension and folder (``"val2014/COCO_val2014_000000391895.jpg"``).
        coco: captions files whose ``images`` give the file names (needed for names only).
        source: what the names came from, for errors.
    """
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        text = str(name).strip()
        if text.isdigit():
            out[i] = int(text)
            continue
        base = text.replace("\\", "/").rsplit("/", 1)[-1]
        found = None if coco is None else coco.file_ids.get(base, coco.file_ids.get(base.rsplit(".", 1)[0]))
        if found is None:
            hint = "" if coco is not None else " (pass --coco-captions to look file names up)"
            raise EslmatchError(
                f"{source}: image {i} ({text!r}) is neither a COCO image id nor a file name of the COCO "
                f"captions files{hint}"
            )
        out[i] = found
    return out


def match_caption_ids(
    captions: Sequence[str], caption_images: Sequence[int] | np.ndarray, coco: CocoCaptions, source: str
) -> np.ndarray:
    """The COCO annotation id of each caption, matched by text among its image's annotations.

    Args:
        captions: ``(M,)`` the split's captions.
        caption_images: ``(M,)`` the COCO image id each caption describes.
        coco: :func:`load_coco_captions`.
        source: the captions' file, for errors.
    Returns:
        ``(M,)`` int64 annotation ids.
    Raises:
        EslmatchError: naming the first caption whose image is in no captions file, or whose
        text matches none of its image's (unused) annotations.
    """
    out = np.empty(len(captions), dtype=np.int64)
    used: dict[int, set[int]] = {}
    files = ", ".join(coco.sources)
    for c, (text, image_id) in enumerate(zip(captions, caption_images)):
        image_id = int(image_id)
        anns = coco.by_image.get(image_id)
        if anns is None:
            raise EslmatchError(f"{source}: caption {c}: its image {image_id} has no annotation in {files}")
        want = normalize_caption(text)
        taken = used.setdefault(image_id, set())
        match = next((j for j, (_, t) in enumerate(anns) if j not in taken and normalize_caption(t) == want), None)
        if match is None:
            raise EslmatchError(
                f"{source}: caption {c} ({text[:60]!r}) matches none of the {len(anns) - len(taken)} unused COCO "
                f"annotations of image {image_id} ({len(anns)} in all) in {files}"
            )
        taken.add(match)
        out[c] = anns[match][0]
    return out
