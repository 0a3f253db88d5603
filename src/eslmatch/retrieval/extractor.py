"""Photos -> region features for a gallery of a region model (ESL, VSE): the extractor it records.

A region gallery built from photos records the extractor that made its features: the default
(EfficientNet-Lite0 at its default size, fp32), or, for a gallery built from an ``eslmatch
extract`` folder, the backbone, image size, weights and precision that folder's
``extract_meta.json`` names. ``index add`` / ``index sync`` with photos run that extractor, so
new photos get features comparable with the stored ones (no captions, no ``extract`` step).
The weights' sha256 is recorded and checked: other weights are refused, never mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EslmatchError
from .records import ExtractorRecord
from .sourcefiles import EXTRACT_META, read_extract_meta

if TYPE_CHECKING:
    from ..extract.backbones import Backbone
    from ..model.base import MatchingModel

DEFAULT: ExtractorRecord = {"backbone": "efficientnet-lite0", "precision": "fp32"}


def recorded_in(folder: str | Path, split: str = "test") -> ExtractorRecord | None:
    """The extractor an ``eslmatch extract`` folder's features came from, or ``None`` (no
    ``extract_meta.json``, or box-pooled features: their boxes exist only for those photos)."""
    meta = read_extract_meta(folder)
    if meta is None:
        return None
    splits = meta.get("splits")
    split_record = splits.get(split) if isinstance(splits, dict) else None
    info = split_record.get("backbone_info") if isinstance(split_record, dict) else None
    info = info if isinstance(info, dict) else meta
    if info.get("boxes_file") or not info.get("backbone"):
        return None
    found: ExtractorRecord = {"backbone": info["backbone"]}  # and what else it names
    if info.get("image_size") is not None:
        found["image_size"] = info["image_size"]
    if info.get("precision") is not None:
        found["precision"] = info["precision"]
    if info.get("weights") is not None:
        found["weights"] = info["weights"]
    if info.get("weights_sha256") is not None:
        found["weights_sha256"] = info["weights_sha256"]
    return found


def is_features_folder(path: str | Path) -> bool:
    """Whether ``path`` holds region features (``*_ims.npy``, what ``extract`` writes), not photos."""
    p = Path(path)
    return p.is_dir() and (any(p.glob("*_ims.npy")) or (p / EXTRACT_META).is_file())


def open_extractor(record: ExtractorRecord, device: str = "cpu") -> Backbone:
    """The :class:`~eslmatch.extract.backbones.Backbone` of ``record`` (its weights checked)."""
    from ..extract.backbones import BackboneOptions, build_backbone

    weights = record.get("weights")
    if weights and not Path(str(weights)).is_file():
        weights = None  # another machine: the backbone's own weights, checked by their sha256 below
    backbone = build_backbone(
        str(record["backbone"]),
        BackboneOptions(
            image_size=record.get("image_size"),
            weights=weights,
            device=device,
            precision=str(record.get("precision") or "fp32"),
            runtime="auto",  # new photos of a sync: the fastest faithful runtime here
        ),
    )
    want, got = record.get("weights_sha256"), backbone.fingerprint().get("weights_sha256")
    if want and got and want != got:
        raise EslmatchError(
            f"the extractor's weights ({getattr(backbone, 'weights', None)}) are not those the gallery's features came from "
            f"(sha256 {str(want)[:12]}...): new photos would not be comparable"
        )
    return backbone


def record_of(backbone: Backbone) -> ExtractorRecord:
    """What a gallery records of the extractor ``backbone``."""
    sha = backbone.fingerprint().get("weights_sha256")
    return {
        "backbone": backbone.name,
        "image_size": backbone.image_size,
        "precision": backbone.precision,
        "weights": str(getattr(backbone, "weights", "") or "") or None,
        "weights_sha256": sha if isinstance(sha, str) else None,
    }


def checked_extractor(model: MatchingModel, record: ExtractorRecord, device: str = "cpu") -> Backbone:
    """:func:`open_extractor`, refused in one line when its features are not the model's width."""
    backbone = open_extractor(record, device)
    width = int(model.config.img_dim)
    if int(backbone.dim) != width:
        raise EslmatchError(
            f"the extractor {backbone.name} gives region features of width {backbone.dim}, the model reads "
            f"{width}: give the features its training data came from (--features)"
        )
    return backbone
