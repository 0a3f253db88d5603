"""The training configuration: a dataclass, read from YAML with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import LEGACY_KEYS, ESLConfig
from ..errors import EslmatchError
from ..factory import config_class

OPTIMIZERS = ("adamw", "bert-adamw")
SCHEDULES = ("step", "cosine")
VAL_AUTO = "auto"  # val_split=auto: validate on a held-out slice of the training images
VAL_AUTO_FRACTION = 0.1
# Settings that may differ between a run and its resume without changing what is computed.
# (data_path, output_dir and device may move: same data, same run, another disk or GPU.)
RESUME_MAY_CHANGE = frozenset(
    {
        "epochs",
        "max_steps",
        "workers",
        "log_every",
        "save_every_steps",
        "progress",
        "tensorboard",
        "eval_batch_size",
        "dist_timeout_minutes",
        "data_path",
        "output_dir",
        "device",
        "image_root",
    }
)


@dataclass
class TrainConfig:
    """Everything a training run needs (YAML keys have these names).

    Attributes:
        data_path: precomp folder, or a parent holding ``f30k_precomp`` / ``coco_precomp``.
        data_name: which dataset under ``data_path`` when it holds several (``f30k_precomp``...).
        train_split, val_split: split names (validation: its rsum after every epoch keeps
            ``best/``); ``val_split: auto`` holds out the last tenth of the training images
            (at least one) and validates on them instead (they are not trained on).
        val_images: validate on the first N images only (``null``: the whole split).
        output_dir: where ``last/``, ``best/``, the training state and the logs go.
        model: the model family's configuration: ``model_type`` picks it (``esl`` and
            ``vse``: :class:`~eslmatch.config.ESLConfig` fields such as strategy,
            text_encoder, text_model, embed_size; ``esl-clip``: its CLIP configuration).
        init_from: start from these weights instead of new ones: a released ``.pth.tar``
            or one of our model folders (fine-tuning; ``model`` must describe the same
            architecture, which is checked). ``null``: new weights.
        margin: hinge margin of the triplet loss.
        global_loss_weight: weight of the auxiliary first-stage loss (the same hinge on the
            index vectors' inner products; two-stage search). 0 in the released recipe.
        mask_true_pairs: read the training split's truth (``{train_split}_truth.json`` beside
            its captions, see :mod:`eslmatch.truth`) and never use a pair it calls true as a
            negative (false negatives: "three objects" is true of many images). False in the
            released recipe (every other pair of a batch is a negative).
        epochs: training epochs.
        batch_size: GLOBAL batch (split over the processes under torchrun).
        lr: AdamW learning rate; ``bert_lr_factor`` multiplies it for the pretrained backbone
            (BERT; both CLIP towers for ESL-CLIP), unless ``backbone_lr`` sets that one directly.
        backbone_lr: learning rate of the pretrained backbone (``null``: ``lr * bert_lr_factor``).
        optimizer: ``adamw`` (``torch.optim.AdamW``, the released ESL code) or ``bert-adamw``
            (the CLIP branch's AdamW: eps 1e-6, weight decay after the update).
        schedule: ``step`` (``lr_decay_factor`` from ``lr_decay_epoch`` on, per epoch) or
            ``cosine`` (linear warm-up over ``warmup_proportion`` of all steps, then a
            half-cosine to 0, per step: the CLIP branch).
        warmup_proportion: share of all optimiser steps spent warming up (``cosine``).
        image_root: folder of the raw images (ESL-CLIP; ``data_path`` is then a Karpathy JSON
            or a captions TSV).
        captions_per_image: captions kept per raw image.
        gradient_checkpointing: recompute the pretrained towers' activations in backward
            (models that support it, e.g. ESL-CLIP; less memory, more compute).
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
        bf16: bf16 autocast of the forward pass with float32 master weights: ``false``
            (float32, the released code's), ``true`` (on any device, CPU included) or
            ``auto`` (where the device computes bf16 natively: CUDA with bf16, a CPU with
            AMX or AVX512-BF16; float32 elsewhere).
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
    model: Any = field(default_factory=ESLConfig)
    init_from: str | None = None
    margin: float = 0.2
    global_loss_weight: float = 0.0
    mask_true_pairs: bool = False
    epochs: int = 30
    batch_size: int = 128
    lr: float = 5e-4
    bert_lr_factor: float = 0.1
    backbone_lr: float | None = None
    optimizer: str = "adamw"
    schedule: str = "step"
    warmup_proportion: float = 0.0
    image_root: str | None = None
    captions_per_image: int = 5
    gradient_checkpointing: bool = False
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
    bf16: bool | str = False
    max_steps: int | None = None
    eval_batch_size: int = 128
    progress: bool = True
    tensorboard: bool = True
    dist_backend: str = "auto"
    dist_timeout_minutes: float = 60.0

    def validate(self) -> None:
        """Raise :class:`EslmatchError` naming the first bad value."""
        positive = (
            "epochs",
            "batch_size",
            "log_every",
            "save_every_steps",
            "eval_batch_size",
            "vocab_min_count",
            "captions_per_image",
        )
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
        for name in ("weight_decay", "grad_clip", "margin", "global_loss_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise EslmatchError(f"{name} must be >= 0, got {value}")
        for name in ("region_drop", "word_mask"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EslmatchError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("workers", "vse_mean_warmup_epochs", "seed"):
            if getattr(self, name) < 0:
                raise EslmatchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backbone_lr is not None and (not math.isfinite(self.backbone_lr) or self.backbone_lr < 0):
            raise EslmatchError(f"backbone_lr must be >= 0 or null, got {self.backbone_lr}")
        if self.optimizer not in OPTIMIZERS:
            raise EslmatchError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise EslmatchError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_proportion < 1.0:
            raise EslmatchError(f"warmup_proportion must lie in [0, 1), got {self.warmup_proportion}")
        if self.lr_decay_epoch is not None and self.lr_decay_epoch < 0:
            raise EslmatchError(f"lr_decay_epoch must be >= 0 or null, got {self.lr_decay_epoch}")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            raise EslmatchError(f"bf16 must be true, false or auto, got {self.bf16!r}")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise EslmatchError(f"dist_backend must be auto, nccl or gloo, got {self.dist_backend!r}")
        self.model.validate()

    def require_data(self) -> None:
        """A run over data (``fit``) needs ``data_path``; the Trainer alone does not."""
        if not self.data_path:
            raise EslmatchError("data_path is required (a precomp folder or its parent)")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> TrainConfig:
        """Build and validate; unknown keys and wrong types are one error naming them."""
        if not isinstance(data, dict):
            raise EslmatchError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        data = migrate(data)
        unknown = _unknown_keys(data)
        if unknown:
            raise EslmatchError(f"{source}: unknown configuration key(s): {', '.join(unknown)}")
        values = {k: _coerce(k, v, _hints(cls)[k]) for k, v in data.items() if k != "model"}
        model_data = data.get("model") or {}
        if not isinstance(model_data, dict):
            raise EslmatchError(f"{source}: 'model' must be a mapping of model configuration keys, got {model_data!r}")
        try:
            model_cls = config_class(str(model_data.get("model_type", "esl")))
            model_values = {k: _coerce(f"model.{k}", v, _hints(model_cls)[k]) for k, v in model_data.items()}
            values["model"] = model_cls(**model_values)
            cfg = cls(**values)
            cfg.validate()
        except EslmatchError as exc:
            raise EslmatchError(f"{source}: {exc}") from exc
        return cfg


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A configuration written by eslmatch 0.1 in today's layout: the loss settings
    ``model.margin`` / ``model.global_loss_weight`` move up to the training configuration
    (unless set there too); ``model.text_hidden_size`` (read from the backbone now) goes."""
    model = data.get("model")
    if not isinstance(model, dict) or not LEGACY_KEYS & set(model):
        return data
    out = dict(data)
    out["model"] = {k: v for k, v in model.items() if k not in LEGACY_KEYS}
    for key in ("margin", "global_loss_weight"):
        if key in model:
            out.setdefault(key, model[key])
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_keys(data: dict[str, Any]) -> list[str]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    model = data.get("model")
    if isinstance(model, dict):
        try:
            model_cls = config_class(str(model.get("model_type", "esl")))
        except EslmatchError:
            return unknown + [f"model.model_type={model.get('model_type')!r}"]
        model_known = {f.name for f in dataclasses.fields(model_cls)}
        unknown += sorted(f"model.{k}" for k in model if k not in model_known)
    return unknown


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint (int, float, bool, str, ``X | None``, dict)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return value  # a nested configuration (e.g. model.clip), checked by its class
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
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    origin = typing.get_origin(hint) or hint
    check = ok.get(origin, (lambda v: isinstance(v, origin)) if isinstance(origin, type) else (lambda v: True))
    if members:  # e.g. bf16: bool | str (the value itself is checked by validate)
        check = lambda v: any(ok.get(a, lambda _: False)(v) for a in members)  # noqa: E731
    if not check(value):
        name = getattr(hint, "__name__", str(hint))
        raise EslmatchError(f"configuration key {key} must be {name}, got {value!r}")
    return float(value) if hint is float else value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["epochs=2", "model.embed_size=64"]`` -> nested dict (values parsed as YAML)."""
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


def read_yaml_config(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML configuration as a mapping; a ``base: OTHER.yaml`` key (relative to the file)
    is read first and updated with this file's keys (the ``model`` mapping key by key)."""
    p = Path(path)
    if p.resolve() in seen:
        raise EslmatchError(f"{p}: 'base' configurations form a loop")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EslmatchError(f"{p}: cannot read the configuration ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise EslmatchError(f"{p}: not a YAML configuration (not UTF-8 text: byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise EslmatchError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise EslmatchError(f"{p}: expected a mapping of keys to values at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise EslmatchError(f"{p}: 'base' must name another YAML file")
    return merge_config(read_yaml_config(p.parent / base, (*seen, p.resolve())), loaded)


def packaged_configs() -> dict[str, Path]:
    """The configurations shipped with eslmatch, by name (``f30k_bert``, ``own_photos``...)."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config(name: str | Path) -> Path:
    """A configuration file: ``name`` itself when it exists, else the packaged one it names.

    ``f30k_bert``, ``f30k_bert.yaml`` and ``configs/f30k_bert.yaml`` (the repository's path,
    typed outside a clone) all name the packaged ``f30k_bert.yaml``.
    """
    p = Path(name)
    if p.exists():
        return p
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    packaged = packaged_configs()
    if (len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs")) and stem in packaged:
        return packaged[stem]
    if len(p.parts) == 1 and not p.suffix:
        raise EslmatchError(
            f"{name}: no such file and no packaged configuration of that name (packaged: {', '.join(packaged)})"
        )
    return p  # reading it names the missing file


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML training configuration (``base:`` chains allowed) and apply ``key=value``
    overrides. ``path`` may name a packaged configuration (:func:`resolve_config`)."""
    if path is not None:
        path = resolve_config(path)
    data: dict[str, Any] = {} if path is None else read_yaml_config(path)
    source = "overrides" if path is None else str(path)
    over = parse_overrides(overrides)
    unknown = _unknown_keys(over)
    if unknown:
        raise EslmatchError(f"overrides: unknown configuration key(s): {', '.join(unknown)}")
    unknown = _unknown_keys(migrate(data))
    if unknown:
        raise EslmatchError(f"{source}: unknown configuration key(s): {', '.join(unknown)}")
    return TrainConfig.from_dict(merge_config(data, over), source)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (``model.x`` for model keys) whose values differ, except those resume may change."""
    defaults = {k: v for k, v in TrainConfig().to_dict().items() if k != "model"}
    saved = {**defaults, **migrate(saved)}  # keys added since the run was saved take their defaults
    diffs = [
        k
        for k in sorted(set(saved) | set(current))
        if k not in RESUME_MAY_CHANGE and k != "model" and saved.get(k) != current.get(k)
    ]
    sm, cm = saved.get("model", {}), current.get("model", {})
    diffs += [f"model.{k}" for k in sorted(set(sm) | set(cm)) if sm.get(k) != cm.get(k)]
    return diffs
