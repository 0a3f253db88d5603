"""An independent transcription of the released ESL training step (CrossmodalGroup/ESL), for tests.

From the released code, in its structure, sharing no code with eslmatch:

- ``lib/vse.py`` ``VSEModel.__init__``: ``torch.optim.AdamW`` with four groups (text encoder
  without BERT at ``lr``, BERT at ``lr * 0.1``, image encoder at ``lr``, similarity module at
  ``lr``), ``weight_decay=1e-4`` for all;
- ``VSEModel.train_emb``: embeddings, scores, ``zero_grad``, ``ContrastiveLoss``, backward,
  ``clip_grad_norm_(all parameters, grad_clip)``, ``step``;
- ``lib/loss.py`` ``ContrastiveLoss``: the hinge to the diagonal, column-wise (caption
  retrieval) and row-wise (image retrieval), diagonal cleared, the row / column maximum when
  ``max_violation``, summed;
- ``train.py``: ``adjust_learning_rate`` (every group's lr times 0.1 when ``epoch ==
  lr_update``) at the start of each epoch, then ``max_violation`` on from
  ``epoch >= vse_mean_warmup_epochs``;
- the image encoder in training mode: its BatchNorm takes batch statistics (and updates the
  running ones); the forward of the levels and the scores is ``tests/released_forward.py``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from released_forward import levels, scores


class ReleasedESL(nn.Module):
    """The released model's trainable tensors under their released names (``img``, ``txt``,
    ``sim`` state dicts) plus its BERT, built from a released-format checkpoint."""

    def __init__(self, ckpt: dict) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        img, txt, sim = ({k.removeprefix("module."): v.clone() for k, v in sd.items()} for sd in ckpt["model"])
        self.img = nn.ParameterDict(
            {
                k.replace(".", "__"): nn.Parameter(v)
                for k, v in img.items()
                if v.is_floating_point() and "running" not in k
            }
        )
        self.img_buffers = {k: v for k, v in img.items() if "running" in k or not v.is_floating_point()}
        self.sim = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v) for k, v in sim.items()})
        words = txt["bert.embeddings.word_embeddings.weight"]
        n_layers = 1 + max(int(k.split(".")[3]) for k in txt if k.startswith("bert.encoder.layer."))
        cfg = BertConfig(
            vocab_size=words.shape[0],
            hidden_size=words.shape[1],
            num_hidden_layers=n_layers,
            num_attention_heads=12,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            intermediate_size=txt["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=txt["bert.embeddings.position_embeddings.weight"].shape[0],
        )
        cfg._attn_implementation = "eager"
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.bert.load_state_dict(
            {k[5:]: v for k, v in txt.items() if k.startswith("bert.") and ".pooler." not in k}, strict=False
        )
        self.linear = nn.Linear(txt["linear.weight"].shape[1], txt["linear.weight"].shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(txt["linear.weight"])
            self.linear.bias.copy_(txt["linear.bias"])
        self.heuristic = any("kernel_img_" in k for k in sim)
        self.n_levels = len([k for k in sim if k.startswith("plus_encoder.encoders_1.image_levels.")])

    def _img(self, key: str) -> torch.Tensor:
        return self.img[key.replace(".", "__")]

    def sim_dict(self) -> dict:
        return {k.replace("__", "."): v for k, v in self.sim.items()}

    def image_embed_train(self, v: torch.Tensor) -> torch.Tensor:
        """The released precomp image encoder in training mode (batch statistics)."""
        n, r, d = v.shape
        fc = F.linear(v, self._img("fc.weight"), self._img("fc.bias"))
        x = F.linear(v.reshape(n * r, d), self._img("mlp.layers.0.weight"), self._img("mlp.layers.0.bias"))
        x = F.batch_norm(
            x,
            self.img_buffers["mlp.bns.0.running_mean"],
            self.img_buffers["mlp.bns.0.running_var"],
            self._img("mlp.bns.0.weight"),
            self._img("mlp.bns.0.bias"),
            True,
            0.1,
            1e-5,
        )
        x = F.linear(torch.relu(x), self._img("mlp.layers.1.weight"), self._img("mlp.layers.1.bias"))
        out = fc + x.reshape(n, r, -1)
        return out / (out.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)

    def text_embed(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(ids, (ids != 0).float())[0]
        out = self.linear(hidden)
        return out / (out.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)

    def forward(self, images, captions, cap_lens) -> torch.Tensor:
        sim = self.sim_dict()
        img_lv = levels(sim, self.image_embed_train(images), "image", self.n_levels, self.heuristic)
        cap_lv = levels(sim, self.text_embed(captions), "text", self.n_levels, self.heuristic)
        return scores(sim, img_lv, cap_lv, cap_lens, self.n_levels, self.heuristic)

    def as_checkpoint(self) -> dict:
        """The current weights in the released checkpoint layout (for the eval transcription)."""
        img = {k.replace("__", "."): v.detach().clone() for k, v in self.img.items()}
        img.update({k: v.clone() for k, v in self.img_buffers.items()})
        txt = {f"bert.{k}": v.detach().clone() for k, v in self.bert.state_dict().items()}
        txt["linear.weight"] = self.linear.weight.detach().clone()
        txt["linear.bias"] = self.linear.bias.detach().clone()
        sim = {k: v.detach().clone() for k, v in self.sim_dict().items()}
        return {"model": [img, txt, sim]}


def contrastive_loss(scores_: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """``ContrastiveLoss.forward`` of ``lib/loss.py``."""
    diagonal = scores_.diag().view(scores_.size(0), 1)
    d1 = diagonal.expand_as(scores_)
    d2 = diagonal.t().expand_as(scores_)
    cost_s = (margin + scores_ - d1).clamp(min=0)
    cost_im = (margin + scores_ - d2).clamp(min=0)
    mask = torch.eye(scores_.size(0)) > 0.5
    cost_s = cost_s.masked_fill_(mask, 0)
    cost_im = cost_im.masked_fill_(mask, 0)
    if max_violation:
        cost_s = cost_s.max(1)[0]
        cost_im = cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


class ReleasedTrainer:
    """``VSEModel`` optimiser + ``train_emb`` + ``train.py``'s schedule and VSE0 -> VSE++ switch."""

    def __init__(
        self,
        model: ReleasedESL,
        lr: float = 5e-4,
        grad_clip: float = 2.0,
        margin: float = 0.2,
        lr_update: int = 15,
        vse_mean_warmup_epochs: int = 1,
    ) -> None:
        self.model = model
        bert = list(model.bert.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": list(model.linear.parameters()), "lr": lr},
                {"params": bert, "lr": lr * 0.1},
                {"params": list(model.img.parameters()), "lr": lr},
                {"params": list(model.sim.parameters()), "lr": lr},
            ],
            lr=lr,
            weight_decay=1e-4,
        )
        self.params = list(model.parameters())
        self.grad_clip, self.margin = grad_clip, margin
        self.lr_update, self.vse_mean_warmup_epochs = lr_update, vse_mean_warmup_epochs
        self.max_violation = False

    def start_epoch(self, epoch: int) -> None:
        if epoch == self.lr_update:  # adjust_learning_rate
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * 0.1
        if epoch >= self.vse_mean_warmup_epochs:
            self.max_violation = True
        self.model.train()

    def train_emb(self, images, captions, lengths) -> float:
        sims = self.model(images, captions, lengths)
        self.optimizer.zero_grad()
        loss = contrastive_loss(sims, self.margin, self.max_violation)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())
