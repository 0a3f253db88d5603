"""Raw-image caption datasets: a folder of images and ``K`` captions each.

Two layouts:

- Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``): ``{"images":
  [{"filename", "filepath"?, "split": train|val|test|restval, "sentences": [{"raw"}]}]}``
  with an image root (COCO's ``filepath`` is ``train2014`` / ``val2014`` under it). Split
  ``train`` includes ``restval`` (the usual 113,287 COCO training images) unless
  ``restval=False``; ``dev`` is Karpathy's ``val``. The branch's own per-split files
  (``train_coco.json``, ``dev_coco.json``, ``testall_coco.json``: ``file_name`` and no
  ``split``) are read whole, images looked up under ``train2014/`` then ``val2014/``.
- ``captions.tsv`` (``image_name<TAB>caption`` lines, as ``eslmatch extract`` reads them)
  with the folder of images.

Captions are image-major, ``K`` per image (``captions_per_image``; extra ones dropped, too
few repeated cyclically, as the precomp layout), lower-cased like the CLIP branch's loaders.
:class:`ImageCaptionDataset` yields one caption with its preprocessed image; a file that
cannot be read is reported by name and its item replaced by the next readable pair, so one
bad file never stops training (and every process of a torchrun job keeps its batch size).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import EslmatchError
from ..text import pad_ids
from .files import SkipImage, caption_lookup, fit_captions, list_images, open_image, parse_captions

if TYPE_CHECKING:
    from ..model.base import MatchingModel

KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val",), "val": ("val",), "test": ("test",)}
_SHOW = 5  # names shown in an error about several files


@dataclass
class ImageCaptionSplit:
    """One split of raw images with ``captions_per_image`` captions each (image-major).

    Attributes:
        name: the split's name; source: the JSON or TSV it came from.
        image_paths: ``(N,)`` absolute paths; ids: ``(N,)`` image ids.
        captions: ``(N * K,)`` captions, those of image ``i`` at ``i*K .. i*K+K-1``.
        missing: images the source names but the image root lacks (left out).
    """

    name: str
    source: Path
    image_paths: list[Path]
    ids: list[str]
    captions: list[str]
    captions_per_image: int
    missing: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def image_of_caption(self, c: int) -> int:
        return c // self.captions_per_image

    def head(self, n: int) -> ImageCaptionSplit:
        """The first ``n`` images and their captions."""
        k = self.captions_per_image
        return replace(self, image_paths=self.image_paths[:n], ids=self.ids[:n], captions=self.captions[: n * k])

    def require_complete(self) -> None:
        """Refuse a split with missing images (an evaluation protocol needs every one)."""
        if self.missing:
            shown = ", ".join(self.missing[:_SHOW]) + (
                f" (and {len(self.missing) - _SHOW} more)" if len(self.missing) > _SHOW else ""
            )
            raise EslmatchError(
                f"{self.source}: {len(self.missing)} image file(s) of split {self.name!r} are missing: {shown}"
            )


def open_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    split: str,
    captions_per_image: int = 5,
    restval: bool = True,
    lowercase: bool = True,
) -> ImageCaptionSplit:
    """A split of a Karpathy-split JSON whose files lie under ``image_root``.

    Raises:
        EslmatchError: unreadable JSON, wrong layout (naming the first bad entry), an unknown
            split, or a split with no images.
    """
    path = Path(json_path)
    root = Path(image_root)
    if not root.is_dir():
        raise EslmatchError(f"{root}: the image root is not a folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EslmatchError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise EslmatchError(f"{path}: not valid JSON ({exc})") from exc
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise EslmatchError(f"{path}: not a Karpathy-split file (no 'images' list)")
    if split not in KARPATHY_SPLITS:
        raise EslmatchError(f"split {split!r}: Karpathy files have {', '.join(KARPATHY_SPLITS)}")
    wanted = set(KARPATHY_SPLITS[split]) - (set() if restval else {"restval"})
    paths: list[Path] = []
    ids: list[str] = []
    captions: list[str] = []
    missing: list[str] = []
    for i, entry in enumerate(images):
        try:
            # the branch's per-split files (train_coco.json...) have file_name and no split
            if "split" in entry and entry["split"] not in wanted:
                continue
            rel = Path(entry.get("filepath") or "") / (entry["filename"] if "filename" in entry else entry["file_name"])
            texts = [str(s["raw"]).strip() for s in entry["sentences"]]
        except (KeyError, TypeError) as exc:
            raise EslmatchError(f"{path}: images[{i}] lacks {exc} (needs filename, split, sentences[].raw)") from None
        texts = [" ".join(t.split()).lower() if lowercase else " ".join(t.split()) for t in texts if t]
        if not texts:
            raise EslmatchError(f"{path}: images[{i}] ({rel}) has no caption")
        file = root / rel
        if not file.is_file():  # COCO images without a filepath: train2014/ or val2014/, as the branch looks
            file = next((root / d / rel for d in ("train2014", "val2014") if (root / d / rel).is_file()), file)
        if not file.is_file():
            missing.append(str(rel))
            continue
        paths.append(file.resolve())
        ids.append(str(entry.get("cocoid", entry.get("imgid", rel.stem))))
        captions.extend(fit_captions(texts, captions_per_image))
    if not paths:
        raise EslmatchError(
            f"{path}: split {split!r} has no image under {root}" + (f" ({len(missing)} missing)" if missing else "")
        )
    return ImageCaptionSplit(split, path, paths, ids, captions, captions_per_image, missing)


def open_caption_tsv(
    tsv_path: str | Path,
    image_root: str | Path,
    split: str = "train",
    captions_per_image: int = 5,
    lowercase: bool = True,
) -> ImageCaptionSplit:
    """A split from ``image_name<TAB>caption`` lines and the folder holding the images
    (images without a caption are left out; refused lines are an error naming them)."""
    root = Path(image_root)
    if not root.is_dir():
        raise EslmatchError(f"{root}: the image folder does not exist")
    entries, _ = list_images(root, recursive=True)
    table = parse_captions(tsv_path, caption_lookup(entries))
    if table.bad_lines:
        n, why = table.bad_lines[0]
        raise EslmatchError(f"{tsv_path}: line {n}: {why} ({len(table.bad_lines)} refused line(s))")
    kept = [e for e in entries if e.id in table.by_id]
    if not kept:
        raise EslmatchError(f"{tsv_path}: no caption names an image in {root}")
    captions = [
        c.lower() if lowercase else c for e in kept for c in fit_captions(table.by_id[e.id], captions_per_image)
    ]
    return ImageCaptionSplit(
        split, Path(tsv_path), [e.path for e in kept], [e.id for e in kept], captions, captions_per_image
    )


def open_image_split(
    source: str | Path, image_root: str | Path, split: str, captions_per_image: int = 5
) -> ImageCaptionSplit:
    """:func:`open_karpathy` for a ``.json`` source, :func:`open_caption_tsv` otherwise.

    A ``{split}`` in ``source`` is replaced by the split's name (one captions file per split,
    e.g. ``data/{split}_captions.tsv``).
    """
    source = str(source).replace("{split}", split)
    if Path(source).suffix.lower() == ".json":
        return open_karpathy(source, image_root, split, captions_per_image)
    return open_caption_tsv(source, image_root, split, captions_per_image)


log = logging.getLogger(__name__)


class BadImageLog:
    """Files that could not be read, each logged once as a warning (by name, with the reason)."""

    def __init__(self) -> None:
        self.bad: dict[str, str] = {}

    def add(self, path: Path, reason: str) -> None:
        if str(path) not in self.bad:
            self.bad[str(path)] = reason
            log.warning(f"skipping {path}: {reason}")


def load_pixels(path: Path, preprocess: Callable[[Any], Tensor]) -> Tensor:
    """``preprocess`` of the image at ``path`` (raises :class:`SkipImage` naming the problem)."""
    return preprocess(open_image(path))


class ImageCaptionDataset(Dataset):
    """One item per caption: ``{"image": (3, H, W), "ids": (W,), "index": caption}``.

    Args:
        split: the captions and image files.
        preprocess: PIL image -> pixels ``(3, H, W)`` (the model's ``preprocess``).
        tokenize: texts -> ``(ids (M, W), lengths (M,))`` (the model's ``tokenize``).
        bad: where unreadable files are reported (each once).
    """

    def __init__(
        self,
        split: ImageCaptionSplit,
        preprocess: Callable[[Any], Tensor],
        tokenize: Callable[[list[str]], tuple[Tensor, Tensor]],
        bad: BadImageLog | None = None,
    ) -> None:
        self.split = split
        self.preprocess = preprocess
        self.tokenize = tokenize
        self.bad = bad or BadImageLog()

    def __len__(self) -> int:
        return self.split.n_captions

    def set_epoch(self, epoch: int) -> None:
        """No per-epoch randomness (the branch trains without augmentation)."""

    def __getitem__(self, c: int) -> dict[str, Any]:
        k = self.split.captions_per_image
        n = self.split.n_captions
        for tries in range(min(n, 1000)):
            j = (c + tries * k) % n  # the next image's same-rank caption: a genuine positive pair
            path = self.split.image_paths[self.split.image_of_caption(j)]
            try:
                image = load_pixels(path, self.preprocess)
            except SkipImage as exc:
                self.bad.add(path, str(exc))
                continue
            ids, lens = self.tokenize([self.split.captions[j]])
            return {
                "image": image,
                "ids": ids[0, : int(lens[0])],
                "index": j,
                "image_index": self.split.image_of_caption(j),
            }
        raise EslmatchError(f"{self.split.source}: no readable image found near caption {c} (see the warnings above)")


@dataclass
class PixelBatch:
    """A batch of pixels and token ids (the fields :class:`~eslmatch.data.Batch` has)."""

    images: Tensor  # (B, 3, H, W)
    image_lengths: Tensor  # (B,) ones: one "region", the whole image
    captions: Tensor  # (B, W)
    caption_lengths: Tensor  # (B,)
    indices: Tensor  # (B,) caption indices
    image_index: Tensor  # (B,) image of each caption

    @property
    def caption_index(self) -> Tensor:
        return self.indices

    def to(self, device: str | torch.device, non_blocking: bool = False) -> PixelBatch:
        return PixelBatch(
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (
                    self.images,
                    self.image_lengths,
                    self.captions,
                    self.caption_lengths,
                    self.indices,
                    self.image_index,
                )
            )
        )


def collate_pixels(items: Sequence[dict[str, Any]]) -> PixelBatch:
    ids, lens = pad_ids([it["ids"].tolist() for it in items])
    images = torch.stack([it["image"] for it in items])
    return PixelBatch(
        images,
        torch.ones(len(items), dtype=torch.long),
        ids,
        lens,
        torch.tensor([int(it["index"]) for it in items]),
        torch.tensor([int(it["image_index"]) for it in items]),
    )


def encode_image_files(
    model: MatchingModel, split: ImageCaptionSplit, batch_size: int = 64, workers: int = 0
) -> Tensor:
    """``model.embed_images`` of every image of ``split``, in order (each image once).

    Raises:
        EslmatchError: naming the first unreadable file (a protocol needs every image).
    """
    split.require_complete()
    dataset = _ImageFiles(split.image_paths, model.image_preprocessor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    out = []
    for pixels in loader:
        out.append(model.embed_images(pixels.to(model.device)))
    return torch.cat(out)


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocess: Callable[[Any], Tensor]) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        try:
            return load_pixels(self.paths[i], self.preprocess)
        except SkipImage as exc:
            raise EslmatchError(f"{self.paths[i]}: {exc}") from None
