"""Encoding gallery items and queries into what a gallery stores and searches.

Two-stage (ESL). Images: region features ``(B, R, D)`` -> engine-ready image sides
``(B, R, Dt)`` (:meth:`~eslmatch.model.base.MatchingModel.prepare_images` of the level
features, padding zeroed) and first-stage vectors ``(B, Dt)`` (their mean over real regions,
as ``index_vectors_images``). Captions: text -> level features ``(B, W, Dt)`` and their mean
over real words. The inner product of the two vectors is the pair's mean word-region affinity.

One-stage (``exact_index``: VSE, ESL-CLIP): only the index vectors
``index_vectors_images(embed_images(x))`` / ``index_vectors_captions(embed_captions(...))``,
whose inner product IS the model's score.

How the encoders run is an :class:`Encoding`: PyTorch in ``fp32`` (the reference) or ``bf16``
(autocast, :mod:`eslmatch.utils.precision`; outputs back in float32, the padding and the
means taken in float32), or the model's exported encoders under ONNX Runtime
(:class:`~eslmatch.export.onnx.OnnxEncoders`, ``eslmatch export``). Scores are never computed
here: the re-rank keeps the engine's precision.

Everything here runs in eval mode without autograd; inputs and outputs that are not finite
are refused naming the item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import eval_mode, length_batches
from ..data.files import SkipImage, open_image, to_rgb
from ..errors import EslmatchError, InputError
from ..model.base import MatchingModel
from ..text import WordVocab, pad_ids, tokenize_each, words
from ..utils import masked_mean
from ..utils.choices import check_runtime
from ..utils.precision import inference_precision
from .encoding import FP32, Encoded, Encoding, resolve_encoding
from .sourcefiles import is_image_file
from .sources import CaptionSource, PhotoSource, RegionSource, Source


def zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """``x (B, T, D)`` with positions at or beyond ``lengths[b]`` set to 0."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x * mask[..., None].to(x.dtype)


def _finite(x: np.ndarray, what: str, names: Sequence[str]) -> np.ndarray:
    """``x`` if every value is finite; else one line naming the first item at fault."""
    if x.size and not np.isfinite(x).all():
        bad = int(np.nonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))[0][0])
        raise EslmatchError(f"{names[bad]}: its {what} hold NaN or infinite values (refused; nothing was written)")
    return x


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


# ---------------------------------------------------------------------- images
def image_outputs(
    model: MatchingModel, images: Tensor, lengths: Tensor | None, how: Encoding = FP32
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(vectors (B, K), side (B, R, Dt) | None, lengths (B,) | None)`` of images: region
    features ``(B, R, D)`` (with their lengths) or pixels ``(B, 3, H, W)``, encoded as ``how``
    says; float32 on the model's device. In eval mode."""
    dev = model.device
    if model.exact_index:
        if how.onnx is not None:
            return how.onnx.image_vectors(images.cpu(), None if lengths is None else lengths.cpu()).to(dev), None, None
        x = images.to(dev)
        with inference_precision(how.precision, dev):
            vec = model.index_vectors_images(model.embed_images(x, lengths), lengths)
        return vec.float(), None, None
    lens = lengths if lengths is not None else torch.full((images.shape[0],), images.shape[1], dtype=torch.long)
    if how.onnx is not None:
        raw = how.onnx.encode_images(images.cpu(), lens.cpu())[0].to(dev)
    else:
        with inference_precision(how.precision, dev):
            raw = model.prepare_images(model.embed_images(images.to(dev), lens.to(dev)))
    lens = lens.to(dev)
    side = zero_padding(raw.float(), lens)
    return masked_mean(side, lens), side, lens


def encode_images(
    model: MatchingModel, source: RegionSource | PhotoSource, i0: int, i1: int, how: Encoding = FP32
) -> Encoded:
    """Items ``[i0, i1)`` of an image source (unreadable photos skipped and listed)."""
    with eval_mode(model):
        lens = None
        skipped: list[tuple[str, str]] | None = None
        if isinstance(source, PhotoSource) and source.extractor is None:  # pixels: the model's own input
            pixels, kept, skipped = source.load(i0, i1, model.preprocess_image)
            if not pixels:
                return Encoded([], np.zeros((0, 0), np.float32), skipped=skipped)
            vectors, _, _ = image_outputs(model, torch.stack(pixels), None, how)
            names = [source.names[i] for i in kept]
            return Encoded(kept, _finite(_numpy(vectors), "image vectors", names), skipped=skipped)
        if isinstance(source, PhotoSource):  # photos -> regions by the gallery's extractor
            pixels, kept, skipped = source.load(i0, i1, source.extractor.preprocess)
            if not pixels:
                return Encoded([], np.zeros((0, 0), np.float32), skipped=skipped)
            names = [source.names[i] for i in kept]
            feats = _finite(_numpy(source.extractor(torch.stack(pixels))), "region features", names)
        else:
            kept = list(range(i0, i1))
            names = [f"image {source.ids[i]!r} (item {i} of the source)" for i in kept]
            feats = _finite(np.asarray(source.read(i0, i1), dtype=np.float32), "region features", names)
            lens = None if source.lengths is None else torch.from_numpy(np.asarray(source.lengths[i0:i1]))
        vectors, side, lens_t = image_outputs(model, torch.from_numpy(feats), lens, how)
        vec = _finite(_numpy(vectors), "encoded features", names)
        if side is None:
            return Encoded(kept, vec, skipped=skipped)
        assert lens_t is not None
        return Encoded(kept, vec, _numpy(side), lens_t.cpu().numpy().astype(np.int64), skipped)


# ---------------------------------------------------------------------- captions
def tokenize_texts(model: MatchingModel, texts: Sequence[str], where: str = "caption") -> list[Tensor]:
    """Token ids of every caption of a gallery: a list of ``(W_c,)`` LongTensors (errors name it)."""
    return tokenize_each(model.tokenize, list(texts), lambda i: f"{where} {i}")


def caption_outputs(
    model: MatchingModel, ids: Tensor, lengths: Tensor, how: Encoding = FP32
) -> tuple[Tensor, Tensor | None]:
    """``(vectors (B, K), level features (B, W, Dt) | None)`` of padded token ids ``(B, W)``,
    encoded as ``how`` says; float32 on the model's device. In eval mode."""
    dev = model.device
    if how.onnx is not None:
        if model.exact_index:
            return how.onnx.caption_vectors(ids.cpu(), lengths.cpu()).to(dev), None
        emb = how.onnx.encode_captions(ids.cpu(), lengths.cpu())[0].to(dev)
    else:
        ids_d, lens_d = ids.to(dev), lengths.to(dev)
        with inference_precision(how.precision, dev):
            emb = model.embed_captions(ids_d, lens_d)
            if model.exact_index:
                return model.index_vectors_captions(emb, lens_d).float(), None
    lengths = lengths.to(dev)
    feats = zero_padding(emb.float(), lengths)
    return masked_mean(feats, lengths), feats


def encode_captions(
    model: MatchingModel, source: CaptionSource, i0: int, i1: int, batch_size: int, how: Encoding = FP32
) -> Encoded:
    """Items ``[i0, i1)`` of a caption source, encoded in batches of similar length."""
    tokens = tokenize_texts(model, source.texts[i0:i1])
    width = max(int(t.numel()) for t in tokens)
    n = len(tokens)
    vectors: np.ndarray | None = None
    side = np.zeros((n, width, 0), np.float32) if not model.exact_index else None
    lengths = np.zeros(n, np.int64)
    with eval_mode(model):
        for idx in length_batches([int(t.numel()) for t in tokens], batch_size):
            ids, lens = pad_ids([tokens[int(i)].tolist() for i in idx])
            vec, feats = caption_outputs(model, ids, lens, how)
            v = _numpy(vec)
            if vectors is None:
                vectors = np.zeros((n, v.shape[1]), np.float32)
            vectors[idx] = v
            lengths[idx] = lens.numpy()
            if feats is not None:
                f = _numpy(feats)
                if side is None or side.shape[2] == 0:
                    side = np.zeros((n, width, f.shape[2]), np.float32)
                side[idx, : f.shape[1]] = f
    assert vectors is not None
    names = [f"caption {source.ids[i]!r}" for i in range(i0, i1)]
    return Encoded(
        list(range(i0, i1)), _finite(vectors, "encoded features", names), side, lengths if side is not None else None
    )


def encode_items(
    model: MatchingModel, source: Source, i0: int, i1: int, batch_size: int, how: Encoding = FP32
) -> Encoded:
    """Items ``[i0, i1)`` of any source."""
    if isinstance(source, CaptionSource):
        return encode_captions(model, source, i0, i1, batch_size, how)
    if isinstance(source, (RegionSource, PhotoSource)):
        out: Encoded | None = None
        for b0 in range(i0, i1, batch_size):
            part = encode_images(model, source, b0, min(i1, b0 + batch_size), how)
            out = part if out is None else _concat(out, part)
        assert out is not None
        return out
    raise EslmatchError(f"not a gallery source: {type(source).__name__}")


def _concat(a: Encoded, b: Encoded) -> Encoded:
    skipped = (a.skipped or []) + (b.skipped or [])
    if not b.positions:
        return Encoded(a.positions, a.vectors, a.side, a.lengths, skipped)
    if not a.positions:
        return Encoded(b.positions, b.vectors, b.side, b.lengths, skipped)
    side = None if a.side is None or b.side is None else np.concatenate([a.side, b.side])
    lens = None if a.lengths is None or b.lengths is None else np.concatenate([a.lengths, b.lengths])
    return Encoded(a.positions + b.positions, np.concatenate([a.vectors, b.vectors]), side, lens, skipped)


# ---------------------------------------------------------------------- queries
@dataclass
class TextQueries:
    """Encoded query sentences: ``vectors (B, K)`` float32 for the first stage and, for a
    two-stage model, ``feats (B, W, Dt)`` on the model's device with ``lengths (B,)``."""

    vectors: np.ndarray
    feats: Tensor | None
    lengths: Tensor


def encode_texts(model: MatchingModel, texts: Sequence[str], how: Encoding = FP32) -> TextQueries:
    """Tokenise the queries once (padded), embed them, and take their first-stage vectors."""
    try:
        ids, lens = model.tokenize(list(texts))
    except InputError as exc:
        raise EslmatchError(f"query: {exc}") from None
    with eval_mode(model):
        vec, feats = caption_outputs(model, ids, lens, how)
    return TextQueries(_finite(_numpy(vec), "encoded features", [f"query {i}" for i in range(len(texts))]), feats, lens)


@dataclass
class ImageQuery:
    """One encoded query image: ``vector (K,)`` and, for a two-stage model, ``side (1, R, Dt)``;
    ``fingerprint``: the model of the gallery it was read from (a stored item), if any."""

    vector: np.ndarray
    side: Tensor | None
    fingerprint: str | None = None


def encode_image_query(model: MatchingModel, query: Any, how: Encoding = FP32) -> ImageQuery:
    """A query image: an image file (:class:`~pathlib.Path`) or PIL image (models that take
    pixels), preprocessed pixels ``(3, H, W)``, or region features ``(R, D)`` / ``(1, R, D)``."""
    if is_image_file(query):
        if model.inputs != "pixels":
            raise EslmatchError(
                f"this model ({type(model).__name__}) takes region features, not image files: give the image's "
                "region features (R, D), made by 'eslmatch extract'"
            )
        if isinstance(query, Path):
            try:
                query = open_image(query)
            except SkipImage as exc:
                raise EslmatchError(f"{query}: {exc}") from None
        else:
            query = to_rgb(query)
        query = model.preprocess_image(query)
    x = torch.as_tensor(np.asarray(query) if not isinstance(query, Tensor) else query).float()
    want = 3 if model.inputs == "pixels" else 2
    if x.dim() == want:
        x = x[None]
    if x.dim() != want + 1 or x.shape[0] != 1:
        what = "pixels (3, H, W)" if want == 3 else "region features (R, D) or (1, R, D)"
        raise EslmatchError(f"a query image must be {what}, got {tuple(x.shape)}")
    _finite(x.numpy(), "values", ["the query image"])
    with eval_mode(model):
        vec, side, _ = image_outputs(model, x, None, how)
    return ImageQuery(_numpy(vec)[0], side)


def caption_words(model: MatchingModel, text: str, ids: Tensor) -> list[str]:
    """A display string for each token of ``text`` (``ids (W,)`` from ``model.tokenize``)."""
    tok = model.tokenizer
    if isinstance(tok, WordVocab):
        shown = ["<start>", *words(text), "<end>"]
        if len(shown) == ids.numel():
            return shown
        return [tok.tokens[i] for i in ids.tolist()]
    convert = getattr(tok, "convert_ids_to_tokens", None)
    if convert is not None:
        return [str(t) for t in convert(ids.tolist())]
    return [str(i) for i in ids.tolist()]


# ---------------------------------------------------------------------- ONNX Runtime
EXPORT_SUBDIR = "onnx"


def find_export(onnx_dir: str | Path | None, model_path: str | Path | None) -> Path:
    """The ONNX export to run: ``onnx_dir``, else ``MODEL/onnx`` beside a model folder
    (where ``eslmatch export MODEL --format onnx --out MODEL/onnx`` writes it)."""
    if onnx_dir is not None:
        return Path(onnx_dir)
    if model_path is not None and Path(model_path).is_dir() and (Path(model_path) / EXPORT_SUBDIR).is_dir():
        return Path(model_path) / EXPORT_SUBDIR
    raise EslmatchError(
        "--runtime onnxruntime needs the model's exported encoders: give --onnx DIR, or export them into the model "
        "folder (eslmatch export MODEL --format onnx --out MODEL/onnx)"
    )


def open_onnx(model: MatchingModel, directory: str | Path) -> Any:
    """The exported encoders at ``directory`` (:class:`~eslmatch.export.onnx.OnnxEncoders`),
    checked against ``model``: the same configuration, and one probe caption encoded alike
    (an export of other weights is refused)."""
    from ..export.onnx import OnnxEncoders, require_onnx

    require_onnx(runtime_only=True)
    enc = OnnxEncoders.open(directory)
    import json

    same = json.dumps(enc.manifest.get("model_config"), sort_keys=True, default=str) == json.dumps(
        model.config.to_dict(), sort_keys=True, default=str
    )
    if not same or bool(enc.exact_index) != bool(model.exact_index):
        raise EslmatchError(f"{directory}: an export of another model (its configuration differs); export this one")
    ids, lens = model.tokenize(["a photo of two dogs on a beach"])
    with eval_mode(model):
        want, _ = caption_outputs(model, ids, lens)
    got, _ = caption_outputs(model, ids, lens, Encoding("fp32", enc))
    diff = float((want.cpu() - got.cpu()).abs().max())
    if diff > 1e-3 * max(1.0, float(want.abs().max())):
        raise EslmatchError(
            f"{directory}: an export of other weights (a probe caption differs by {diff:.3g}); re-export"
        )
    return enc


def encoding_for(
    model: MatchingModel,
    precision: str | None,
    runtime: str = "torch",
    onnx_dir: str | Path | None = None,
    model_path: str | Path | None = None,
    default: Encoding | None = None,
) -> Encoding:
    """The :class:`Encoding` asked for: ``runtime`` ``torch`` in ``precision`` (``None``:
    ``default``, else fp32) or ``onnxruntime`` (the export :func:`find_export` finds)."""
    check_runtime(runtime)
    if runtime == "onnxruntime":
        return resolve_encoding(precision, model.device, open_onnx(model, find_export(onnx_dir, model_path)))
    if precision is None and default is not None:
        return default
    return resolve_encoding(precision, model.device)
