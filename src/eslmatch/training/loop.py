"""A training run over precomp data: :func:`fit` = epochs of :func:`train_one_epoch` and
:func:`validate`, with resumable state and the best / last models.

Exact resume: the order of the training captions is a pure function of ``(seed, epoch)``
(:class:`~eslmatch.data.EpochBatchSampler`), augmentation draws depend on ``(seed, epoch,
caption)``, and the training state (weights, optimiser, position, RNG states, best rsum) is
saved atomically every ``save_every_steps`` steps and at each epoch's end, so a resumed run
skips the batches already done and continues bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..config import ConfigData, ESLConfig
from ..data import CaptionDataset, EpochBatchSampler, PrecompSplit, build_vocab, collate, open_split, steps_per_epoch
from ..data.precomp import split_files
from ..data.raw import ImageCaptionDataset, ImageCaptionSplit, collate_pixels, open_image_split
from ..distributed import (
    DistContext,
    broadcast_value,
    init_distributed,
    rank_slice,
    shutdown,
    sum_value,
)
from ..errors import EslmatchError
from ..evaluate import recall_metrics, score_image_split, score_split
from ..factory import build_model, config_from_dict, load_model
from ..model.base import MatchingModel
from ..text import WordVocab, load_tokenizer
from ..truth import TruthPairs, load_truth, truth_path
from ..utils import atomic_write_text
from ..utils.messages import note
from .config import RESUME_MAY_CHANGE, VAL_AUTO, VAL_AUTO_FRACTION, TrainConfig, config_differences
from .log import METRICS_NAME, RunLog
from .state import STATE_NAME, TrainState, load_state_file, rng_state, save_state_file, seed_all, set_rng_state
from .trainer import Trainer

log = logging.getLogger(__name__)

CONFIG_COPY_NAME = "train_config.yaml"
FEW_STEPS = 4  # fewer optimiser steps per epoch than this: the log suggests a smaller batch
LAST_DIR = "last"
BEST_DIR = "best"


@dataclass
class TrainResult:
    """What :func:`fit` did."""

    output_dir: Path
    global_step: int
    epochs_done: int
    best_rsum: float | None
    history: list[dict[str, Any]]
    stopped_early: bool
    rank: int = 0
    val_split: str = "dev"  # what validation ran on: a split's name, or "held-out" (val_split=auto)


@dataclass
class Run:
    """What one run's epochs share: the trainer, its data, its outputs and its position."""

    cfg: TrainConfig
    ctx: DistContext
    trainer: Trainer
    dataset: CaptionDataset | ImageCaptionDataset
    val_split: PrecompSplit | ImageCaptionSplit
    state: TrainState
    log: RunLog
    output: Path
    vocab: list[str] | None
    steps: int
    started: float

    def save(self, with_model_dir: bool) -> None:
        """The resumable state (and ``last/``) at the current position; rank 0 writes."""
        rngs = self.ctx.gather(rng_state())
        if not self.ctx.is_main:
            return
        model = self.trainer.model
        if with_model_dir:
            model.save_pretrained(self.output / LAST_DIR)
        save_state_file(
            {
                **self.state.to_record(),
                **self.trainer.state_dict(),
                "rng": rngs,
                "config": self.cfg.to_dict(),
                "model_config": model.config.to_dict(),
                "vocab": self.vocab,
            },
            self.output / STATE_NAME,
        )
        self.log.record(
            "save", epoch=self.state.epoch, step=self.state.global_step, step_in_epoch=self.state.step_in_epoch
        )


def train_one_epoch(run: Run) -> bool:
    """Train from the run's position to the end of its epoch (or to ``max_steps``).

    Returns:
        True when ``max_steps`` stopped the run.
    """
    cfg, ctx, st, trainer = run.cfg, run.ctx, run.state, run.trainer
    base_lr = trainer.start_epoch(st.epoch)
    run.dataset.set_epoch(st.epoch)
    sampler = EpochBatchSampler(
        run.dataset.split.n_captions,
        cfg.batch_size,
        cfg.seed,
        st.epoch,
        start=st.step_in_epoch,
        share=rank_slice(cfg.batch_size, ctx),
    )
    loader = torch.utils.data.DataLoader(
        run.dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_pixels if isinstance(run.dataset, ImageCaptionDataset) else collate,
        pin_memory=ctx.device.type == "cuda",
        # An own generator: creating the loader never draws from the global RNG, which a
        # resume restores exactly.
        generator=torch.Generator().manual_seed(cfg.seed * 100003 + st.epoch),
    )
    window, window_n = torch.zeros((), device=ctx.device), 0
    bar = _progress_bar(cfg, ctx, run.steps, st.step_in_epoch, st.epoch)
    for batch in loader:
        batch = batch.to(ctx.device, non_blocking=True)
        window = window + trainer.step(
            batch.images,
            batch.image_lengths,
            batch.captions,
            batch.caption_lengths,
            batch.image_index,
            batch.caption_index,
        )
        window_n += 1
        st.global_step += 1
        st.step_in_epoch += 1
        if bar is not None:
            bar.update(1)
        done = cfg.max_steps is not None and st.global_step >= cfg.max_steps
        saving = st.global_step % cfg.save_every_steps == 0 and st.step_in_epoch < run.steps
        # a save flushes the loss window, so a resume holds no un-logged losses
        if st.global_step % cfg.log_every == 0 or st.step_in_epoch == run.steps or done or saving:
            mean_loss = float(sum_value(ctx, window)) / window_n
            st.epoch_loss += mean_loss * window_n
            st.epoch_batches += window_n
            window, window_n = torch.zeros((), device=ctx.device), 0
            run.log.record(
                "step",
                epoch=st.epoch,
                step=st.global_step,
                step_in_epoch=st.step_in_epoch,
                loss=mean_loss,
                lr=base_lr,
                max_violation=trainer.max_violation,
                seconds=round(time.time() - run.started, 3),
            )
            run.log.scalars("train", {"loss": mean_loss, "lr": base_lr}, st.global_step)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{base_lr:.2e}")
        if done:
            if bar is not None:
                bar.close()
            return True
        if saving:
            run.save(with_model_dir=False)
    if bar is not None:
        bar.close()
    return False


def validate(
    model: MatchingModel, split: PrecompSplit | ImageCaptionSplit, cfg: TrainConfig, ctx: DistContext
) -> dict[str, Any]:
    """Recall metrics of ``model`` on ``split`` (computed on rank 0; ``rsum`` on every rank)."""
    metrics: dict[str, Any] = {}
    rsum = 0.0
    if ctx.is_main:
        if isinstance(split, ImageCaptionSplit):
            sims = score_image_split(model, split, cfg.eval_batch_size, ctx.device, cfg.workers)
        else:
            sims = score_split(model, split, batch_size=cfg.eval_batch_size, device=ctx.device, progress=False)
        metrics.update(recall_metrics(sims))
        rsum = float(metrics["rsum"])
    metrics["rsum"] = broadcast_value(ctx, rsum)
    model.train()
    return metrics


def end_epoch(run: Run) -> None:
    """Validate, keep the best model, record the epoch, move to the next and save."""
    st, ctx = run.state, run.ctx
    metrics = validate(run.trainer.model, run.val_split, run.cfg, ctx)
    rsum = float(metrics.pop("rsum"))
    is_best = st.best_rsum is None or rsum > st.best_rsum
    if is_best:
        st.best_rsum = rsum
    record = {
        "epoch": st.epoch,
        "step": st.global_step,
        "train_loss": st.epoch_loss / max(st.epoch_batches, 1),
        "rsum": rsum,
        "best_rsum": st.best_rsum,
        "is_best": is_best,
        "val": metrics,
        "seconds": round(time.time() - run.started, 3),
    }
    st.history.append(record)
    if ctx.is_main:
        run.log.record("epoch", **record)
        flat = {"rsum": rsum, **{f"{side}_{k}": v for side in ("i2t", "t2i") for k, v in metrics.get(side, {}).items()}}
        run.log.scalars("val", flat, st.global_step)
        log.info(
            f"epoch {st.epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.4f}, {val_label(run.cfg)} rsum "
            f"{rsum:.2f} (best {st.best_rsum:.2f})"
        )
        if is_best:
            run.trainer.model.save_pretrained(run.output / BEST_DIR)
    st.finish_epoch()
    run.save(with_model_dir=True)


def fit(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; under torchrun every process calls it.

    Rank 0 writes everything: ``last/``, ``best/``, the training state, ``metrics.jsonl``.
    """
    cfg.require_data()
    cfg.validate()
    ctx = init_distributed(cfg.device, cfg.dist_backend, cfg.dist_timeout_minutes)
    try:
        run = _start(cfg, ctx, resume)
        stopped = False
        try:
            while run.state.epoch < cfg.epochs:
                if cfg.max_steps is not None and run.state.global_step >= cfg.max_steps:
                    stopped = True
                    break
                stopped = train_one_epoch(run)
                if stopped and run.state.step_in_epoch < run.steps:
                    run.save(with_model_dir=True)
                    break
                end_epoch(run)
                if stopped:
                    break
        finally:
            run.log.close()
        st = run.state
        return TrainResult(
            run.output, st.global_step, st.epoch, st.best_rsum, st.history, stopped, ctx.rank, val_label(cfg)
        )
    finally:
        shutdown(ctx)


def _start(cfg: TrainConfig, ctx: DistContext, resume: bool) -> Run:
    """Everything checked, the model built or restored, outputs opened."""
    output = Path(cfg.output_dir)
    saved = load_state_file(output / STATE_NAME) if resume else None
    if saved is not None:
        diffs = config_differences(saved["config"], cfg.to_dict())
        if diffs:
            raise EslmatchError(
                f"{output / STATE_NAME}: the configuration differs from the saved run in {', '.join(diffs)} "
                f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume)"
            )
    elif ctx.is_main:
        _check_fresh_output(output)
    train_split, val_split = _open_splits(cfg, ctx.is_main)
    steps = steps_per_epoch(train_split.n_captions, cfg.batch_size)
    if steps < 1:
        raise EslmatchError(
            f"batch_size {cfg.batch_size} is larger than the {train_split.n_captions} training captions"
        )
    rank_slice(cfg.batch_size, ctx)  # the global batch must split evenly

    seed_all(cfg.seed)
    vocab = saved.get("vocab") if saved else None
    model = _make_model(cfg, train_split, vocab, saved["model_config"] if saved else None).to(ctx.device)
    if isinstance(model.tokenizer, WordVocab):
        vocab = list(model.tokenizer.tokens)
    trainer = Trainer(model, cfg, ctx, steps_per_epoch=steps, truth=_train_truth(cfg, train_split))
    state = TrainState()
    if saved is not None:
        trainer.load_state_dict(saved, str(output / STATE_NAME))
        state = TrainState.from_record(saved)
        rngs = saved["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
    else:
        # Ranks draw different dropout masks; initialisation above was the same everywhere.
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, ctx.rank]).generate_state(1)[0]))
    dataset: CaptionDataset | ImageCaptionDataset
    if isinstance(train_split, ImageCaptionSplit):
        dataset = ImageCaptionDataset(train_split, model.image_preprocessor(), model.tokenize)
    else:
        dataset = CaptionDataset(
            train_split,
            model.tokenizer,
            train=True,
            seed=cfg.seed,
            region_drop=cfg.region_drop,
            word_mask=cfg.word_mask,
        )
    if ctx.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / CONFIG_COPY_NAME, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        counts = model.parameter_counts()
        mc = model.config
        text = mc.text_encoder if isinstance(mc, ESLConfig) else mc.model_type
        log.info(
            f"{'resuming' if saved is not None else 'training'} {mc.model_type} ({text} text "
            f"encoder, {counts['total']:,} parameters) on {ctx.device} x{ctx.world_size}: "
            f"{train_split.n_captions} captions, {steps} steps/epoch, epochs {state.epoch + 1}..{cfg.epochs}, "
            f"output {output}"
        )
        if steps < FEW_STEPS and cfg.batch_size > 32:
            note(
                log,
                f"{steps} step(s) per epoch ({train_split.n_captions} captions in batches of "
                f"{cfg.batch_size}): a smaller batch (e.g. batch_size=32) learns more per epoch",
            )
    run_log = RunLog(output, ctx.is_main, cfg.tensorboard, state.global_step if saved is not None else None)
    return Run(cfg, ctx, trainer, dataset, val_split, state, run_log, output, vocab, steps, time.time())


def val_label(cfg: TrainConfig) -> str:
    """What validation runs on, for messages: the split's name, or ``held-out`` (``val_split=auto``)."""
    return "held-out" if cfg.val_split == VAL_AUTO else cfg.val_split


def _open_splits(
    cfg: TrainConfig, main: bool = True
) -> tuple[PrecompSplit | ImageCaptionSplit, PrecompSplit | ImageCaptionSplit]:
    """The training and validation splits: precomp features, or raw images with ``image_root``."""
    val: PrecompSplit | ImageCaptionSplit
    if cfg.image_root is not None:
        if cfg.val_split == VAL_AUTO:
            raise EslmatchError("val_split=auto holds out precomp features only: name a split of the images")
        train: PrecompSplit | ImageCaptionSplit = open_image_split(
            cfg.data_path, cfg.image_root, cfg.train_split, cfg.captions_per_image
        )
        val = open_image_split(cfg.data_path, cfg.image_root, cfg.val_split, cfg.captions_per_image)
        val.require_complete()
    else:
        train = open_split(cfg.data_path, cfg.train_split, cfg.model.img_dim, cfg.data_name)
        if cfg.val_split == VAL_AUTO:
            train, val = _hold_out(train, cfg, main)
        else:
            _require_split(train, cfg)
            val = open_split(cfg.data_path, cfg.val_split, cfg.model.img_dim, cfg.data_name)
    if cfg.val_images is not None and cfg.val_images < val.n_images:
        val = val.head(cfg.val_images)
    return train, val


def _require_split(train: PrecompSplit, cfg: TrainConfig) -> None:
    """A validation split that is not there is refused in one line that names the ways out."""
    files = split_files(train.root, cfg.val_split)
    if not files["images"].is_file() and not files["captions"].is_file():
        raise EslmatchError(
            f"{train.root}: no {cfg.val_split} split to validate on ({files['images'].name} / "
            f"{files['captions'].name}): set val_split=auto (a held-out slice of {cfg.train_split}), name another "
            f"split (val_split=test), or extract one (eslmatch extract ... --split {cfg.val_split})"
        )


def _hold_out(train: PrecompSplit, cfg: TrainConfig, main: bool) -> tuple[PrecompSplit, PrecompSplit]:
    """``val_split=auto``: the last tenth of the training images (at least 1) validate, the rest train."""
    n = train.n_images
    held = max(1, round(n * VAL_AUTO_FRACTION))
    if n - held < 1:
        raise EslmatchError(f"val_split=auto: {train.images_path} has {n} image(s), too few to hold one out")
    if cfg.mask_true_pairs:
        raise EslmatchError("val_split=auto cannot be combined with mask_true_pairs (the truth covers the whole split)")
    if main:
        note(
            log,
            f"no validation split given (val_split=auto): validating on a held-out slice of "
            f"{cfg.train_split}, its last {held} of {n} images, which are not trained on",
        )
    return train.images_between(0, n - held), train.images_between(n - held, n)


def _train_truth(cfg: TrainConfig, split: PrecompSplit | ImageCaptionSplit) -> TruthPairs | None:
    """The training split's true pairs when ``mask_true_pairs`` asks for them."""
    if not cfg.mask_true_pairs:
        return None
    folder = split.root if isinstance(split, PrecompSplit) else Path(cfg.data_path).parent
    path = truth_path(folder, cfg.train_split)
    if not path.is_file():
        raise EslmatchError(f"mask_true_pairs is on but {path} does not exist (the truth of the training split)")
    return TruthPairs(load_truth(path, split.n_images, split.n_captions), split.n_images)


def _make_model(
    cfg: TrainConfig, train_split: Any, vocab: list[str] | None, saved_config: dict[str, Any] | None
) -> MatchingModel:
    """New weights, or ``init_from``'s (fine-tuning), with the tokenizer the config asks for."""
    mc = cfg.model
    text_encoder = mc.text_encoder if isinstance(mc, ESLConfig) else None
    tokenizer: Any = None  # families with their own tokenizer (ESL-CLIP) build it themselves
    if text_encoder == "gru":
        tokenizer = WordVocab(vocab) if vocab is not None else build_vocab(train_split, min_count=cfg.vocab_min_count)
        mc = mc.replace(vocab_size=len(tokenizer))
    elif text_encoder == "bert":
        if not mc.text_model:
            raise EslmatchError("model.text_model must name a BERT-family model (a local directory or Hub name)")
        tokenizer = load_tokenizer(mc.text_model, required=True)
    if saved_config is not None:
        mc = config_from_dict(saved_config)
    if cfg.init_from is None or saved_config is not None:  # on resume the weights come from the state
        return build_model(mc, tokenizer)
    model = load_model(cfg.init_from, text_model=mc.text_model if text_encoder == "bert" else None)
    _check_same_architecture(model.config, mc, cfg.init_from)
    if text_encoder == "gru" and not isinstance(model.tokenizer, WordVocab):
        model.tokenizer = tokenizer
    model.train()
    return model


def _check_same_architecture(have: ConfigData, want: ConfigData, source: str) -> None:
    """``init_from``'s model must be the one the configuration describes (names the keys)."""
    keys = ("model_type", "strategy", "embed_size", "kernel_size", "num_levels", "img_dim", "text_encoder")
    diffs = [
        f"{k} {getattr(have, k, None)!r} (config: {getattr(want, k, None)!r})"
        for k in keys
        if getattr(have, k, None) != getattr(want, k, None)
    ]
    if diffs:
        raise EslmatchError(f"init_from={source}: its model differs from model.* in {'; '.join(diffs)}")


def _check_fresh_output(output: Path) -> None:
    ours = [n for n in (STATE_NAME, LAST_DIR, BEST_DIR, METRICS_NAME, CONFIG_COPY_NAME) if (output / n).exists()]
    if ours:
        raise EslmatchError(
            f"{output} already holds a training run ({', '.join(ours)}): pass --resume to continue it, "
            "or choose another output_dir"
        )


def _progress_bar(cfg: TrainConfig, ctx: DistContext, steps: int, start: int, epoch: int) -> tqdm | None:
    if not (cfg.progress and ctx.is_main):
        return None
    # disable=None: a bar on a terminal only, so redirected logs stay clean
    return tqdm(
        total=steps,
        initial=start,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        dynamic_ncols=True,
        leave=False,
        disable=None,
    )
