"""ONNX export of a model's two encoders, and an ONNX Runtime twin of the PyTorch encoders.

:func:`export_onnx` writes, into one folder:

- ``image_encoder.onnx``: what a gallery index stores for an image. Two-stage (ESL): region
  features ``regions (N, R, D)`` + ``lengths (N,)`` -> ``image_side (N, R, Dt)`` (the
  correspondence-transformed level features, :meth:`prepare_images`, padded regions zero) and
  ``vector (N, Dt)`` (their mean over real regions: the first-stage vector,
  :meth:`index_vectors_images`). One-stage (VSE, ESL-CLIP): ``vector (N, K) =
  index_vectors_images(embed_images(x))`` from region features (VSE) or preprocessed
  ``pixels (N, 3, S, S)`` (ESL-CLIP: the CLIP image tower with the ESL head).
- ``text_encoder.onnx``: token ids ``ids (M, W)`` (+ ``lengths (M,)``) -> two-stage
  ``features (M, W, Dt)`` (level features, padding zero) and ``vector (M, Dt)`` (their mean
  over real words); one-stage ``vector (M, K) = index_vectors_captions(embed_captions(...))``.
- ``encoders.json``: family, inputs, outputs and their shapes (named axes are dynamic: batch,
  regions, length), the tokenizer, the exporter and the agreement with PyTorch measured at
  export; the tokenizer's files (``tokenizer/`` or ``vocab.json``) beside them.
- with ``quantize="int8"``: ``*.int8.onnx`` too (ONNX Runtime dynamic quantisation: int8
  weights of the matrix products, activations quantised on the fly).

The graphs come from ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer: it
works offline with transformers 5 models, where the dynamo exporter needs onnxscript) of the
model in eval mode, opset 17. :class:`OnnxEncoders` runs them with ONNX Runtime and gives
what :mod:`eslmatch.retrieval.encode` gives from the PyTorch model (torch tensors, float32).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import EslmatchError, InputError
from ..model.base import MatchingModel, takes_pixels
from ..text import WordVocab
from ..text import tokenize as tokenize_with
from ..utils import atomic_dir, lengths_to_mask, masked_mean
from ..utils.io import check_replaceable

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

    from ..model.esl_clip.tokenizer import ClipTokenizer
    from ..text import TextTokenizer

log = logging.getLogger(__name__)
FORMAT = "eslmatch-onnx/1"
MANIFEST = "encoders.json"
OPSET = 17
VARIANTS = ("fp32", "int8")
FILES = {"image": "image_encoder", "text": "text_encoder"}
EXPORTER = "torch.onnx.export, TorchScript tracer (dynamo=False)"


class TensorInfo(TypedDict):
    """An encoder's input or output in ``encoders.json``: str entries of ``shape`` are named
    (dynamic) axes."""

    name: str
    dtype: str
    shape: list[str | int]


class EncoderEntry(TypedDict):
    """One encoder in ``encoders.json``."""

    files: dict[str, str]  # variant (fp32 / int8) -> file name
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    gives: str
    agreement: dict[str, dict[str, float]]  # variant -> max_rel_err, min_cosine


class _TokenizerKind(TypedDict):
    kind: str  # none / word / transformers / clip


class TokenizerEntry(_TokenizerKind, total=False):
    """How ``encoders.json`` records the tokenizer (:func:`save_tokenizer`)."""

    path: str  # word, transformers: its file or folder in the export
    context_length: int  # clip


class _ManifestBase(TypedDict):
    format: str
    eslmatch_version: str
    family: str
    exact_index: bool
    takes_pixels: bool
    exporter: str
    opset: int
    torch: str
    created: str
    variants: list[str]
    model_config: dict[str, Any]  # the model's config.json: values of any JSON type
    encoders: dict[str, EncoderEntry]  # image / text


class OnnxManifest(_ManifestBase, total=False):
    """``encoders.json`` of an export (:func:`export_onnx`)."""

    tokenizer: TokenizerEntry


def require_onnx(runtime_only: bool = False) -> None:
    """Refuse early, in one line, when the optional ``onnx`` extra is missing."""
    needed = ["onnxruntime"] if runtime_only else ["onnx", "onnxruntime"]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise EslmatchError(f"ONNX needs {' and '.join(missing)}: pip install 'eslmatch[onnx]'")


# ---------------------------------------------------------------------------- what is traced
def _zero_padding(x: Tensor, lengths: Tensor) -> Tensor:
    """``x (B, T, D)`` with positions at or beyond ``lengths[b]`` set to 0."""
    return x * lengths_to_mask(lengths, x.shape[1])[..., None].to(x.dtype)


class _TwoStageImages(nn.Module):
    """``regions (N, R, D), lengths (N,)`` -> ``image_side (N, R, Dt), vector (N, Dt)``."""

    def __init__(self, model: MatchingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, regions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        side = _zero_padding(self.model.prepare_images(self.model.embed_images(regions, lengths)), lengths)
        return side, masked_mean(side, lengths)


class _TwoStageCaptions(nn.Module):
    """``ids (M, W), lengths (M,)`` -> ``features (M, W, Dt), vector (M, Dt)``."""

    def __init__(self, model: MatchingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        feats = _zero_padding(self.model.embed_captions(ids, lengths), lengths)
        return feats, masked_mean(feats, lengths)


class _OneStage(nn.Module):
    """The index vectors ``(B, K)`` of one side: ``index_vectors_X(embed_X(x, lengths))``."""

    def __init__(self, model: MatchingModel, side: str) -> None:
        super().__init__()
        self.model = model
        self.side = side

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.side == "image":
            return self.model.index_vectors_images(self.model.embed_images(x, lengths), lengths)
        return self.model.index_vectors_captions(self.model.embed_captions(x, lengths), lengths)


@dataclass
class EncoderGraph:
    """One encoder to export: the module traced, its example inputs and its named axes."""

    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    example: tuple[Tensor, ...]
    axes: dict[str, list[str | int]]  # name -> shape, str entries are dynamic axes
    gives: str
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The exporter gives a module back in the mode it found it, children included: a
        # wrapper left in training mode would put the model's BatchNorm in training mode.
        self.module.eval()
        self.dynamic = {n: {i: a for i, a in enumerate(shape) if isinstance(a, str)} for n, shape in self.axes.items()}


def encoder_graphs(model: MatchingModel) -> dict[str, EncoderGraph]:
    """The image and text encoders of ``model`` as traceable modules (see the module docstring);
    puts ``model`` in eval mode."""
    cfg: Any = model.config
    one_stage = bool(model.exact_index)
    dev = model.device
    lengths = torch.tensor([3, 2], device=dev)
    model.eval()
    if takes_pixels(model):
        size = int(cfg.clip.image_size)
        image_example: tuple[Tensor, ...] = (torch.randn(2, 3, size, size, device=dev), lengths)
        image_in: dict[str, list[str | int]] = {"pixels": ["batch", 3, size, size], "lengths": ["batch"]}
    else:
        image_example = (torch.rand(2, 3, int(cfg.img_dim), device=dev), lengths)
        image_in = {"regions": ["batch", "regions", int(cfg.img_dim)], "lengths": ["batch"]}
    vocab = model.vocab_size() or 1000
    ids = torch.randint(1, max(2, vocab), (2, 5), generator=torch.Generator().manual_seed(0)).to(dev)
    ids[1, 3:] = 0
    text_example = (ids, torch.tensor([5, 3], device=dev))
    text_in: dict[str, list[str | int]] = {"ids": ["batch", "length"], "lengths": ["batch"]}
    if one_stage:
        with torch.no_grad():
            k = int(model.index_vectors_images(model.embed_images(*image_example), image_example[1]).shape[-1])
        return {
            "image": EncoderGraph(
                _OneStage(model, "image"),
                list(image_in),
                ["vector"],
                image_example,
                {**image_in, "vector": ["batch", k]},
                "index_vectors_images(embed_images(x)): their inner product with the text vector IS the score",
            ),
            "text": EncoderGraph(
                _OneStage(model, "text"),
                list(text_in),
                ["vector"],
                text_example,
                {**text_in, "vector": ["batch", k]},
                "index_vectors_captions(embed_captions(ids, lengths))",
            ),
        }
    dim = int(cfg.total_dim)
    return {
        "image": EncoderGraph(
            _TwoStageImages(model),
            list(image_in),
            ["image_side", "vector"],
            image_example,
            {**image_in, "image_side": ["batch", "regions", dim], "vector": ["batch", dim]},
            "image_side = prepare_images(embed_images(x)) (padding zero); vector = index_vectors_images (its "
            "mean over real regions, the first-stage vector)",
        ),
        "text": EncoderGraph(
            _TwoStageCaptions(model),
            list(text_in),
            ["features", "vector"],
            text_example,
            {**text_in, "features": ["batch", "length", dim], "vector": ["batch", dim]},
            "features = embed_captions(ids, lengths) (padding zero); vector = index_vectors_captions",
        ),
    }


# ---------------------------------------------------------------------------- export
def export_onnx(
    model: MatchingModel,
    out_dir: str | Path,
    quantize: str | None = None,
    opset: int = OPSET,
) -> OnnxManifest:
    """Write ``model``'s encoders as ONNX into ``out_dir`` (atomically); returns the manifest.

    Args:
        model: any family (ESL, VSE, ESL-CLIP), exported in eval mode from its device.
        quantize: ``None`` or ``"int8"`` (also write ONNX Runtime dynamically quantised copies).
        opset: the ONNX opset (17 by default).
    Raises:
        EslmatchError: the ``onnx`` extra is missing, ``quantize`` is unknown, ``out_dir``
            is a file or a non-empty folder that is not an export.
    """
    require_onnx()
    if quantize not in (None, "int8"):
        raise EslmatchError(f"--quantize {quantize!r}: only int8 is supported")
    check_opset(opset)
    out = Path(out_dir)
    check_out_dir(out)
    was_training = model.training
    model.eval()
    manifest: OnnxManifest = {
        "format": FORMAT,
        "eslmatch_version": __version__,
        "family": model.config.model_type,
        "exact_index": bool(model.exact_index),
        "takes_pixels": takes_pixels(model),
        "exporter": EXPORTER,
        "opset": opset,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "variants": ["fp32"] + (["int8"] if quantize else []),
        "model_config": model.config.to_dict(),
        "encoders": {},
    }
    try:
        graphs = encoder_graphs(model)
        with atomic_dir(out) as tmp:
            manifest["tokenizer"] = save_tokenizer(model.tokenizer, tmp)
            for side, graph in graphs.items():
                files = {"fp32": f"{FILES[side]}.onnx"}
                t0 = time.perf_counter()
                _export_one(model, graph, tmp / files["fp32"], opset)
                inputs = _graph_inputs(tmp / files["fp32"])
                if quantize:
                    files["int8"] = f"{FILES[side]}.int8.onnx"
                    quantize_int8(tmp / files["fp32"], tmp / files["int8"])
                manifest["encoders"][side] = {
                    "files": files,
                    "inputs": [_tensor_info(n, graph.axes[n], graph.example[graph.inputs.index(n)]) for n in inputs],
                    "outputs": [{"name": n, "dtype": "float32", "shape": graph.axes[n]} for n in graph.outputs],
                    "gives": graph.gives,
                    "agreement": {v: _agreement(graph, tmp / f, inputs) for v, f in files.items()},
                }
                log.info(f"exported the {side} encoder ({time.perf_counter() - t0:.1f} s): {', '.join(files.values())}")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    finally:
        model.train(was_training)
    return manifest


def check_opset(opset: int) -> None:
    """Refuse an opset the exporter cannot write: at least 14 (attention needs it), at most
    what this torch's TorchScript exporter knows."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as most

    if not 14 <= opset <= most:
        raise EslmatchError(f"--opset {opset}: must be from 14 (attention needs it) to {most} (this torch's exporter)")


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that is not a folder, or a non-empty folder that is not an ONNX export."""
    check_replaceable(out, MANIFEST, "an eslmatch ONNX export")


def _export_one(model: MatchingModel, graph: EncoderGraph, path: Path, opset: int) -> None:
    with torch.no_grad(), model.uncached(), warnings.catch_warnings():
        # the tracer's notes about Python-side input checks (constants in the graph) and the
        # legacy exporter's deprecation: expected here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.module,
            graph.example,
            str(path),
            input_names=graph.inputs,
            output_names=graph.outputs,
            dynamic_axes={n: a for n, a in graph.dynamic.items() if a},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _graph_inputs(path: Path) -> list[str]:
    """The inputs the exported graph kept (an input the encoder ignores, e.g. ESL-CLIP's
    lengths, is dropped by the exporter)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _tensor_info(name: str, shape: list[str | int], example: Tensor) -> TensorInfo:
    return {"name": name, "dtype": "float32" if example.is_floating_point() else "int64", "shape": shape}


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights (per channel), activations on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def _agreement(graph: EncoderGraph, path: Path, inputs: list[str]) -> dict[str, float]:
    """ONNX Runtime against PyTorch on the export's example: max relative error and min cosine
    per item over real positions."""
    with torch.no_grad():
        ref = graph.module(*graph.example)
    refs = ref if isinstance(ref, tuple) else (ref,)
    session = ort_session(path)
    feed = {n: graph.example[graph.inputs.index(n)].cpu().numpy() for n in inputs}
    got = session.run(None, feed)
    lengths = graph.example[1].cpu()
    worst, cosine = 0.0, 1.0
    for r, g in zip(refs, got):
        a, b = r.float().cpu(), torch.from_numpy(np.asarray(g))
        if a.dim() == 3:  # per position: real ones only
            mask = lengths_to_mask(lengths, a.shape[1])
            a, b = a[mask], b[mask]
        worst = max(worst, relative_error(b, a))
        cosine = min(cosine, float(nn.functional.cosine_similarity(a, b, dim=-1).min()))
    return {"max_rel_err": worst, "min_cosine": cosine}


def relative_error(got: Tensor, ref: Tensor) -> float:
    """``max |got - ref| / max |ref|`` (0 for an all-zero reference equal to ``got``)."""
    scale = float(ref.abs().max())
    diff = float((got.float() - ref.float()).abs().max())
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------- tokenizers
def save_tokenizer(tokenizer: TextTokenizer | ClipTokenizer | None, directory: Path) -> TokenizerEntry:
    """Write what :func:`load_saved_tokenizer` needs; returns its manifest entry."""
    if tokenizer is None:
        return {"kind": "none"}
    if isinstance(tokenizer, WordVocab):
        tokenizer.save(directory / "vocab.json")
        return {"kind": "word", "path": "vocab.json"}
    from transformers import PreTrainedTokenizerBase

    from ..text import SavedBertTokenizer

    if isinstance(tokenizer, (SavedBertTokenizer, PreTrainedTokenizerBase)):
        tokenizer.save_pretrained(str(directory / "tokenizer"))
        return {"kind": "transformers", "path": "tokenizer"}
    from ..model.esl_clip.tokenizer import ClipTokenizer

    if isinstance(tokenizer, ClipTokenizer):
        return {"kind": "clip", "context_length": int(tokenizer.context_length)}
    raise EslmatchError(f"cannot save a tokenizer of type {type(tokenizer).__name__} with the export")


def load_saved_tokenizer(entry: TokenizerEntry, directory: Path) -> TextTokenizer | ClipTokenizer | None:
    """The tokenizer :func:`save_tokenizer` wrote (``None`` for a model without one)."""
    kind = entry.get("kind")
    if kind == "word":
        return WordVocab.load(directory / str(entry["path"]))
    if kind == "transformers":
        from ..text import load_tokenizer

        return load_tokenizer(directory / str(entry["path"]), required=True)
    if kind == "clip":
        from ..model.esl_clip.tokenizer import ClipTokenizer

        return ClipTokenizer(int(entry["context_length"]))
    return None


# ---------------------------------------------------------------------------- the runtime
def ort_session(path: Path, threads: int | None = None, providers: Sequence[str] | None = None) -> InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def read_manifest(directory: str | Path) -> OnnxManifest:
    """``encoders.json`` of an export folder, checked (errors name the file)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EslmatchError(f"{directory}: not an eslmatch ONNX export (no {MANIFEST}; see eslmatch export)")
    try:
        manifest: OnnxManifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EslmatchError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EslmatchError(f"{path}: not format {FORMAT}")
    return manifest


class OnnxEncoders:
    """A model's exported encoders under ONNX Runtime, giving what the PyTorch model gives.

    ``encode_images`` / ``encode_captions`` mirror :mod:`eslmatch.retrieval.encode` (two-stage:
    ``(side or features (B, T, Dt), vector (B, Dt), lengths (B,))``; one-stage: ``(vector[:,
    None], vector, ones)``); ``image_vectors`` / ``caption_vectors`` give the index vectors
    ``(B, K)`` (ESL's first-stage vectors). Outputs are float32 CPU tensors.

    .. code-block:: python

        enc = OnnxEncoders.open("export/")                 # or variant="int8"
        ids, lengths = enc.tokenize(["a red circle left of a blue square"])
        query = enc.caption_vectors(ids, lengths)          # (1, K)
    """

    def __init__(
        self,
        directory: Path,
        manifest: OnnxManifest,
        sessions: dict[str, InferenceSession],
        tokenizer: TextTokenizer | ClipTokenizer | None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.variant = ""

    @classmethod
    def open(
        cls,
        directory: str | Path,
        variant: str = "fp32",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> OnnxEncoders:
        """Open an export folder. ``variant``: ``fp32`` or ``int8`` (when exported with it)."""
        require_onnx(runtime_only=True)
        d = Path(directory)
        manifest = read_manifest(d)
        if variant not in VARIANTS or variant not in manifest.get("variants", []):
            raise EslmatchError(
                f"{d}: no {variant!r} encoders (this export has {', '.join(manifest.get('variants', []))})"
            )
        sessions = {}
        for side, info in manifest["encoders"].items():
            path = d / info["files"][variant]
            if not path.is_file():
                raise EslmatchError(f"{path}: missing from the export")
            sessions[side] = ort_session(path, threads, providers)
        entry: TokenizerEntry = manifest.get("tokenizer") or {"kind": "none"}  # none: an export without one
        enc = cls(d, manifest, sessions, load_saved_tokenizer(entry, d))
        enc.variant = variant
        return enc

    # ------------------------------------------------------------------ facts
    @property
    def exact_index(self) -> bool:
        """True: one-stage (the vectors' inner product IS the score); False: ESL's two stages."""
        return bool(self.manifest["exact_index"])

    @property
    def takes_pixels(self) -> bool:
        return bool(self.manifest["takes_pixels"])

    @property
    def dim(self) -> int:
        """Width ``K`` of the index vectors."""
        return int(self.manifest["encoders"]["image"]["outputs"][-1]["shape"][-1])

    def _inputs(self, side: str) -> list[str]:
        return [i["name"] for i in self.manifest["encoders"][side]["inputs"]]

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> ``(ids (M, W), lengths (M,))`` with the exported model's tokenizer."""
        from ..model.esl_clip.tokenizer import ClipTokenizer

        if isinstance(self.tokenizer, ClipTokenizer):
            return self.tokenizer(texts, pad_to_context=True)
        return tokenize_with(self.tokenizer, texts)

    def _run_text(self, ids: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None) -> tuple[list[Tensor], Tensor]:
        ids_np = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids_np.ndim != 2 or ids_np.shape[0] == 0:
            raise InputError(f"token ids must be (M >= 1, W), got shape {ids_np.shape}")
        lens = (ids_np != 0).sum(1) if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(-1)
        feed = {"ids": ids_np, "lengths": lens}
        out = self.sessions["text"].run(None, {n: feed[n] for n in self._inputs("text")})
        return [torch.from_numpy(np.asarray(o)) for o in out], torch.from_numpy(lens)

    def caption_vectors(self, ids: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None = None) -> Tensor:
        """``(M, K)`` index vectors of token ids (ESL: the first-stage vectors)."""
        out, _ = self._run_text(ids, lengths)
        return out[-1]

    def encode_captions(
        self, ids: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(features (M, W, Dt), vector (M, Dt), lengths (M,))`` of token ids (the features are
        what :func:`eslmatch.retrieval.encode.caption_outputs` reads of them)."""
        return self._encoded(*self._run_text(ids, lengths))

    def _encoded(self, out: list[Tensor], lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Two-stage ``(per position, vector, lengths)``; one-stage ``(vector[:, None], vector, ones)``."""
        if self.exact_index:
            vec = out[0]
            return vec[:, None, :], vec, torch.ones(vec.shape[0], dtype=torch.long)
        return out[0], out[1], lens

    # ------------------------------------------------------------------ images
    def _run_images(
        self, images: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None
    ) -> tuple[list[Tensor], Tensor]:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        if x.ndim == (3 if self.takes_pixels else 2):  # one image
            x = x[None]
        n = x.shape[0]
        if self.takes_pixels:
            lens = np.ones(n, dtype=np.int64)
            feed = {"pixels": x, "lengths": lens}
        else:
            lens = np.full(n, x.shape[1], dtype=np.int64) if lengths is None else np.asarray(lengths, np.int64)
            feed = {"regions": x, "lengths": lens.reshape(-1)}
        out = self.sessions["image"].run(None, {k: feed[k] for k in self._inputs("image")})
        return [torch.from_numpy(np.asarray(o)) for o in out], torch.from_numpy(np.asarray(feed["lengths"]))

    def image_vectors(self, images: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None = None) -> Tensor:
        """``(N, K)`` index vectors of region features ``(N, R, D)`` or pixels ``(N, 3, S, S)``."""
        out, _ = self._run_images(images, lengths)
        return out[-1]

    def encode_images(
        self, images: Tensor | np.ndarray, lengths: Tensor | np.ndarray | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(image side (N, R, Dt), vector (N, Dt), lengths (N,))``, as
        :func:`eslmatch.retrieval.encode.encode_images` gives."""
        return self._encoded(*self._run_images(images, lengths))
