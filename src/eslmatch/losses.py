"""Training losses, one code path for one process and for torchrun.

ESL (spec section 5): the hinge triplet loss of VSE++ on a score matrix whose positives are
known by index. ESL-CLIP: CLIP's symmetric InfoNCE with the model's learned logit scale
(:func:`infonce_rows`), as the CLIP-based branch's ``CLIPLoss``.
:func:`hinge_rows` is the loss of a block of rows; :func:`triplet_loss` the square,
single-process case (positives on the diagonal). :class:`MatchingLoss` computes the loss of
a batch from a model: it embeds this process's share, all-gathers the embeddings with
gradients (the identity in one process), scores its images against every caption and every
image against its captions, and sums :func:`hinge_rows` over both blocks. Alone, both
blocks are the one ``(B, B)`` matrix, scored once; under torchrun the sum over ranks is
the single-process loss of the global batch, hardest negatives included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import DistContext, gather_lengths, gather_padded
from .errors import EslmatchError

if TYPE_CHECKING:
    from .model.base import MatchingModel
    from .truth import TruthPairs


def hinge_rows(
    scores: Tensor,
    positives: Tensor,
    margin: float = 0.2,
    max_violation: bool = False,
    exclude: Tensor | None = None,
) -> Tensor:
    """Hinge loss of each row's positive against the other entries of that row.

    Args:
        scores: ``(Q, K)`` scores, one row per query (an image or a caption).
        positives: ``(Q,)`` long, the column of each query's positive.
        margin: hinge margin.
        max_violation: keep only the hardest negative of each row (VSE++); otherwise sum
            the hinge over every negative (VSE0).
        exclude: ``(Q, K)`` bool, entries that are not negatives although they are not the
            row's positive (pairs known to be true: a dataset's truth); ``None``: none.
    Returns:
        scalar: the sum over rows.
    """
    if scores.dim() != 2 or positives.shape != scores.shape[:1]:
        raise ValueError(
            f"scores (Q, K) and positives (Q,) expected, got {tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    rows = torch.arange(scores.shape[0], device=scores.device)
    positives = positives.to(scores.device)
    pos = scores[rows, positives].unsqueeze(1)  # (Q, 1)
    cost = (margin + scores - pos).clamp(min=0)
    is_pos = torch.zeros_like(cost, dtype=torch.bool)
    is_pos[rows, positives] = True
    if exclude is not None:
        is_pos = is_pos | exclude.to(device=scores.device, dtype=torch.bool)
    cost = cost.masked_fill(is_pos, 0.0)
    if max_violation:
        return cost.max(dim=1).values.sum()
    return cost.sum()


def triplet_loss(scores: Tensor, margin: float = 0.2, max_violation: bool = False) -> Tensor:
    """Bidirectional hinge triplet loss on a square batch, positives on the diagonal.

    Args:
        scores: ``(B, B)``, rows images, columns captions; ``scores[i, i]`` is a positive pair.
        margin: hinge margin (0.2 in the released recipe).
        max_violation: hardest negative per query (VSE++) instead of the sum (VSE0 warm-up).
    Returns:
        scalar: image-to-caption plus caption-to-image terms, summed over the batch.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"a square (B, B) score matrix is expected, got {tuple(scores.shape)}")
    diag = torch.arange(scores.shape[0], device=scores.device)
    return hinge_rows(scores, diag, margin, max_violation) + hinge_rows(scores.t(), diag, margin, max_violation)


def infonce_rows(scores: Tensor, positives: Tensor, logit_scale: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Cross-entropy of each row's positive among the row's scores times ``exp(logit_scale)``.

    Args:
        scores: ``(Q, K)``; positives: ``(Q,)`` long; logit_scale: the learned log-scale;
        exclude: ``(Q, K)`` bool, entries left out of the softmax (never the positive).
    Returns:
        scalar: the sum over rows (divide by the row count for the mean).
    """
    logits = scores * logit_scale.exp()
    positives = positives.to(scores.device)
    if exclude is not None:
        keep = ~exclude.to(device=scores.device, dtype=torch.bool)
        keep[torch.arange(scores.shape[0], device=scores.device), positives] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, positives, reduction="sum")


def clip_loss(scores: Tensor, logit_scale: Tensor) -> Tensor:
    """The symmetric InfoNCE of a square batch (positives on the diagonal): the mean of the
    image-to-text and text-to-image cross-entropies, each averaged over the batch."""
    diag = torch.arange(scores.shape[0], device=scores.device)
    return (infonce_rows(scores, diag, logit_scale) + infonce_rows(scores.t(), diag, logit_scale)) / (
        2 * scores.shape[0]
    )


LOSS_KINDS = ("hinge", "infonce")


@dataclass
class LossSettings:
    """The loss of a run.

    Attributes:
        margin: hinge margin.
        global_loss_weight: weight of the auxiliary first-stage term: the same hinge on the
            inner products of the model's index vectors (0: off; only for models whose index
            vectors are a shortlist, not the score itself).
        max_violation: hardest negatives (VSE++) instead of the sum (VSE0); switched per epoch.
        kind: ``"hinge"`` (ESL, VSE) or ``"infonce"`` (ESL-CLIP: the model's ``logit_scale``).
    """

    margin: float = 0.2
    global_loss_weight: float = 0.0
    max_violation: bool = False
    kind: str = "hinge"


class MatchingLoss(nn.Module):
    """The loss of one batch, as a module (so DistributedDataParallel can wrap it).

    Under bf16 autocast the encoders run in bf16 and the scores in float32: the pooling's
    tanh / softmax is the precision-sensitive part.

    Args:
        model: any :class:`~eslmatch.model.base.MatchingModel`.
        settings: margin, auxiliary weight, VSE0/VSE++.
        ctx: the process's place in the job (``DistContext()``: alone).
        truth: the training split's true pairs (:class:`~eslmatch.truth.TruthPairs`): a
            pair it calls true is never a negative (``None``: every other pair of the batch
            is one, as in the released code).
    """

    def __init__(
        self,
        model: MatchingModel,
        settings: LossSettings,
        ctx: DistContext | None = None,
        truth: TruthPairs | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.ctx = ctx or DistContext()
        self.truth = truth
        if settings.kind not in LOSS_KINDS:
            raise EslmatchError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {settings.kind!r}")
        if settings.kind == "infonce" and model.logit_scale is None:
            raise EslmatchError("the InfoNCE loss needs a model with a learned logit_scale (ESL-CLIP)")
        if settings.global_loss_weight > 0 and model.exact_index:
            model_type = model.config.model_type
            raise EslmatchError(
                f"global_loss_weight is {settings.global_loss_weight} but this {model_type} model's "
                "index vectors are its score already; set it to 0"
            )

    def forward(
        self,
        images: Tensor,
        image_lengths: Tensor,
        captions: Tensor,
        caption_lengths: Tensor,
        image_index: Tensor | None = None,
        caption_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """This process's share of the batch: ``(b, R, D)``, ``(b,)``, ``(b, W)``, ``(b,)``;
        ``image_index``, ``caption_index`` ``(b,)``: where each item sits in the split (needed
        with ``truth``).

        Returns:
            ``{"loss": the weighted sum, "match": the matching term, "global": the auxiliary
            term (when on)}``, this rank's share (the sum over ranks is the global loss).
        """
        model, ctx, s = self.model, self.ctx, self.settings
        img = model.embed_images(images, image_lengths)
        cap = model.embed_captions(captions, caption_lengths)
        img_len = image_lengths.to(img.device)
        cap_len = caption_lengths.to(cap.device)
        img_all, cap_all = gather_padded(img, ctx), gather_padded(cap, ctx)
        img_len_all, cap_len_all = gather_lengths(img_len, ctx), gather_lengths(cap_len, ctx)
        b = img.shape[0]
        positives = torch.arange(b, device=img.device) + ctx.rank * b
        ex_rows = ex_cols = None
        if self.truth is not None:
            if image_index is None or caption_index is None:
                raise EslmatchError("a loss with a truth needs the batch's image_index and caption_index")
            true = self.truth.mask(
                gather_lengths(image_index.to(img.device), ctx).cpu(),
                gather_lengths(caption_index.to(img.device), ctx).cpu(),
            )
            mine = slice(ctx.rank * b, (ctx.rank + 1) * b)
            ex_rows = torch.from_numpy(true[mine]).to(img.device)  # my images x all captions
            ex_cols = torch.from_numpy(true[:, mine].T.copy()).to(img.device)  # my captions x all images

        def term(score: object) -> Tensor:
            rows = _fp32_scores(score, img, img_len, cap_all, cap_len_all)  # my images x all captions
            cols = rows if not ctx.distributed else _fp32_scores(score, img_all, img_len_all, cap, cap_len)
            if s.kind == "infonce":
                logit = model.logit_scale
                assert logit is not None  # checked when the loss was made
                scale = logit.float()
                return (
                    infonce_rows(rows, positives, scale, ex_rows) + infonce_rows(cols.t(), positives, scale, ex_cols)
                ) / (2 * img_all.shape[0])
            return hinge_rows(rows, positives, s.margin, s.max_violation, ex_rows) + hinge_rows(
                cols.t(), positives, s.margin, s.max_violation, ex_cols
            )

        out = {"match": term(model.score)}
        total = out["match"]
        if s.global_loss_weight > 0:
            out["global"] = term(self._index_scores)
            total = total + s.global_loss_weight * out["global"]
        out["loss"] = total
        return out

    def _index_scores(self, img: Tensor, img_len: Tensor, cap: Tensor, cap_len: Tensor) -> Tensor:
        m = self.model
        return m.index_vectors_images(img, img_len) @ m.index_vectors_captions(cap, cap_len).t()


def _fp32_scores(score: object, img: Tensor, img_len: Tensor, cap: Tensor, cap_len: Tensor) -> Tensor:
    """``score(...)`` with autocast off and both sides at least float32."""
    with torch.autocast(img.device.type, enabled=False):
        return _at_least_fp32(score(_at_least_fp32(img), img_len, _at_least_fp32(cap), cap_len))  # type: ignore[operator]


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16 (autocast) goes up to float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
