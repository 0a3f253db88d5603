"""ESL-CLIP's weighted level measuring (the branch's ``Sims_Measuring``), one module.

For image level features ``X = [X_0..X_L]`` and caption level features ``Y = [Y_0..Y_L]``
(each a single vector per item, no regions or words), the score is

    S(i, j) = 1/(L+1) * sum_l  X_l(i) @ D_l @ Y_l(j)^T,   D_l = M_l * c_l,

with learned ``(n_l, n_l)`` matrices ``M_l`` (initialised to the identity) and contribution
degrees ``c_l = exp((|w_l| - thr) * exp(t2)) * w_l``, ``thr = (max|w| - min|w|) *
sigmoid(sigma) + min|w|``. For a fixed model this is an exact inner product: image vector
``concat_l(X_l @ D_l) / (L+1)`` against caption vector ``concat_l(Y_l)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def measuring_degrees(w: Tensor, sigma: Tensor, t2: Tensor) -> Tensor:
    """Contribution degrees ``c (L+1,)`` from the weights ``w (L+1,)`` and scalars."""
    a = w.abs()
    thr = (a.max() - a.min()) * torch.sigmoid(sigma.reshape(())) + a.min()
    return torch.exp((a - thr) * torch.exp(t2.reshape(()))) * w


def weighted_scores(image_levels: list[Tensor], caption_levels: list[Tensor], matrices: list[Tensor]) -> Tensor:
    """``(N, M)``: the mean over levels of ``X_l @ D_l @ Y_l^T`` (the literal form)."""
    total = torch.zeros((), dtype=image_levels[0].dtype, device=image_levels[0].device)
    for x, d, y in zip(image_levels, matrices, caption_levels):
        total = total + x @ d @ y.t()
    return total / len(matrices)


class WeightedMeasuring(nn.Module):
    """The learned ``M_l``, ``w``, ``sigma``, ``t2`` of the measuring (see the module doc).

    ``temperature`` is the branch's ``temp_scale``: a parameter its forward never uses (so it
    never changes in training), kept as a buffer so released checkpoints load strictly and
    DistributedDataParallel finds no unused parameter.
    """

    def __init__(
        self, dims: list[int], contribution_init: float = 0.1, sigma_init: float = -1.0, t2_init: float = 4.0
    ) -> None:
        super().__init__()
        self.dims = list(dims)
        self.M = nn.ParameterList([nn.Parameter(torch.eye(n)) for n in dims])
        self.w = nn.Parameter(torch.full((len(dims),), float(contribution_init)))
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
        self.t2 = nn.Parameter(torch.tensor(float(t2_init)))
        self.register_buffer("temperature", torch.tensor(math.log(1 / 0.07)))

    def matrices(self) -> list[Tensor]:
        """``[D_0..D_L]``."""
        c = measuring_degrees(self.w, self.sigma, self.t2)
        return [m * c[i] for i, m in enumerate(self.M)]

    def image_side(self, image_levels: Tensor) -> Tensor:
        """``(N, Dt)`` -> ``(N, Dt)``: ``concat_l(X_l @ D_l) / (L+1)``, whose inner product with the
        caption level features is the score."""
        parts = torch.split(image_levels, self.dims, dim=-1)
        return torch.cat([x @ d for x, d in zip(parts, self.matrices())], dim=-1) / len(self.dims)
