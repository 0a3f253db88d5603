"""``eslmatch eval`` as one library call: :func:`evaluate` returns what ``eslmatch eval --json``
prints (:meth:`Evaluation.to_json`, byte for byte) and :func:`format_evaluation` the table it
prints otherwise.

- Retrieval (``f30k``, ``coco1k``, ``coco5k``): models encode a split (an ensemble averages their
  ``(N, k N)`` score matrices), or saved matrices are read; R@K / medr / meanr / rsum under the
  protocol, truth-based P@K / R@K (``truth``), ECCV Caption / CxC metrics (``extended``, coco5k).
- Compositional (``sugarcrepe``, ``winoground``): models score the benchmark's pairs (an ensemble
  averages the ``(P,)`` pair scores).

Bad input raises :class:`~eslmatch.errors.EslmatchError` with the command's one-line messages
(which name its options: ``models`` is ``--checkpoint``, ``save_scores`` ``--save-scores``...),
before any model is loaded or anything is encoded wherever that can be known.

This module sits beside, not inside, the metrics of :mod:`eslmatch.evaluate`, which
:mod:`eslmatch.truth` and :mod:`eslmatch.annotations` build on, so it may use them all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..annotations import compositional as comp
from ..annotations.coco import load_coco_captions, match_caption_ids, read_ids, resolve_image_ids
from ..annotations.extended import annotation_dir, check_ids, extended_metrics, format_extended, parse_extended
from ..data import open_split
from ..data.precomp import PrecompSplit
from ..data.raw import ImageCaptionSplit, open_image_split
from ..errors import EslmatchError
from ..factory import load_model
from ..model import MatchingModel
from ..model.base import takes_pixels
from ..scoring import ScoringOptions
from ..truth import check_truth, evaluate_truth, format_truth_metrics, load_truth
from ..utils import atomic_save_npy, resolve_device
from ..utils.choices import COMPOSITIONAL_PROTOCOLS
from ..utils.precision import resolve_precision
from . import (
    check_protocol_size,
    check_score_matrix,
    ensemble,
    evaluate_protocol,
    format_metrics,
    get_protocol,
    score_image_split,
    score_split,
)

ModelSource = str | Path | MatchingModel
"""A model directory, a released ``.pth.tar`` (:func:`eslmatch.factory.load_model`), or a model."""
ScoreSource = str | Path | np.ndarray
"""A saved ``(N, k N)`` ``.npy`` score matrix (plain, never unpickled), or the matrix itself."""


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` computed.

    Attributes:
        metrics: the JSON-ready result, as ``eslmatch eval --json`` prints it. Retrieval:
            ``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum", "protocol", "n_images",
            "n_captions", "captions_per_image", "standard_size", "models"}`` plus ``"folds"`` /
            ``"fold_size"`` (coco1k), ``"split"``, ``"data"``, ``"precision"`` (models),
            ``"ensemble"``, ``"truth"``, ``"extended"`` / ``"extended_info"``, ``"saved_scores"``.
            Compositional: ``{"protocol", "models", "data", "precision", "sugarcrepe" |
            "winoground"}`` plus ``"ensemble"``.
        scores: what was ranked: the ``(N, k N)`` score matrix (rows images, columns captions;
            float64 for an ensemble, else as scored or loaded), or the ``(P,)`` pair scores of a
            compositional benchmark.
    """

    metrics: dict[str, Any]
    scores: np.ndarray

    def to_json(self) -> str:
        """``metrics`` as ``eslmatch eval --json`` prints it (two-space indent, key order kept)."""
        return json.dumps(self.metrics, indent=2)


@dataclass(frozen=True)
class _Ids:
    """Where the COCO ids of the extended metrics come from (see :func:`evaluate`)."""

    image_ids: str | Path | None
    caption_ids: str | Path | None
    coco_captions: tuple[str | Path, ...]


@dataclass(frozen=True)
class _Encoding:
    """How models encode: the resolved device, the batch size, the engine's options and the
    encoders' precision (``fp32``, ``bf16``, ``auto``)."""

    device: torch.device
    batch_size: int
    options: ScoringOptions
    precision: str
    progress: bool

    def resolved(self) -> dict[str, str]:
        """The encoders' precision as run (``auto`` resolved), for the results."""
        return {"precision": resolve_precision(self.precision, self.device)}


def evaluate(
    protocol: str,
    *,
    models: Sequence[ModelSource] = (),
    scores: Sequence[ScoreSource] = (),
    names: Sequence[str] | None = None,
    data: str | Path | None = None,
    image_root: str | Path | None = None,
    data_name: str | None = None,
    split: str | None = None,
    precision: str | None = None,
    fold_size: int = 1000,
    captions_per_image: int = 5,
    text_model: str | Path | None = None,
    truth: str | Path | None = None,
    save_scores: str | Path | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = "auto",
    options: ScoringOptions | None = None,
    full_check: bool = False,
    progress: bool = True,
    extended: str | Sequence[str] | None = None,
    image_ids: str | Path | None = None,
    caption_ids: str | Path | None = None,
    coco_captions: Sequence[str | Path] = (),
    features: str | Path | None = None,
) -> Evaluation:
    """Evaluate models, an ensemble or saved score matrices: ``eslmatch eval`` from Python.

    Args:
        protocol: ``f30k``, ``coco1k``, ``coco5k`` (retrieval) or ``sugarcrepe``,
            ``winoground`` (compositional).
        models: model directories, released checkpoints or loaded models (several: an
            ensemble, the mean of their scores). Exactly one of ``models`` and ``scores``.
        scores: saved ``(N, k N)`` score matrices (retrieval only; several: their mean).
        names: what ``metrics["models"]`` calls each model or matrix (default: each path as
            given; ``"model 1"``, ``"scores 1"``... for objects and arrays).
        data: retrieval: a precomp folder or its parent, or for models that take pixels a
            Karpathy-split JSON or captions TSV (``{split}`` replaced); sugarcrepe: the folder of
            its JSON files; winoground: ``examples.jsonl`` or its folder.
        image_root: the raw images (models that take pixels; sugarcrepe: COCO ``val2017``).
        data_name: the dataset folder under ``data`` when it holds several.
        split: retrieval: the split (default ``test`` for f30k, ``testall`` for coco1k/coco5k);
            compositional: the file prefix in ``features`` (default ``test``).
        precision: the encoders' precision, ``fp32`` (default), ``bf16`` or ``auto`` (models only).
        fold_size: images per coco1k fold.
        captions_per_image: ``k`` of saved matrices and of raw-image splits (a precomp split
            knows its own).
        text_model: tokenizer directory or name for models loaded from paths.
        truth: a ``{split}_truth.json`` file: adds ``metrics["truth"]`` (:mod:`eslmatch.truth`).
        save_scores: write the (ensemble) ``(N, k N)`` matrix there, float32, after success.
        batch_size: encoding batch size.
        device: ``"auto"``, ``"cpu"``, ``"cuda:1"``... (:func:`eslmatch.utils.resolve_device`).
        options: the scoring engine's options (default :class:`ScoringOptions()`).
        full_check: scan every image row of a precomp split for NaN/inf (default: a sample).
        progress: progress bars while encoding a precomp split.
        extended: ECCV Caption / CxC sets, ``"eccv,cxc"`` or ``("eccv", "cxc")`` (coco5k only;
            needs the eccv-caption package): adds ``metrics["extended"]`` / ``["extended_info"]``.
        image_ids: file of the COCO image id of each row (default: from the data).
        caption_ids: file of the COCO caption annotation id of each column (default: captions
            matched by text in ``coco_captions``).
        coco_captions: COCO's ``captions_val2014.json`` (and ``captions_train2014.json``).
        features: compositional, region models: a folder written by ``eslmatch extract`` over the
            benchmark's images.
    Returns:
        an :class:`Evaluation`: ``metrics`` (the ``--json`` dict) and the scores ranked.
    Raises:
        EslmatchError: bad input, with the one-line message ``eslmatch eval`` prints.
    """
    sets_text = extended if extended is None or isinstance(extended, str) else ",".join(extended)
    ids = _Ids(image_ids, caption_ids, tuple(coco_captions))
    if models and scores:
        raise EslmatchError("give models or score matrices, not both")
    if protocol in COMPOSITIONAL_PROTOCOLS:
        misplaced = [
            opt
            for opt, value in (
                ("--scores", scores),
                ("--extended", sets_text),
                ("--image-ids", image_ids),
                ("--caption-ids", caption_ids),
                ("--coco-captions", ids.coco_captions),
                ("--truth", truth),
                ("--save-scores", save_scores),
            )
            if value
        ]
        if misplaced:
            raise EslmatchError(f"{misplaced[0]} does not go with --protocol {protocol} (it scores models' pairs)")
        return _evaluate_compositional(
            protocol,
            models,
            names,
            data=data,
            image_root=image_root,
            features=features,
            split=split,
            text_model=text_model,
            batch_size=batch_size,
            device=device,
            options=options,
            precision=precision,
        )
    proto = get_protocol(protocol)
    save = Path(save_scores) if save_scores else None
    if save is not None and save.is_dir():
        raise EslmatchError(f"--save-scores {save}: is a directory")
    if batch_size < 1:
        raise EslmatchError(f"--batch-size must be >= 1, got {batch_size}")
    if features:
        raise EslmatchError("--features goes with --protocol sugarcrepe or winoground")
    if scores and precision:
        raise EslmatchError("--precision sets how models encode: it does not apply to --scores")
    if not models and not scores:
        raise EslmatchError("give models (--checkpoint) or saved score matrices (--scores)")
    sets = _extended_sets(sets_text, ids, proto.name, from_scores=bool(scores))
    truth_lists = None
    if truth:  # format errors before any encoding; counts are checked against the scores below
        truth_lists = load_truth(truth, None, None)
    coco: tuple[np.ndarray, np.ndarray] | None = None
    if scores:
        cpi = captions_per_image
        labels = _labels(scores, names, "scores")
        matrices = [check_score_matrix(_score_matrix(s), cpi, name) for s, name in zip(scores, labels)]
        meta: dict[str, Any] = {"models": labels}
        if sets:
            coco = _coco_ids(ids, matrices[0].shape, cpi, None)
    else:
        if not data:
            raise EslmatchError("--data is needed with --checkpoint")
        enc = _Encoding(resolve_device(device), batch_size, options or ScoringOptions(), precision or "fp32", progress)
        split_name = split or proto.default_split
        labels = _labels(models, names, "model")
        loaded = _load_models(models, labels, enc.device, text_model)
        where = _Where(data, image_root, data_name, split_name, full_check, captions_per_image)
        matrices, cpi, meta, coco = _score_models(
            loaded, labels, where, proto.name, fold_size, ids if sets else None, enc
        )
    for name, m in zip(meta["models"], matrices):
        if m.shape != matrices[0].shape:
            raise EslmatchError(
                f"{name}: shape {m.shape} differs from that of {meta['models'][0]}: {matrices[0].shape}"
            )
    sims = matrices[0] if len(matrices) == 1 else ensemble(matrices)
    result = evaluate_protocol(sims, proto.name, fold_size=fold_size, captions_per_image=cpi)
    result.update(meta)
    if len(matrices) > 1:
        result["ensemble"] = len(matrices)
    if truth_lists is not None:
        checked = check_truth(truth_lists, sims.shape[0], sims.shape[1], source=str(truth))
        metrics = evaluate_truth(sims, checked, proto.name, fold_size=fold_size, captions_per_image=cpi)
        result["truth"] = {**metrics, "file": str(truth)}
    if coco is not None:
        ext = extended_metrics(sims, coco[0], coco[1], sets=sets)
        result["extended"] = ext["extended"]
        result["extended_info"] = ext["info"]
    if save is not None:
        atomic_save_npy(save, np.asarray(sims, dtype=np.float32))
        result["saved_scores"] = str(save)
    return Evaluation(result, sims)


def format_evaluation(result: Evaluation) -> str:
    """The table ``eslmatch eval`` prints without ``--json``: the protocol's metrics, then the
    truth-based and extended tables when computed, and where the scores were saved."""
    m = result.metrics
    if m["protocol"] in COMPOSITIONAL_PROTOCOLS:
        return comp.format_compositional(m)
    parts = [format_metrics(m)]
    if "truth" in m:
        parts.append("\n" + format_truth_metrics(m["truth"]))
    if "extended" in m:
        parts.append("\n" + format_extended(m["extended"], m["extended_info"]))
    if "saved_scores" in m:
        parts.append(f"saved the {m['n_images']} x {m['n_captions']} score matrix to {m['saved_scores']}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- inputs
def _labels(
    sources: Sequence[ModelSource] | Sequence[ScoreSource], names: Sequence[str] | None, kind: str
) -> list[str]:
    """What the results call each source: ``names``, else a path as given, else ``"{kind} {i}"``."""
    if names is not None:
        if len(names) != len(sources):
            raise EslmatchError(f"{len(names)} names for {len(sources)} {kind} sources")
        return [str(n) for n in names]
    return [str(s) if isinstance(s, (str, Path)) else f"{kind} {i + 1}" for i, s in enumerate(sources)]


def _score_matrix(source: ScoreSource) -> np.ndarray:
    """A score matrix given, or read from a plain ``.npy`` file (never unpickled)."""
    if isinstance(source, np.ndarray):
        return source
    p = Path(source)
    try:
        arr = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise EslmatchError(f"{p}: no such score file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise EslmatchError(
            f"{p}: not a plain .npy score matrix (pickled or corrupt files are not loaded): {exc}"
        ) from exc
    if not isinstance(arr, np.ndarray):
        raise EslmatchError(f"{p}: holds several arrays; give a single (N x 5N) .npy matrix")
    return arr


def _load_models(
    sources: Sequence[ModelSource], labels: Sequence[str], device: torch.device, text_model: str | Path | None
) -> list[MatchingModel]:
    """Every model, before any encoding: a bad one fails first."""
    out = []
    for source, label in zip(sources, labels):
        if isinstance(source, MatchingModel):
            model = source
        else:
            model = load_model(source, map_location=device, text_model=text_model)
        if model.tokenizer is None:
            raise EslmatchError(
                f"{label}: the model stores no tokenizer (released checkpoints do not): pass --text-model "
                f"with its BERT tokenizer's directory or name"
            )
        out.append(model)
    return out


# ---------------------------------------------------------------------------------------------- retrieval
@dataclass(frozen=True)
class _Where:
    """The split to encode: ``data`` (and ``image_root`` for models that take pixels)."""

    data: str | Path
    image_root: str | Path | None
    data_name: str | None
    split: str
    full_check: bool
    captions_per_image: int  # of a raw-image split (a precomp split knows its own)


def _score_models(
    models: list[MatchingModel],
    labels: list[str],
    where: _Where,
    protocol: str,
    fold_size: int,
    ids: _Ids | None,
    enc: _Encoding,
) -> tuple[list[np.ndarray], int, dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Each model's ``(N, k N)`` matrix of the split, its ``k``, the results' metadata and (with
    ``ids``) the COCO ids of rows and columns; the split and ids are checked before any encoding."""
    pixel_models = [takes_pixels(m) for m in models]
    if any(pixel_models) and not all(pixel_models):
        raise EslmatchError("an ensemble must take one kind of input: pixels (ESL-CLIP) or region features")
    split: PrecompSplit | ImageCaptionSplit
    if any(pixel_models):
        if not where.image_root:
            raise EslmatchError(
                "this model takes images: pass --image-root (the folder of the images) with --data "
                "(a Karpathy-split JSON or a captions TSV)"
            )
        split = open_image_split(where.data, where.image_root, where.split, where.captions_per_image)
        split.require_complete()
        source = str(split.source)
    else:
        if where.image_root:
            raise EslmatchError(
                f"{labels[0]} scores region features, not images: drop --image-root and give "
                "--data a precomp folder (eslmatch extract makes one from images)"
            )
        dims = {m.config.img_dim for m in models}
        if len(dims) > 1:
            raise EslmatchError(f"the models expect different image feature widths: {sorted(dims)}")
        split = open_split(
            where.data, where.split, img_dim=dims.pop(), data_name=where.data_name, full_check=where.full_check
        )
        source = str(split.root)
    check_protocol_size(protocol, split.n_images, fold_size)  # before any encoding
    shape = (split.n_images, split.n_captions)
    coco = _coco_ids(ids, shape, split.captions_per_image, split) if ids is not None else None
    if isinstance(split, ImageCaptionSplit):
        matrices = [
            score_image_split(m, split, enc.batch_size, enc.device, options=enc.options, precision=enc.precision)
            for m in models
        ]
    else:
        matrices = [
            score_split(
                m,
                split,
                enc.batch_size,
                enc.device,
                progress=enc.progress,
                options=enc.options,
                precision=enc.precision,
            )
            for m in models
        ]
    meta = {"models": labels, "split": where.split, "data": source, **enc.resolved()}
    return matrices, split.captions_per_image, meta, coco


# ---------------------------------------------------------------------------------------------- extended ids
def _extended_sets(text: str | None, ids: _Ids, protocol: str, from_scores: bool) -> tuple[str, ...]:
    """The extended sets, after refusing misplaced options and a missing package (before any loading)."""
    sets = parse_extended(text)
    given = [o for o, v in (("--image-ids", ids.image_ids), ("--caption-ids", ids.caption_ids)) if v]
    given += ["--coco-captions"] if ids.coco_captions else []
    if not sets:
        if given:
            raise EslmatchError(f"{given[0]} goes with --extended eccv,cxc")
        return ()
    if protocol != "coco5k":
        raise EslmatchError(
            f"--extended: the ECCV Caption and CxC annotations cover the COCO 5K test split: use --protocol coco5k, "
            f"not {protocol}"
        )
    annotation_dir()
    if from_scores and not (ids.image_ids and ids.caption_ids):
        raise EslmatchError(
            "--extended with --scores needs --image-ids (the COCO image id of each row) and --caption-ids "
            "(the COCO caption annotation id of each column)"
        )
    for path in (ids.image_ids, ids.caption_ids):
        if path:
            read_ids(path)  # the files' format, before any loading; counts are checked against the scores
    return sets


def _coco_ids(
    ids: _Ids, shape: tuple[int, int], cpi: int, split: PrecompSplit | ImageCaptionSplit | None
) -> tuple[np.ndarray, np.ndarray]:
    """COCO image ``(N,)`` and caption ``(k N,)`` ids of the score matrix: from the id files, or
    derived from ``split`` (its image ids, its captions matched by text in ``coco_captions``),
    checked against the 5K split."""
    coco = load_coco_captions(ids.coco_captions) if ids.coco_captions else None
    if isinstance(split, PrecompSplit):
        source = str(split.captions_path)
    else:
        source = "" if split is None else str(split.source)
    if ids.image_ids:
        image_ids = read_ids(ids.image_ids, shape[0], "image ids")
    elif split is not None and split.ids is not None:
        image_ids = resolve_image_ids(split.ids, coco, source)
    else:
        raise EslmatchError(
            f"{source}: the split names no image ids (no {split.name if split else ''}_ids.txt): pass --image-ids, "
            "the COCO image id of each image, one per line"
        )
    if ids.caption_ids:
        caption_ids = read_ids(ids.caption_ids, shape[1], "caption ids")
    elif coco is not None and split is not None:
        caption_ids = match_caption_ids(split.captions, np.repeat(image_ids, cpi), coco, source)
    else:
        raise EslmatchError(
            "--extended needs the COCO caption annotation id of every caption: pass --caption-ids FILE, or "
            "--coco-captions captions_val2014.json to match the captions by text"
        )
    return check_ids(
        image_ids,
        caption_ids,
        shape,
        cpi,
        image_source=str(ids.image_ids or f"{source} (image ids)"),
        caption_source=str(ids.caption_ids or f"{source} (caption ids)"),
    )


# ---------------------------------------------------------------------------------------------- compositional
def _evaluate_compositional(
    protocol: str,
    models: Sequence[ModelSource],
    names: Sequence[str] | None,
    *,
    data: str | Path | None,
    image_root: str | Path | None,
    features: str | Path | None,
    split: str | None,
    text_model: str | Path | None,
    batch_size: int,
    device: str | torch.device | None,
    options: ScoringOptions | None,
    precision: str | None,
) -> Evaluation:
    """SugarCrepe / Winoground: every model scores the benchmark's ``(P,)`` pairs; an ensemble
    averages the pair scores. Every image is found before any model is loaded."""
    if batch_size < 1:
        raise EslmatchError(f"--batch-size must be >= 1, got {batch_size}")
    if not data:
        raise EslmatchError(f"--protocol {protocol} needs --data (see docs/evaluation.md)")
    if not image_root and not features:
        raise EslmatchError("pass --image-root (models that take images) and/or --features (region models)")
    if not models:
        raise EslmatchError(f"--protocol {protocol} scores models: give at least one (--checkpoint)")
    bench = comp.load_sugarcrepe(data) if protocol == "sugarcrepe" else comp.load_winoground(data)
    folder = comp.open_features(features, split or "test") if features else None
    inputs = comp.resolve_inputs(bench, image_root, folder)  # a missing image fails before any model loads
    enc = _Encoding(resolve_device(device), batch_size, options or ScoringOptions(), precision or "fp32", True)
    labels = _labels(models, names, "model")
    loaded = _load_models(models, labels, enc.device, text_model)
    for label, model in zip(labels, loaded):
        comp.check_inputs(model, inputs, label)
        if folder is not None and not takes_pixels(model) and model.config.img_dim != folder.rows.shape[2]:
            raise EslmatchError(
                f"{label}: expects features of width {model.config.img_dim}, {folder.folder} holds "
                f"{folder.rows.shape[2]}"
            )
    runs = [
        comp.score_compositional(m, bench, inputs, enc.batch_size, enc.device, enc.options, enc.precision)
        for m in loaded
    ]
    scores = np.mean(runs, axis=0)
    result: dict[str, Any] = {"protocol": protocol, "models": labels, "data": str(bench.source), **enc.resolved()}
    if protocol == "sugarcrepe":
        result["sugarcrepe"] = comp.sugarcrepe_metrics(bench, scores)
    else:
        result["winoground"] = comp.winoground_metrics(bench, scores)
    if len(loaded) > 1:
        result["ensemble"] = len(loaded)
    return Evaluation(result, scores)
