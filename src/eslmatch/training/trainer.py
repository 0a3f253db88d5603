"""The public training API: :class:`Trainer`, one optimiser step at a time.

.. code-block:: python

    from eslmatch.training import Trainer, TrainConfig
    trainer = Trainer(model, TrainConfig(lr=5e-4, margin=0.2, bf16=False))
    for epoch in range(cfg.epochs):
        trainer.start_epoch(epoch)     # the epoch's learning rate, VSE0 -> VSE++ switch
        for batch in loader:
            loss = trainer.step(batch.images, batch.image_lengths, batch.captions, batch.caption_lengths)

The recipe is the released one of the model's family. ESL (spec section 5): AdamW with the
text backbone's parameters at ``lr * bert_lr_factor`` and the rest at ``lr`` (both with
``weight_decay``), gradient norm clipped to ``grad_clip``, every group's learning rate times
``lr_decay_factor`` from ``lr_decay_epoch`` on, the hinge summed over negatives for
``vse_mean_warmup_epochs`` epochs and the hardest negative after. ESL-CLIP (the CLIP
branch): the branch's AdamW (``optimizer: bert-adamw``), CLIP at ``backbone_lr`` and the
head at ``lr``, a warm-up then half-cosine per step (``schedule: cosine``), InfoNCE with the
model's logit scale (clamped after each step, as the branch does). ``bf16`` (``true`` or
``auto``) runs the forward pass under bf16 autocast on CPU and CUDA alike; the weights, their
gradients and the optimiser state stay float32 (autocast's master weights). Under torchrun each
process passes its share of the global batch and the step is that of one process with the
whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import DistContext
from ..losses import LossSettings, MatchingLoss
from ..model.base import MatchingModel, load_state_strict
from ..model.encoders import enable_sync_batchnorm
from ..utils import resolve_precision
from .config import TrainConfig
from .optim import BertAdamW, cosine_with_warmup, step_decay


def param_groups(model: MatchingModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimiser groups: the pretrained backbone at ``backbone_lr`` (or ``lr *
    bert_lr_factor``), everything else at ``lr``."""
    backbone = model.pretrained_backbone()
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    main = [p for p in trainable if id(p) not in backbone_ids]
    pretrained = [p for p in trainable if id(p) in backbone_ids]
    factor = cfg.bert_lr_factor if cfg.backbone_lr is None else cfg.backbone_lr / cfg.lr
    groups = [{"name": "main", "params": main, "lr_factor": 1.0}]
    if pretrained:
        groups.append({"name": "backbone", "params": pretrained, "lr_factor": factor})
    return groups


def learning_rate(cfg: TrainConfig, epoch: int, step: int = 0, total_steps: int = 1) -> float:
    """Base learning rate at ``epoch`` (``step`` decay) or optimiser ``step`` of ``total_steps``
    (``cosine`` with warm-up)."""
    if cfg.schedule == "cosine":
        return cfg.lr * cosine_with_warmup(step, int(cfg.warmup_proportion * total_steps), total_steps)
    return step_decay(cfg.lr, epoch, cfg.lr_decay_epoch, cfg.lr_decay_factor)


def make_optimizer(model: MatchingModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "bert-adamw":
        return BertAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """Optimiser, schedule and loss of a model, stepped batch by batch.

    Args:
        model: a :class:`~eslmatch.model.base.MatchingModel` (on its device already).
        config: the recipe (only the optimisation fields are read here; ``data_path`` is
            not needed).
        ctx: the process's place in a torchrun job (``None``: alone).
        steps_per_epoch: optimiser steps per epoch (needed by ``schedule: cosine``, whose
            length is ``epochs * steps_per_epoch``).
        truth: the training split's true pairs (:class:`~eslmatch.truth.TruthPairs`), never
            used as negatives; :meth:`step` then needs each item's ``image_index`` and
            ``caption_index``.
    """

    def __init__(
        self,
        model: MatchingModel,
        config: TrainConfig,
        ctx: DistContext | None = None,
        steps_per_epoch: int = 1,
        truth: Any = None,
    ) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.ctx = ctx or DistContext(device=_device_of(model))
        self.total_steps = max(1, config.epochs * steps_per_epoch)
        self.global_step = 0
        self.epoch = 0
        enable_sync_batchnorm(model, self.ctx.group, self.ctx.distributed)
        if config.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        self.loss = MatchingLoss(
            model, LossSettings(config.margin, config.global_loss_weight, kind=model.loss_kind), self.ctx, truth=truth
        )
        self._step_module: nn.Module = self.loss
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self._step_module = DistributedDataParallel(self.loss, device_ids=ids)
        self.optimizer = make_optimizer(model, config)
        self.base_lr = config.lr
        self.bf16 = uses_bf16(config.bf16, self.ctx.device)
        self.last_terms: dict[str, Tensor] = {}

    def start_epoch(self, epoch: int) -> float:
        """Set the learning rate of ``epoch`` (0-based) and the VSE0 -> hardest-negative switch.

        Returns:
            the base learning rate of the epoch.
        """
        self.epoch = epoch
        self._set_lr()
        self.loss.settings.max_violation = epoch >= self.config.vse_mean_warmup_epochs
        self.model.train()
        return self.base_lr

    def _set_lr(self) -> None:
        self.base_lr = learning_rate(self.config, self.epoch, self.global_step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * float(group.get("lr_factor", 1.0))

    @property
    def max_violation(self) -> bool:
        return self.loss.settings.max_violation

    def step(
        self,
        images: Tensor,
        image_lengths: Tensor,
        captions: Tensor,
        caption_lengths: Tensor,
        image_index: Tensor | None = None,
        caption_index: Tensor | None = None,
    ) -> Tensor:
        """One optimiser step on this process's share of a batch (``image_index`` and
        ``caption_index``: the items' places in the split, needed with a ``truth``).

        Returns:
            the batch loss (this process's share; detached, 0-d), computed before the update.
        """
        dev = self.ctx.device
        if self.config.schedule != "step":
            self._set_lr()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            terms = self._step_module(
                images.to(dev),
                image_lengths.to(dev),
                captions.to(dev),
                caption_lengths.to(dev),
                image_index,
                caption_index,
            )
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; the loss is a sum over the global batch, so each
        # rank's share is scaled back up.
        (terms["loss"] * self.ctx.world_size).backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.global_step += 1
        self.model.after_optimizer_step()
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return self.last_terms["loss"]

    def state_dict(self) -> dict[str, Any]:
        """Model weights and optimiser state (what a resume needs besides the RNGs)."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "base_lr": self.base_lr,
                "max_violation": self.max_violation,
                "global_step": self.global_step,
                "epoch": self.epoch,
            },
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "training state") -> None:
        load_state_strict(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state.get("global_step", state.get("scheduler", {}).get("global_step", 0)))


def uses_bf16(setting: bool | str, device: torch.device) -> bool:
    """Whether training on ``device`` runs under bf16 autocast: ``setting`` is the config's
    ``bf16`` (``True``: yes, on any device; ``"auto"``: where the device computes bf16 natively)."""
    if setting == "auto":
        return resolve_precision("auto", device) == "bf16"
    return bool(setting)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
