"""Training: configuration, the training step, checkpoints and exact resume.

``eslmatch train --config FILE [key=value ...] [--resume]`` runs :func:`train`. The recipe
is the released one (spec section 5): hinge triplet loss summed over negatives during the
warm-up epochs, hardest negatives after; AdamW with the BERT backbone at ``lr *
bert_lr_factor``; the learning rate times ``lr_decay_factor`` from ``lr_decay_epoch`` on;
gradient-norm clipping; region dropping and word masking from the data layer; validation
(dev rsum) after every epoch. See ``docs/training.md``.

Exact resume: the order of the training captions is a pure function of ``(seed, epoch)``
(:class:`EpochBatchSampler`), augmentation draws depend on ``(seed, epoch, caption)``, and
the training state (weights, optimiser, schedule position, RNG states, best rsum) is saved
atomically every ``save_every_steps`` steps and at each epoch's end, so a resumed run skips
the batches already done and continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ESLConfig
from .distributed import (
    DistContext,
    broadcast_value,
    enable_sync_batchnorm,
    gather_lengths,
    gather_objects,
    gather_padded,
    init_distributed,
    rank_slice,
    shutdown,
    sum_value,
)
from .errors import CheckpointError, EslmatchError
from .losses import hinge_rows, triplet_loss

STATE_NAME = "training_state.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_COPY_NAME = "train_config.yaml"
TENSORBOARD_DIR = "tensorboard"
LAST_DIR = "last"
BEST_DIR = "best"
STATE_FORMAT = "eslmatch-train-state"
STATE_VERSION = 1
# Settings that may differ between a run and its resume without changing what is computed.
# (data_path, output_dir and device may move: same data, same run, another disk or GPU.)
RESUME_MAY_CHANGE = frozenset(
    {"epochs", "max_steps", "workers", "log_every", "save_every_steps", "progress", "tensorboard",
     "eval_batch_size", "dist_timeout_minutes", "data_path", "output_dir", "device"}
)


# ====================================================================== configuration
@dataclass
class TrainConfig:
    """Everything a training run needs (YAML keys have these names).

    Attributes:
        data_path: precomp folder, or a parent holding ``f30k_precomp`` / ``coco_precomp``.
        data_name: which dataset under ``data_path`` when it holds several (``f30k_precomp``...).
        train_split, val_split: split names (validation: dev rsum after every epoch).
        val_images: validate on the first N images only (``null``: the whole split).
        output_dir: where ``last/``, ``best/``, the training state and the logs go.
        model: :class:`~eslmatch.config.ESLConfig` fields (model_type, strategy, text_encoder,
            text_model, embed_size, ...).
        epochs: training epochs.
        batch_size: GLOBAL batch (split over the processes under torchrun).
        lr: AdamW learning rate; ``bert_lr_factor`` multiplies it for the BERT backbone.
        weight_decay: AdamW weight decay.
        lr_decay_epoch: from this epoch (0-based) on the learning rate is multiplied by
            ``lr_decay_factor`` (``null``: never).
        grad_clip: max gradient norm (0: no clipping).
        vse_mean_warmup_epochs: epochs summing the hinge over all negatives before the
            hardest-negative loss.
        region_drop, word_mask: training augmentation probabilities.
        vocab_min_count: GRU encoder only: words seen fewer times in the training captions
            map to ``<unk>``.
        seed: seeds initialisation, the caption order and augmentation.
        workers: DataLoader worker processes.
        log_every: steps between log records.
        save_every_steps: steps between resumable-state saves (also saved each epoch end).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        bf16: bf16 autocast of the forward pass on CUDA (ignored on CPU).
        max_steps: stop after this many optimiser steps in total (``null``: no limit).
        eval_batch_size: batch size of validation encoding.
        progress: tqdm progress bars (rank 0).
        tensorboard: write TensorBoard event files under ``output_dir/tensorboard``.
        dist_backend: ``auto`` (nccl on CUDA, gloo on CPU), ``nccl`` or ``gloo``.
        dist_timeout_minutes: collective timeout under torchrun.
    """

    data_path: str = ""
    data_name: str | None = None
    train_split: str = "train"
    val_split: str = "dev"
    val_images: int | None = None
    output_dir: str = "runs/eslmatch"
    model: ESLConfig = field(default_factory=ESLConfig)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 5e-4
    bert_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    lr_decay_epoch: int | None = 15
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0
    vse_mean_warmup_epochs: int = 1
    region_drop: float = 0.2
    word_mask: float = 0.2
    vocab_min_count: int = 1
    seed: int = 0
    workers: int = 2
    log_every: int = 20
    save_every_steps: int = 500
    device: str = "auto"
    bf16: bool = True
    max_steps: int | None = None
    eval_batch_size: int = 128
    progress: bool = True
    tensorboard: bool = True
    dist_backend: str = "auto"
    dist_timeout_minutes: float = 60.0

    def validate(self) -> None:
        """Raise :class:`EslmatchError` naming the first bad value."""
        if not self.data_path:
            raise EslmatchError("data_path is required (a precomp folder or its parent)")
        positive = ("epochs", "batch_size", "log_every", "save_every_steps", "eval_batch_size", "vocab_min_count")
        for name in positive:
            if getattr(self, name) < 1:
                raise EslmatchError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "val_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EslmatchError(f"{name} must be >= 1 or null, got {value}")
        for name in ("lr", "bert_lr_factor", "lr_decay_factor", "dist_timeout_minutes"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise EslmatchError(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise EslmatchError(f"{name} must be >= 0, got {value}")
        for name in ("region_drop", "word_mask"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EslmatchError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("workers", "vse_mean_warmup_epochs", "seed"):
            if getattr(self, name) < 0:
                raise EslmatchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_decay_epoch is not None and self.lr_decay_epoch < 0:
            raise EslmatchError(f"lr_decay_epoch must be >= 0 or null, got {self.lr_decay_epoch}")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise EslmatchError(f"dist_backend must be auto, nccl or gloo, got {self.dist_backend!r}")
        self.model.validate()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> TrainConfig:
        """Build and validate; unknown keys and wrong types are one error naming them."""
        if not isinstance(data, dict):
            raise EslmatchError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        unknown = _unknown_keys(data)
        if unknown:
            raise EslmatchError(f"{source}: unknown configuration key(s): {', '.join(unknown)}")
        values = {k: _coerce(k, v, _hints(cls)[k]) for k, v in data.items() if k != "model"}
        model_data = data.get("model") or {}
        if not isinstance(model_data, dict):
            raise EslmatchError(f"{source}: 'model' must be a mapping of ESLConfig keys, got {model_data!r}")
        model_values = {k: _coerce(f"model.{k}", v, _hints(ESLConfig)[k]) for k, v in model_data.items()}
        try:
            values["model"] = ESLConfig(**model_values)
            cfg = cls(**values)
            cfg.validate()
        except EslmatchError as exc:
            raise EslmatchError(f"{source}: {exc}") from exc
        return cfg


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    model = data.get("model")
    if isinstance(model, dict):
        model_known = {f.name for f in dataclasses.fields(ESLConfig)}
        unknown += sorted(f"model.{k}" for k in model if k not in model_known)
    return unknown


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint (int, float, bool, str, ``X | None``, dict)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    origin = typing.get_origin(hint) or hint
    check = ok.get(origin, (lambda v: isinstance(v, origin)) if isinstance(origin, type) else (lambda v: True))
    if not check(value):
        name = getattr(hint, "__name__", str(hint))
        raise EslmatchError(f"configuration key {key} must be {name}, got {value!r}")
    return float(value) if hint is float else value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["epochs=2", "model.embed_size=64"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise EslmatchError(f"override {item!r} is not KEY=VALUE (e.g. epochs=2 or model.embed_size=64)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "model"):
            raise EslmatchError(f"unknown configuration key(s): {key}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``overrides``; the ``model`` mapping is merged key by key."""
    merged = dict(base)
    for k, v in overrides.items():
        if k == "model" and isinstance(v, dict) and isinstance(merged.get("model"), dict):
            merged["model"] = {**merged["model"], **v}
        else:
            merged[k] = v
    return merged


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML training configuration and apply ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise EslmatchError(f"{p}: cannot read the configuration ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise EslmatchError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise EslmatchError(f"{p}: expected a mapping of keys to values at the top level")
        data = loaded
    over = parse_overrides(overrides)
    unknown = _unknown_keys(over)
    if unknown:
        raise EslmatchError(f"overrides: unknown configuration key(s): {', '.join(unknown)}")
    unknown = _unknown_keys(data)
    if unknown:
        raise EslmatchError(f"{source}: unknown configuration key(s): {', '.join(unknown)}")
    return TrainConfig.from_dict(merge_config(data, over), source)


# ====================================================================== batches
def steps_per_epoch(n_items: int, batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    return n_items // batch_size


def epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The caption order of ``epoch``: a permutation fixed by ``(seed, epoch)`` alone."""
    return np.random.default_rng([seed, epoch]).permutation(n_items)


class EpochBatchSampler:
    """Batches of caption indices of one epoch, from batch ``start`` on.

    Global batch ``k`` holds ``epoch_order(...)[k*B:(k+1)*B]``; each process takes its
    contiguous slice (``share``), so N processes together see exactly the global batch.
    """

    def __init__(
        self, n_items: int, batch_size: int, seed: int, epoch: int, start: int = 0, share: slice = slice(None)
    ) -> None:
        self.order = epoch_order(n_items, seed, epoch)
        self.batch_size = batch_size
        self.steps = steps_per_epoch(n_items, batch_size)
        self.start = start
        self.share = share

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for k in range(self.start, self.steps):
            yield self.order[k * b : (k + 1) * b][self.share].tolist()


# ====================================================================== the training step
def loss_terms(model: nn.Module) -> list[tuple[str, float, nn.Module]]:
    """``(name, weight, scorer)`` of every loss term.

    The matching loss scores with the model itself. An auxiliary global-embedding loss
    (``config.global_loss_weight > 0``) scores with ``model.global_head``, any module with
    the model's ``similarity`` / ``embed_images`` / ``embed_captions`` / ``score`` API (the
    VSE baseline's, for instance); the same hinge loss applies to it.
    """
    terms: list[tuple[str, float, nn.Module]] = [("match", 1.0, model)]
    weight = float(model.config.global_loss_weight)
    if weight > 0:
        head = getattr(model, "global_head", None)
        if head is None:
            raise EslmatchError(
                f"model.global_loss_weight is {weight} but this {model.config.model_type} model has no global "
                "embedding head; set it to 0"
            )
        terms.append(("global", weight, head))
    return terms


class TrainStep(nn.Module):
    """The loss of one batch, as a module (so DistributedDataParallel can wrap it).

    Alone, the batch is scored with ``model.similarity`` (the engine, with autograd) and
    the loss is :func:`~eslmatch.losses.triplet_loss`. Under torchrun, embeddings are
    all-gathered with gradients and this rank scores its images against every caption and
    every image against its captions: its share of the global loss, whose sum over ranks is
    the single-process loss of the global batch.

    Under bf16 autocast the encoders and level stacks run in bf16 and the engine
    (``model.score``) in float32: its tanh / softmax pooling is the precision-sensitive part
    and it expects both sides in one dtype.
    """

    def __init__(self, model: nn.Module, ctx: DistContext) -> None:
        super().__init__()
        self.model = model
        self.ctx = ctx
        self.terms = loss_terms(model)

    def forward(
        self, images: Tensor, image_lengths: Tensor, captions: Tensor, caption_lengths: Tensor, max_violation: bool
    ) -> dict[str, Tensor]:
        """Inputs of this rank's share ``(b, R, D)``, ``(b,)``, ``(b, W)``, ``(b,)``.

        Returns:
            ``{"loss": weighted sum of the terms, name: each term}`` (this rank's share).
        """
        margin = float(self.model.config.margin)
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, weight, scorer in self.terms:
            if self.ctx.distributed:
                value = self._global_batch_share(scorer, images, image_lengths, captions, caption_lengths,
                                                 margin, max_violation)
            elif not torch.is_autocast_enabled(images.device.type):
                sims = scorer.similarity(images, image_lengths, captions, caption_lengths)
                value = triplet_loss(_at_least_fp32(sims), margin, max_violation)
            else:
                img = scorer.embed_images(images, image_lengths)
                cap = scorer.embed_captions(captions, caption_lengths)
                value = triplet_loss(_score_fp32(scorer, img, image_lengths, cap, caption_lengths), margin,
                                     max_violation)
            out[name] = value
            total = weight * value if total is None else total + weight * value
        assert total is not None
        out["loss"] = total
        return out

    def _global_batch_share(
        self, scorer: nn.Module, images: Tensor, image_lengths: Tensor, captions: Tensor,
        caption_lengths: Tensor, margin: float, max_violation: bool,
    ) -> Tensor:
        ctx = self.ctx
        img = _at_least_fp32(scorer.embed_images(images, image_lengths))
        cap = _at_least_fp32(scorer.embed_captions(captions, caption_lengths))
        img_len = image_lengths.to(img.device)
        cap_len = caption_lengths.to(cap.device)
        img_all, cap_all = gather_padded(img, ctx), gather_padded(cap, ctx)
        img_len_all, cap_len_all = gather_lengths(img_len, ctx), gather_lengths(cap_len, ctx)
        b = img.shape[0]
        positives = torch.arange(b, device=img.device) + ctx.rank * b
        rows = _score_fp32(scorer, img, img_len, cap_all, cap_len_all)  # (b, B): my images, all captions
        cols = _score_fp32(scorer, img_all, img_len_all, cap, cap_len)  # (B, b): all images, my captions
        return hinge_rows(rows, positives, margin, max_violation) + hinge_rows(cols.t(), positives, margin,
                                                                               max_violation)


def _score_fp32(scorer: nn.Module, img: Tensor, img_len: Tensor, cap: Tensor, cap_len: Tensor) -> Tensor:
    """``scorer.score`` with autocast off and both sides at least float32."""
    with torch.autocast(img.device.type, enabled=False):
        return _at_least_fp32(scorer.score(_at_least_fp32(img), img_len, _at_least_fp32(cap), cap_len))


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16 scores (autocast) go up to float32 for the loss; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ====================================================================== optimiser and schedule
def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: the BERT backbone at ``lr * bert_lr_factor``, everything else at ``lr``."""
    backbone = getattr(getattr(model, "text_encoder", None), "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    bert = [p for p in model.parameters() if p.requires_grad and id(p) in backbone_ids]
    groups = [{"name": "main", "params": main, "lr_factor": 1.0}]
    if bert:
        groups.append({"name": "text_backbone", "params": bert, "lr_factor": cfg.bert_lr_factor})
    return groups


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Base learning rate of ``epoch`` (step decay)."""
    if cfg.lr_decay_epoch is not None and epoch >= cfg.lr_decay_epoch:
        return cfg.lr * cfg.lr_decay_factor
    return cfg.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    base = learning_rate(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * float(group.get("lr_factor", 1.0))
    return base


# ====================================================================== RNG and state files
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as plain tensors and numbers."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": {"version": int(py[0]), "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2]},
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state_file(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_file(path: Path) -> dict[str, Any]:
    """Read a training state written by :func:`save_state_file` (``weights_only=True``)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and truncated files alike
        raise CheckpointError(f"{path}: unreadable training state ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an eslmatch training state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {state.get('version')} is not {STATE_VERSION}")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (``model.x`` for model keys) whose values differ, except those resume may change."""
    diffs = [k for k in sorted(set(saved) | set(current))
             if k not in RESUME_MAY_CHANGE and k != "model" and saved.get(k) != current.get(k)]
    sm, cm = saved.get("model", {}), current.get("model", {})
    # vocab_size and text_hidden_size are filled in when the model is built.
    diffs += [f"model.{k}" for k in sorted(set(sm) | set(cm))
              if k not in ("vocab_size", "text_hidden_size") and sm.get(k) != cm.get(k)]
    return diffs


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ====================================================================== logging
class RunLog:
    """``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars; rank 0 only."""

    def __init__(self, output: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = output / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Records past the resumed step come from the interrupted run: drop them.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _record_step(line) <= resume_step]
            _write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("eslmatch: tensorboard is not installed; writing metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(output / TENSORBOARD_DIR), purge_step=resume_step)

    def record(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, **values}, sort_keys=True) + "\n")
        self.file.flush()

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


# ====================================================================== the run
@dataclass
class TrainResult:
    """What :func:`train` did."""

    output_dir: Path
    global_step: int
    epochs_done: int
    best_rsum: float | None
    history: list[dict[str, Any]]
    stopped_early: bool
    rank: int = 0


def _check_fresh_output(output: Path) -> None:
    ours = [n for n in (STATE_NAME, LAST_DIR, BEST_DIR, METRICS_NAME, CONFIG_COPY_NAME) if (output / n).exists()]
    if ours:
        raise EslmatchError(
            f"{output} already holds a training run ({', '.join(ours)}): pass --resume to continue it, "
            "or choose another output_dir"
        )


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _make_tokenizer(cfg: TrainConfig, train_split: Any, vocab_tokens: list[str] | None) -> Any:
    from .data import build_vocab
    from .text import WordVocab

    if cfg.model.text_encoder == "gru":
        if vocab_tokens is not None:
            return WordVocab(vocab_tokens)
        return build_vocab(train_split, min_count=cfg.vocab_min_count)
    from .model.esl import _load_tokenizer

    if not cfg.model.text_model:
        raise EslmatchError("model.text_model must name a BERT-family model (a local directory or Hub name)")
    return _load_tokenizer(cfg.model.text_model, required=True)


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) the model described by ``cfg``; see the module docstring.

    Under torchrun every process calls this; rank 0 writes everything.
    """
    from .data import CaptionDataset, collate, open_split
    from .evaluate import recall_metrics, score_split
    from .model.vse import build_model

    cfg.validate()
    ctx = init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout_minutes)
    try:
        output = Path(cfg.output_dir)
        # ---------------------------------------------------------------- everything checked
        state = load_state_file(output / STATE_NAME) if resume else None
        if state is not None:
            diffs = config_differences(state["config"], cfg.to_dict())
            if diffs:
                raise EslmatchError(
                    f"{output / STATE_NAME}: the configuration differs from the saved run in {', '.join(diffs)} "
                    f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume)"
                )
        elif ctx.is_main:
            _check_fresh_output(output)
        train_split = open_split(cfg.data_path, cfg.train_split, cfg.model.img_dim, cfg.data_name)
        val_split = open_split(cfg.data_path, cfg.val_split, cfg.model.img_dim, cfg.data_name)
        if cfg.val_images is not None and cfg.val_images < val_split.n_images:
            val_split = val_split.head(cfg.val_images)
        steps = steps_per_epoch(train_split.n_captions, cfg.batch_size)
        if steps < 1:
            raise EslmatchError(
                f"batch_size {cfg.batch_size} is larger than the {train_split.n_captions} training captions"
            )
        share = rank_slice(cfg.batch_size, ctx)

        _seed_all(cfg.seed)
        tokenizer = _make_tokenizer(cfg, train_split, state.get("vocab") if state else None)
        model_config = ESLConfig.from_dict(state["model_config"]) if state else cfg.model.replace()
        if model_config.text_encoder == "gru":
            model_config.vocab_size = len(tokenizer)
        model = build_model(model_config, tokenizer).to(ctx.device)
        enable_sync_batchnorm(model, ctx)
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)

        epoch, step_in_epoch, global_step = 0, 0, 0
        epoch_loss, epoch_batches = 0.0, 0  # this epoch's summed logged loss and its batch count
        best_rsum: float | None = None
        history: list[dict[str, Any]] = []
        if state is not None:
            from .model.esl import load_state_strict

            load_state_strict(model, state["model"], str(output / STATE_NAME))
            optimizer.load_state_dict(state["optimizer"])
            epoch, step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            global_step = int(state["global_step"])
            best_rsum = state["best_rsum"]
            epoch_loss, epoch_batches = float(state["epoch_loss"]), int(state["epoch_batches"])
            history = json.loads(state.get("history", "[]"))
            rngs = state["rng"]
            set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        else:
            # Ranks draw different dropout masks; initialisation above was the same everywhere.
            torch.manual_seed(int(np.random.SeedSequence([cfg.seed, ctx.rank]).generate_state(1)[0]))

        step_module: nn.Module = TrainStep(model, ctx)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            step_module = DistributedDataParallel(step_module, device_ids=ids)
        dataset = CaptionDataset(train_split, tokenizer, train=True, seed=cfg.seed,
                                 region_drop=cfg.region_drop, word_mask=cfg.word_mask)
        use_bf16 = cfg.bf16 and ctx.device.type == "cuda"

        # ---------------------------------------------------------------- outputs (rank 0)
        if ctx.is_main:
            import yaml

            output.mkdir(parents=True, exist_ok=True)
            _write_text_atomic(output / CONFIG_COPY_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = RunLog(output, ctx.is_main, cfg.tensorboard, global_step if state is not None else None)
        if ctx.is_main:
            counts = model.parameter_counts()
            what = "resuming" if state is not None else "training"
            print(f"eslmatch: {what} {model_config.model_type} ({model_config.text_encoder} text encoder, "
                  f"{counts['total']:,} parameters) on {ctx.device} x{ctx.world_size}: "
                  f"{train_split.n_captions} captions, {steps} steps/epoch, epochs {epoch + 1}..{cfg.epochs}, "
                  f"output {output}", flush=True)

        def save(epoch_: int, step_in_epoch_: int, with_model_dir: bool) -> None:
            rngs = gather_objects(rng_state(), ctx)
            if not ctx.is_main:
                return
            if with_model_dir:
                model.save_pretrained(output / LAST_DIR)
            save_state_file(
                {
                    "format": STATE_FORMAT, "version": STATE_VERSION,
                    "epoch": epoch_, "step_in_epoch": step_in_epoch_, "global_step": global_step,
                    "best_rsum": best_rsum, "history": json.dumps(history),
                    "epoch_loss": epoch_loss if step_in_epoch_ else 0.0,
                    "epoch_batches": epoch_batches if step_in_epoch_ else 0,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"epoch": epoch_, "base_lr": learning_rate(cfg, epoch_)},
                    "rng": rngs, "config": cfg.to_dict(), "model_config": model.config.to_dict(),
                    "vocab": list(tokenizer.tokens) if model_config.text_encoder == "gru" else None,
                },
                output / STATE_NAME,
            )
            log.record("save", epoch=epoch_, step=global_step, step_in_epoch=step_in_epoch_)

        start_time = time.time()
        stopped = False
        try:
            while epoch < cfg.epochs and not stopped:
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    stopped = True
                    break
                base_lr = set_learning_rate(optimizer, cfg, epoch)
                max_violation = epoch >= cfg.vse_mean_warmup_epochs
                dataset.set_epoch(epoch)
                sampler = EpochBatchSampler(train_split.n_captions, cfg.batch_size, cfg.seed, epoch,
                                            start=step_in_epoch, share=share)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
                    pin_memory=ctx.device.type == "cuda",
                    # An own generator: creating the loader never draws from the global RNG,
                    # which a resume restores exactly.
                    generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch),
                )
                model.train()
                window = torch.zeros((), device=ctx.device)
                window_n = 0
                bar = _progress_bar(cfg, ctx, steps, step_in_epoch, epoch)
                for batch in loader:
                    batch = batch.to(ctx.device, non_blocking=True)
                    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        losses = step_module(batch.images, batch.image_lengths, batch.captions,
                                             batch.caption_lengths, max_violation)
                    optimizer.zero_grad(set_to_none=True)
                    # DDP averages gradients over ranks; the loss is a sum over the global
                    # batch, so each rank's share is scaled back up.
                    (losses["loss"] * ctx.world_size).backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    global_step += 1
                    step_in_epoch += 1
                    window = window + losses["loss"].detach()
                    window_n += 1
                    if bar is not None:
                        bar.update(1)
                    done = cfg.max_steps is not None and global_step >= cfg.max_steps
                    saving = global_step % cfg.save_every_steps == 0 and step_in_epoch < steps
                    # a save flushes the loss window, so a resume holds no un-logged losses
                    if global_step % cfg.log_every == 0 or step_in_epoch == steps or done or saving:
                        mean_loss = float(sum_value(ctx, window)) / window_n
                        epoch_loss += mean_loss * window_n
                        epoch_batches += window_n
                        window = torch.zeros((), device=ctx.device)
                        window_n = 0
                        rec = {"epoch": epoch, "step": global_step, "step_in_epoch": step_in_epoch,
                               "loss": mean_loss, "lr": base_lr, "max_violation": max_violation,
                               "seconds": round(time.time() - start_time, 3)}
                        log.record("step", **rec)
                        log.scalars("train", {"loss": mean_loss, "lr": base_lr}, global_step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{base_lr:.2e}")
                    if done:
                        stopped = True
                        break
                    if saving:
                        save(epoch, step_in_epoch, with_model_dir=False)
                if bar is not None:
                    bar.close()
                if stopped and step_in_epoch < steps:
                    save(epoch, step_in_epoch, with_model_dir=True)
                    break
                # ------------------------------------------------------------ epoch end
                metrics: dict[str, Any] = {}
                rsum = 0.0
                if ctx.is_main:
                    sims = score_split(model, val_split, batch_size=cfg.eval_batch_size, device=ctx.device,
                                       progress=False)
                    metrics = recall_metrics(sims)
                    rsum = float(metrics["rsum"])
                rsum = broadcast_value(ctx, rsum)
                is_best = best_rsum is None or rsum > best_rsum
                if is_best:
                    best_rsum = rsum
                record = {"epoch": epoch, "step": global_step,
                          "train_loss": epoch_loss / max(epoch_batches, 1), "rsum": rsum, "best_rsum": best_rsum,
                          "is_best": is_best, "val": metrics, "seconds": round(time.time() - start_time, 3)}
                history.append(record)
                if ctx.is_main:
                    log.record("epoch", **record)
                    flat = {"rsum": rsum, **{f"{side}_{k}": v for side in ("i2t", "t2i")
                                              for k, v in metrics.get(side, {}).items()}}
                    log.scalars("val", flat, global_step)
                    print(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, dev rsum {rsum:.2f} "
                          f"(best {best_rsum:.2f})", flush=True)
                    if is_best:
                        model.save_pretrained(output / BEST_DIR)
                epoch += 1
                step_in_epoch = 0
                epoch_loss, epoch_batches = 0.0, 0
                save(epoch, 0, with_model_dir=True)
                model.train()
        finally:
            log.close()
        return TrainResult(output, global_step, epoch, best_rsum, history, stopped, ctx.rank)
    finally:
        shutdown(ctx)


def _progress_bar(cfg: TrainConfig, ctx: DistContext, steps: int, start: int, epoch: int) -> Any:
    if not (cfg.progress and ctx.is_main):
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal only, so redirected logs stay clean
    return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True,
                leave=False, disable=None)
