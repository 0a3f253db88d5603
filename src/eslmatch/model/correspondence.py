"""Inter-modal enhanced correspondence with sparse contribution degrees (spec section 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import contribution_degrees, correspondence_matrix


class Correspondence(nn.Module):
    """Per-level learned ``S_l`` with a whole-matrix LayerNorm, scaled by ``c_l``.

    ``D_l = LayerNorm(S_l) * c_l`` and the word-region affinity is
    ``a = X_cat @ blockdiag(D_0..D_L) @ Y_cat^T`` (text left, image right).
    """

    def __init__(
        self,
        dims: list[int],
        heuristic: bool,
        contribution_init: float = 0.1,
        sigma_init: float = 0.0,
        t2_init: float = 3.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.dims = list(dims)
        self.heuristic = heuristic
        self.eps = eps
        self.S = nn.ParameterList([nn.Parameter(torch.randn(n, n)) for n in dims])
        self.ln_weight = nn.ParameterList([nn.Parameter(torch.ones(n, n)) for n in dims])
        self.ln_bias = nn.ParameterList([nn.Parameter(torch.zeros(n, n)) for n in dims])
        self.w = nn.Parameter(torch.full((len(dims),), float(contribution_init)))
        if heuristic:
            self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
            self.t2 = nn.Parameter(torch.tensor(float(t2_init)))
        else:
            # ESL-A ignores them (lambda = 0); kept as buffers so checkpoints round-trip.
            self.register_buffer("sigma", torch.tensor(float(sigma_init)))
            self.register_buffer("t2", torch.tensor(float(t2_init)))

    def degrees(self) -> Tensor:
        """Contribution degrees ``c`` of shape ``(L+1,)``."""
        return contribution_degrees(self.w, self.sigma, self.t2, self.heuristic)

    def matrices(self) -> list[Tensor]:
        """``[D_0, ..., D_L]``, each ``(n_l, n_l)``."""
        c = self.degrees()
        return [
            correspondence_matrix(s, lw, lb, c[i], self.eps)
            for i, (s, lw, lb) in enumerate(zip(self.S, self.ln_weight, self.ln_bias))
        ]

    def image_side(self, image_feats: Tensor) -> Tensor:
        """Transform image level features once: ``(..., Dt) -> (..., Dt)``.

        Returns ``Z`` with ``Z_l = Y_l @ D_l^T`` so that the affinity is one product
        ``a = X_cat @ Z^T`` covering every level.
        """
        parts = torch.split(image_feats, self.dims, dim=-1)
        return torch.cat([y @ d.t() for y, d in zip(parts, self.matrices())], dim=-1)
