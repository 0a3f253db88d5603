"""Optimisers and learning-rate schedules of the two released recipes.

- ESL (BERT + regions): ``torch.optim.AdamW`` and a step decay per epoch (:func:`step_decay`).
- ESL-CLIP: the branch's own AdamW (:class:`BertAdamW`, the BERT-era "weight decay fix":
  epsilon 1e-6 added to the un-corrected ``sqrt(v)``, bias correction folded into the step
  size, weight decay applied after the update) and a linear warm-up followed by a half-cosine
  per optimiser step (:func:`cosine_with_warmup`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class BertAdamW(torch.optim.Optimizer):
    """AdamW as the CLIP-based ESL branch computes it (``modules/optimization.py`` there).

    Per parameter: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
    ``p -= lr * sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps)``; then ``p -= lr * wd * p``.
    (``torch.optim.AdamW`` decays before the update and adds ``eps`` to the bias-corrected
    ``sqrt(v)``: a different trajectory.)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid BertAdamW settings: lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                exp_avg: Tensor = state["exp_avg"]
                exp_avg_sq: Tensor = state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def step_decay(lr: float, epoch: int, decay_epoch: int | None, factor: float) -> float:
    """``lr``, times ``factor`` from ``decay_epoch`` (0-based) on (the released ESL schedule)."""
    return lr * factor if decay_epoch is not None and epoch >= decay_epoch else lr


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based, before it is taken):
    linear from 0 over ``warmup_steps``, then a half-cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
