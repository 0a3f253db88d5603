"""A transcription of the released ESL training step (CrossmodalGroup/ESL, BERT + regions), for tests.

Written from the released code, in its structure and with its parameter names, sharing no code
with :mod:`eslmatch` (only torch, transformers and ``tests/released_forward.py``):

- ``lib/encoders.py`` ``EncoderImageAggr`` (precomp ``basic``) and ``lib/modules/mlp.py``
  ``MLP``: ``l2norm(fc(V) + mlp(V))``, the MLP's two BatchNorm1d modules (the second one is
  built, as there, and never applied); ``image_lengths`` is ignored, as there. In training mode
  the BatchNorm takes the statistics of all ``N * R`` rows and updates its running buffers.
- ``lib/encoders.py`` ``EncoderText``: BERT (with its pooler, as ``BertModel.from_pretrained``
  builds it: computed, never in the loss) on ``ids`` with the attention mask ``ids != 0``, then
  ``Linear(hidden, E)`` and ``l2norm``.
- ``lib/vse.py`` ``Sim_vec``: modules under the released names (``plus_encoder.encoders_1.*``,
  ``sims.calculator_1.*``), so a released state dict loads strictly; the arithmetic of the levels
  and of the scores is ``tests/released_forward.py``'s (``levels``, ``scores``), fed the live
  parameters so that autograd flows through it.
- ``lib/vse.py`` ``VSEModel.__init__`` (``precomp_enc_type == 'basic'``, ``optim == 'adam'``):
  ``self.params`` = text + image + similarity parameters; ``torch.optim.AdamW`` with four groups:
  the text encoder's non-BERT parameters at ``lr``, BERT's at ``lr * 0.1``, the image encoder's at
  ``lr``, the similarity module's at ``lr``, and ``weight_decay=1e-4`` (``decay_factor``) for all;
  AdamW's other settings are torch's defaults (betas 0.9 / 0.999, eps 1e-8, no amsgrad).
- ``VSEModel.train_emb``: embeddings, scores, ``optimizer.zero_grad()`` (PyTorch 1.x: gradients
  zeroed, not freed), ``ContrastiveLoss``, ``backward``, ``clip_grad_norm_(self.params,
  grad_clip)`` when ``grad_clip > 0``, ``optimizer.step()``; ``train_start`` before each step.
- ``lib/loss.py`` ``ContrastiveLoss.forward``: scores (images x captions), the hinge of every
  entry against its row's diagonal (``cost_s``) and its column's diagonal (``cost_im``), the
  diagonal cleared, the row / column maximum when ``max_violation``, both summed.
- ``train.py`` ``main`` and ``adjust_learning_rate``: at the start of each epoch every group's lr
  times 0.1 when ``epoch in [lr_update]``, then ``max_violation`` on when ``epoch >=
  vse_mean_warmup_epochs`` (``--max_violation`` is off by default, so earlier epochs sum over
  the negatives).

Departures (for tests): BERT's configuration is inferred from the state (12 heads, as
bert-base) and its dropout is 0 (bert-base-uncased trains with 0.1); the modules stay on CPU, in
the dtype asked for. As the released image encoder ignores ``image_lengths`` (zero-padded regions
enter its BatchNorm statistics and its scores), batches with equal region counts are the ones
on which it and a length-aware model can agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from released_forward import levels, scores


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _strip(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


class MLP(nn.Module):
    """``lib/modules/mlp.py`` ``MLP(img_dim, E // 2, E, 2)``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = x.reshape(b * n, d)
        h = F.relu(self.bns[0](self.layers[0](h)))  # layer i < num_layers - 1
        h = self.layers[1](h)  # the last layer: no BatchNorm (bns[1] is never used)
        return h.view(b, n, self.out_dim)


class ImageEncoder(nn.Module):
    """``EncoderImageAggr`` with ``precomp_enc_type='basic'``."""

    def __init__(self, img_dim: int, embed_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = MLP(img_dim, embed_size // 2, embed_size)

    def forward(self, images: torch.Tensor, image_lengths=None) -> torch.Tensor:
        return l2norm(self.mlp(images) + self.fc(images))


class TextEncoder(nn.Module):
    """``EncoderText``: BERT, ``Linear(hidden, E)``, ``l2norm``."""

    def __init__(self, txt: dict) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        words = txt["bert.embeddings.word_embeddings.weight"]
        hidden = words.shape[1]
        assert hidden % 12 == 0, "the transcription builds a 12-head BERT (bert-base's head count)"
        cfg = BertConfig(
            vocab_size=words.shape[0],
            hidden_size=hidden,
            num_hidden_layers=1 + max(int(k.split(".")[3]) for k in txt if k.startswith("bert.encoder.layer.")),
            num_attention_heads=12,
            intermediate_size=txt["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=txt["bert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=txt["bert.embeddings.token_type_embeddings.weight"].shape[0],
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        cfg._attn_implementation = "eager"
        self.bert = BertModel(cfg, add_pooling_layer="bert.pooler.dense.weight" in txt)
        self.linear = nn.Linear(hidden, txt["linear.weight"].shape[0])

    def forward(self, ids: torch.Tensor, lengths=None) -> torch.Tensor:
        hidden = self.bert(ids, (ids != 0).to(self.linear.weight.dtype))[0]
        return l2norm(self.linear(hidden))


def _module_tree(state: dict) -> nn.Module:
    """Empty modules holding one parameter per released key (``a.b.c.weight`` -> ``a.b.c``)."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, nn.Parameter(torch.empty_like(value)))
    return root


class SimVec(nn.Module):
    """``Sim_vec`` (``plus_encoder`` levels, then ``sims.calculator_1``), under its released
    parameter names; the arithmetic is :func:`released_forward.levels` / :func:`scores`."""

    def __init__(self, sim: dict) -> None:
        super().__init__()
        tree = _module_tree(sim)
        self.plus_encoder = tree.plus_encoder
        self.sims = tree.sims
        self.heuristic = any("kernel_img_" in k for k in sim)
        self.n_levels = len([k for k in sim if k.startswith("plus_encoder.encoders_1.image_levels.")])

    def forward(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, cap_lens) -> torch.Tensor:
        p = dict(self.named_parameters())
        img_lv = levels(p, img_emb, "image", self.n_levels, self.heuristic)
        cap_lv = levels(p, cap_emb, "text", self.n_levels, self.heuristic)
        return scores(p, img_lv, cap_lv, cap_lens, self.n_levels, self.heuristic)


def contrastive_loss(scores_: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """``ContrastiveLoss.forward``: rows are images, columns captions."""
    n = scores_.size(0)
    diagonal = scores_.diag().view(n, 1)
    cost_s = (margin + scores_ - diagonal.expand_as(scores_)).clamp(min=0)  # caption retrieval
    cost_im = (margin + scores_ - diagonal.t().expand_as(scores_)).clamp(min=0)  # image retrieval
    eye = torch.eye(n, dtype=torch.bool)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, lr_schedules: list[int]) -> None:
    """``train.py``: every group's current lr times 0.1 at the epochs listed (``[lr_update]``)."""
    if epoch in lr_schedules:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * 0.1


class ReleasedVSE:
    """``VSEModel`` of the BERT + regions system, built from a released-format checkpoint.

    Args:
        ckpt: ``{"model": [image state, text state, similarity state]}`` (``module.`` prefixes
            allowed), e.g. from ``tests/_models.py`` ``make_released_checkpoint``.
        learning_rate, margin, grad_clip: ``opt.learning_rate``, ``opt.margin``, ``opt.grad_clip``.
        dtype: the modules' dtype (float32 as released; float64 to compare without float noise).
    """

    def __init__(
        self,
        ckpt: dict,
        learning_rate: float = 5e-4,
        margin: float = 0.2,
        grad_clip: float = 2.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        img, txt, sim = (_strip(sd) for sd in ckpt["model"])
        self.img_enc = ImageEncoder(img["fc.weight"].shape[1], img["fc.weight"].shape[0])
        self.txt_enc = TextEncoder(txt)
        self.sim_vec = SimVec(sim)
        for module, state in ((self.img_enc, img), (self.txt_enc, txt), (self.sim_vec, sim)):
            module.load_state_dict(state, strict=True)
            module.to(dtype)
        self.grad_clip = grad_clip
        self.margin = margin
        self.max_violation = False  # --max_violation is store_true, off by default
        self.grad_norms: list[float] = []  # clip_grad_norm_'s return (the norm before clipping), per step
        self.params = [*self.txt_enc.parameters(), *self.img_enc.parameters(), *self.sim_vec.parameters()]
        bert_ptrs = {p.data_ptr() for p in self.txt_enc.bert.parameters()}
        text_no_bert = [p for p in self.txt_enc.parameters() if p.data_ptr() not in bert_ptrs]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": text_no_bert, "lr": learning_rate},
                {"params": list(self.txt_enc.bert.parameters()), "lr": learning_rate * 0.1},
                {"params": self.img_enc.parameters(), "lr": learning_rate},
                {"params": self.sim_vec.parameters(), "lr": learning_rate},
            ],
            lr=learning_rate,
            weight_decay=1e-4,
        )

    def set_max_violation(self, max_violation: bool) -> None:
        self.max_violation = max_violation

    def train_start(self) -> None:
        for m in (self.img_enc, self.txt_enc, self.sim_vec):
            m.train()

    def val_start(self) -> None:
        for m in (self.img_enc, self.txt_enc, self.sim_vec):
            m.eval()

    def forward_sim(self, images, captions, lengths) -> torch.Tensor:
        img_emb = self.img_enc(images)
        cap_emb = self.txt_enc(captions, lengths)
        return self.sim_vec(img_emb, cap_emb, lengths)

    def train_emb(self, images, captions, lengths) -> float:
        """One optimiser step; returns the batch loss computed before it."""
        sims = self.forward_sim(images, captions, lengths)
        self.optimizer.zero_grad(set_to_none=False)
        loss = contrastive_loss(sims, self.margin, self.max_violation)
        loss.backward()
        if self.grad_clip > 0:
            self.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)))
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, images, captions, lengths) -> torch.Tensor:
        """Scores ``(n_images, n_captions)`` in eval mode (running BatchNorm statistics)."""
        self.val_start()
        return self.forward_sim(images, captions, lengths)

    def state_dict(self) -> dict:
        """``{"model": [image, text, similarity]}``: the released checkpoint layout."""
        return {
            "model": [
                {k: v.detach().clone() for k, v in m.state_dict().items()}
                for m in (self.img_enc, self.txt_enc, self.sim_vec)
            ]
        }


def start_epoch(model: ReleasedVSE, epoch: int, lr_update: int, vse_mean_warmup_epochs: int) -> None:
    """The head of ``train.py``'s epoch loop."""
    adjust_learning_rate(model.optimizer, epoch, [lr_update])
    if epoch >= vse_mean_warmup_epochs:
        model.set_max_violation(True)


def train_step(model: ReleasedVSE, images, captions, lengths) -> float:
    """One iteration of ``train.py``'s ``train``: ``train_start`` then ``train_emb``."""
    model.train_start()
    return model.train_emb(images, captions, lengths)
