"""The hinge triplet loss: released fixture values, hand-made matrices, the row form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _models import FIXTURES, needs_fixtures, tiny_gru_model
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


def test_excluded_pairs_are_not_negatives():
    torch.manual_seed(0)
    scores = torch.randn(5, 5)
    diag = torch.arange(5)
    exclude = torch.zeros(5, 5, dtype=torch.bool)
    exclude[0, 3] = exclude[2, 1] = True
    for mv in (False, True):
        got = hinge_rows(scores, diag, 0.2, mv, exclude)
        # the literal definition: drop the excluded entries from each row
        total = 0.0
        for i in range(5):
            costs = [
                max(0.0, 0.2 + float(scores[i, j] - scores[i, i])) for j in range(5) if j != i and not exclude[i, j]
            ]
            total += max(costs) if mv else sum(costs)
        assert float(got) == pytest.approx(total, rel=1e-6)
    assert float(hinge_rows(scores, diag, 0.2, False, exclude)) < float(hinge_rows(scores, diag, 0.2, False))
    # excluding everything but the positive leaves nothing to violate
    assert float(hinge_rows(scores, diag, 0.2, False, ~torch.eye(5, dtype=torch.bool))) == 0.0


def test_excluded_pairs_leave_the_softmax():
    from eslmatch.losses import infonce_rows

    torch.manual_seed(1)
    scores = torch.randn(4, 6)
    pos = torch.tensor([0, 1, 2, 3])
    exclude = torch.zeros(4, 6, dtype=torch.bool)
    exclude[0, 4] = exclude[0, 0] = True  # the positive itself is never excluded
    scale = torch.tensor(0.5)
    got = infonce_rows(scores, pos, scale, exclude)
    logits = scores * scale.exp()
    want = 0.0
    for i in range(4):
        keep = [j for j in range(6) if j == pos[i] or not exclude[i, j]]
        want += float(torch.logsumexp(logits[i, keep], 0) - logits[i, pos[i]])
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_truth_pairs_mask():
    from eslmatch.truth import TruthPairs

    truth = [np.array([0, 2]), np.array([1]), np.array([], dtype=np.int64), np.array([2, 0, 2])]
    pairs = TruthPairs(truth, n_images=3)
    got = pairs.mask([2, 0, 1], [3, 0, 1, 2])
    want = np.array(
        [
            [2 in truth[c] for c in (3, 0, 1, 2)],
            [0 in truth[c] for c in (3, 0, 1, 2)],
            [1 in truth[c] for c in (3, 0, 1, 2)],
        ]
    )
    assert got.dtype == bool and np.array_equal(got, want)
    with pytest.raises(Exception, match="out of range"):
        pairs.mask([3], [0])


def test_matching_loss_with_truth_masks_the_true_pairs_of_a_batch():
    from eslmatch.losses import LossSettings, MatchingLoss
    from eslmatch.truth import TruthPairs

    torch.manual_seed(0)
    model = tiny_gru_model(img_dim=16).eval()
    b, r, d = 4, 5, 16
    images = torch.rand(b, r, d)
    lens = torch.full((b,), r)
    ids = torch.randint(2, 14, (b, 6))
    cap_len = torch.full((b,), 6)
    image_index, caption_index = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 10, 15])
    # caption 5 (item 1) is also true of image 3, caption 15 of image 0
    truth = [np.array([c // 5]) for c in range(20)]
    truth[5], truth[15] = np.array([1, 3]), np.array([3, 0])
    plain = MatchingLoss(model, LossSettings(margin=0.2))
    masked = MatchingLoss(model, LossSettings(margin=0.2), truth=TruthPairs(truth, 4))
    with torch.no_grad():
        sims = model.similarity(images, lens, ids, cap_len)
        excl = torch.zeros(b, b, dtype=torch.bool)
        excl[3, 1] = excl[0, 3] = True
        want = hinge_rows(sims, torch.arange(b), 0.2, False, excl) + hinge_rows(
            sims.t(), torch.arange(b), 0.2, False, excl.t()
        )
        got = masked(images, lens, ids, cap_len, image_index, caption_index)["loss"]
        full = plain(images, lens, ids, cap_len)["loss"]
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(got) < float(full)
    with pytest.raises(Exception, match="image_index"):
        masked(images, lens, ids, cap_len)
