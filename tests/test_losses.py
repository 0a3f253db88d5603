"""The hinge triplet loss: released fixture values, hand-made matrices, the row form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _models import FIXTURES, needs_fixtures
from eslmatch.losses import hinge_rows, triplet_loss


@needs_fixtures
def test_released_fixture_values():
    data = np.load(FIXTURES / "official_adaptive_io.npz", allow_pickle=False)
    sims = torch.from_numpy(data["sims"][:, :12])
    loss_sum = float(triplet_loss(sims, margin=0.2, max_violation=False))
    loss_max = float(triplet_loss(sims, margin=0.2, max_violation=True))
    print(
        f"loss_sum {loss_sum:.6f} (released {float(data['loss_sum']):.6f}), "
        f"loss_max {loss_max:.6f} (released {float(data['loss_max']):.6f})"
    )
    assert loss_sum == pytest.approx(float(data["loss_sum"]), rel=1e-5)
    assert loss_max == pytest.approx(float(data["loss_max"]), rel=1e-5)


def test_hand_made_matrix():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.3, 0.0, 0.4]])
    # image rows: row0: 0.8-0.9+0.2=0.1, 0.1-0.9+0.2<0 -> 0.1; row1: 0.2-0.5+0.2<0, 0.6-0.5+0.2=0.3;
    # row2: 0.3-0.4+0.2=0.1, 0.0-0.4+0.2<0 -> rows sum 0.5, rows max 0.1+0.3+0.1=0.5
    # caption columns: col0: 0.2-0.9+0.2<0, 0.3-0.9+0.2<0 -> 0; col1: 0.8-0.5+0.2=0.5, 0-0.5+0.2<0;
    # col2: 0.1-0.4+0.2<0, 0.6-0.4+0.2=0.4 -> cols sum 0.9, cols max 0.9
    assert float(triplet_loss(s)) == pytest.approx(1.4, abs=1e-6)
    assert float(triplet_loss(s, max_violation=True)) == pytest.approx(1.4, abs=1e-6)
    # one query with two violating negatives tells the sum from the max
    t = torch.tensor([[0.5, 0.6, 0.55], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # row0: 0.3 + 0.25; col0 sees 0, 0; others clear by margin except col1 (0.6-1+0.2<0)
    assert float(triplet_loss(t)) == pytest.approx(0.55, abs=1e-6)
    assert float(triplet_loss(t, max_violation=True)) == pytest.approx(0.3, abs=1e-6)
    assert float(triplet_loss(t, margin=0.0)) == pytest.approx(0.15, abs=1e-6)


def test_perfect_separation_is_zero_and_gradient_flows():
    s = (torch.eye(4) * 2.0).requires_grad_()
    assert float(triplet_loss(s).detach()) == 0.0
    r = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    triplet_loss(r, max_violation=True).backward()
    assert r.grad is not None and r.grad.abs().sum() > 0
    # the hardest-negative gradient touches at most one negative per row and column
    off = r.grad.clone()
    off.fill_diagonal_(0)
    assert int((off != 0).sum()) <= 10


def test_rows_form_equals_square_form_on_blocks():
    """Scoring owned blocks (as distributed training does) sums to the square loss."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 6, generator=g)
    for mv in (False, True):
        total = 0.0
        for r0 in (0, 3):
            pos = torch.arange(3) + r0
            total += float(hinge_rows(s[r0 : r0 + 3], pos, 0.2, mv) + hinge_rows(s[:, r0 : r0 + 3].t(), pos, 0.2, mv))
        assert total == pytest.approx(float(triplet_loss(s, 0.2, mv)), rel=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError):
        triplet_loss(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        hinge_rows(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
