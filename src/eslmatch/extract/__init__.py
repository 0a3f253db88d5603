"""Region features from raw images: ``eslmatch extract`` and :func:`extract_folder`.

A folder of images (plus an optional ``image_name<TAB>caption`` file) becomes a precomp
split (``{split}_ims.npy`` ``(N, R, D)``, ``{split}_caps.txt``, ``{split}_ids.txt``,
``{split}_images.txt``, ``extract_meta.json``) that :func:`eslmatch.data.open_split` reads.
"""

from ..distributed import JobFailed
from .backbones import (
    BACKBONES,
    Backbone,
    BackboneOptions,
    BoxPoolingBackbone,
    EfficientNetLite0,
    JsonBoxes,
    RegionDetector,
    ResNet152Grid,
    SkipImage,
    available_backbones,
    build_backbone,
    register_backbone,
    roi_pool,
)
from .folder import (
    CaptionTable,
    ExtractConfig,
    ImageEntry,
    caption_lookup,
    extract_folder,
    fit_captions,
    list_images,
    open_image,
    parse_captions,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneOptions",
    "BoxPoolingBackbone",
    "CaptionTable",
    "EfficientNetLite0",
    "ExtractConfig",
    "ImageEntry",
    "JobFailed",
    "JsonBoxes",
    "RegionDetector",
    "ResNet152Grid",
    "SkipImage",
    "available_backbones",
    "build_backbone",
    "caption_lookup",
    "extract_folder",
    "fit_captions",
    "list_images",
    "open_image",
    "parse_captions",
    "register_backbone",
    "roi_pool",
]
