"""CLIP's two towers in plain PyTorch: the computation of ``transformers``' ``CLIPModel`` (eager
attention, quick-GELU, layer-norm eps 1e-5) with its parameter names, so that its weights load
as they are, without importing ``transformers`` (seconds on a small CPU) for every command.

``vision_model(pixels (N, 3, H, W)) -> (N, Wv)``: the post-LayerNorm class token.
``text_model(ids (M, T)) -> (M, T, Wt)``: the final-LayerNorm states (causal attention).
``visual_projection`` / ``text_projection`` map them to the joint width; ``logit_scale`` is
CLIP's learned log-temperature. ``tests/test_esl_clip.py`` checks each output against
``transformers.CLIPModel`` on the same weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from .config import ClipArchitecture

LAYER_NORM_EPS = 1e-5


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention; ``mask``: additive ``(T, T)`` (the text tower's causal one)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        shape = (*x.shape[:-1], self.heads, -1)  # (B, T, H, d)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        weights = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is not None:
            weights = weights + mask
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(*x.shape[:-1], -1))


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.self_attn = Attention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(width)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(positions, width)

    def forward(self, ids: Tensor) -> Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[-1]]


class TextTransformer(nn.Module):
    def __init__(self, arch: ClipArchitecture) -> None:
        super().__init__()
        self.embeddings = TextEmbeddings(arch.vocab_size, arch.context_length, arch.text_width)
        self.encoder = Encoder(arch.text_width, arch.text_layers, arch.text_heads)
        self.final_layer_norm = nn.LayerNorm(arch.text_width, eps=LAYER_NORM_EPS)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids (M, T)`` -> final-LayerNorm states ``(M, T, Wt)``."""
        x = self.embeddings(ids)
        t = ids.shape[-1]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)
        return self.final_layer_norm(self.encoder(x, mask))


class VisionEmbeddings(nn.Module):
    def __init__(self, arch: ClipArchitecture) -> None:
        super().__init__()
        w = arch.vision_width
        self.class_embedding = nn.Parameter(torch.zeros(w))  # never uninitialised memory (ClipTowers draws it)
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=arch.patch_size, stride=arch.patch_size, bias=False)
        self.position_embedding = nn.Embedding((arch.image_size // arch.patch_size) ** 2 + 1, w)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, arch: ClipArchitecture) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(arch)
        self.pre_layrnorm = nn.LayerNorm(arch.vision_width, eps=LAYER_NORM_EPS)  # (sic: transformers' name)
        self.encoder = Encoder(arch.vision_width, arch.vision_layers, arch.vision_heads)
        self.post_layernorm = nn.LayerNorm(arch.vision_width, eps=LAYER_NORM_EPS)

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels (N, 3, H, W)`` -> the post-LayerNorm class token ``(N, Wv)``."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0, :])


class ClipTowers(nn.Module):
    """Both towers, their projections and the logit scale (``transformers.CLIPModel``'s names)."""

    def __init__(self, arch: ClipArchitecture) -> None:
        super().__init__()
        self.text_model = TextTransformer(arch)
        self.vision_model = VisionTransformer(arch)
        self.visual_projection = nn.Linear(arch.vision_width, arch.embed_dim, bias=False)
        self.text_projection = nn.Linear(arch.text_width, arch.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init(arch)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_model.encoder.gradient_checkpointing = enabled
        self.vision_model.encoder.gradient_checkpointing = enabled

    @torch.no_grad()
    def _init(self, arch: ClipArchitecture) -> None:
        """Random weights by CLIP's rule (a model trained from scratch, or the tests' random ones)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        for encoder, width, layers in (
            (self.text_model.encoder, arch.text_width, arch.text_layers),
            (self.vision_model.encoder, arch.vision_width, arch.vision_layers),
        ):
            for layer in encoder.layers:
                attn, mlp = cast(EncoderLayer, layer).self_attn, cast(EncoderLayer, layer).mlp
                deep = width**-0.5 * (2 * layers) ** -0.5  # transformers' CLIP rule
                for p in (attn.q_proj, attn.k_proj, attn.v_proj):
                    nn.init.normal_(p.weight, std=deep)
                nn.init.normal_(attn.out_proj.weight, std=width**-0.5)
                nn.init.normal_(mlp.fc1.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(mlp.fc2.weight, std=deep)
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.02)
        v = self.vision_model.embeddings
        nn.init.normal_(v.class_embedding, std=arch.vision_width**-0.5)
        nn.init.normal_(v.patch_embedding.weight, std=0.02)
        nn.init.normal_(v.position_embedding.weight, std=0.02)
        nn.init.normal_(self.visual_projection.weight, std=arch.vision_width**-0.5)
        nn.init.normal_(self.text_projection.weight, std=arch.text_width**-0.5)
