"""An independent transcription of the CLIP-based ESL branch (kkzhang95/ESL), for parity tests.

It works on a plain released-format state dict (``clip.*`` with OpenAI's names and
``pool_frames.*``) and shares no code with eslmatch:

- OpenAI's CLIP towers (``model/clip_model.py``): patch conv, class token, positional
  embedding, ``ln_pre``, residual blocks of ``nn.MultiheadAttention`` (fused ``in_proj``) and
  a QuickGELU MLP, ``ln_post`` of the class token times ``proj``; the text tower with a causal
  mask over 77 positions, ``ln_final`` at ``argmax(ids)`` times ``text_projection``;
- ``modules/transformer.py``: features divided by their norm, the level stacks (heuristic
  Conv1d channels summed / adaptive top-2 masks; the image chain feeds the normalised level,
  the text chain the raw one), ``sims_claculator`` (``X_l @ (M_l * weight_l) @ Y_l^T``
  averaged over levels, the sigmoid threshold);
- ``modules/loss.py``: ``CLIPLoss`` (log-softmax both ways, diagonal, mean, halved);
- ``modules/tokenization_clip.py``: ``SimpleTokenizer`` and its 77-token call.
"""

from __future__ import annotations

import gzip
import html
import math

import ftfy
import regex
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- CLIP towers


def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def _block(x, sd, prefix, heads, mask):
    """One OpenAI residual block, x (L, N, D) as nn.MultiheadAttention takes it."""
    h = _ln(x, sd, prefix + ".ln_1")
    d = x.shape[-1]
    attn, _ = F.multi_head_attention_forward(
        h,
        h,
        h,
        d,
        heads,
        sd[prefix + ".attn.in_proj_weight"],
        sd[prefix + ".attn.in_proj_bias"],
        None,
        None,
        False,
        0.0,
        sd[prefix + ".attn.out_proj.weight"],
        sd[prefix + ".attn.out_proj.bias"],
        training=False,
        need_weights=False,
        attn_mask=mask,
    )
    x = x + attn
    h = _ln(x, sd, prefix + ".ln_2")
    h = h @ sd[prefix + ".mlp.c_fc.weight"].t() + sd[prefix + ".mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    h = h @ sd[prefix + ".mlp.c_proj.weight"].t() + sd[prefix + ".mlp.c_proj.bias"]
    return x + h


def _layers(sd, prefix):
    return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})


def encode_image(sd, pixels):
    """``clip.encode_image``: (N, 3, H, W) -> (N, E)."""
    conv = sd["clip.visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    x = F.conv2d(pixels, conv, stride=patch)
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)
    cls = sd["clip.visual.class_embedding"] + torch.zeros(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + sd["clip.visual.positional_embedding"]
    x = _ln(x, sd, "clip.visual.ln_pre").permute(1, 0, 2)
    for i in range(_layers(sd, "clip.visual.transformer.resblocks")):
        x = _block(x, sd, f"clip.visual.transformer.resblocks.{i}", width // 64, None)
    x = x.permute(1, 0, 2)
    return _ln(x[:, 0, :], sd, "clip.visual.ln_post") @ sd["clip.visual.proj"]


def encode_text(sd, ids):
    """``clip.encode_text``: (M, 77) token ids -> (M, E)."""
    n_ctx = sd["clip.positional_embedding"].shape[0]
    width = sd["clip.ln_final.weight"].shape[0]
    x = sd["clip.token_embedding.weight"][ids] + sd["clip.positional_embedding"]
    mask = torch.full((n_ctx, n_ctx), float("-inf")).triu_(1)
    x = x.permute(1, 0, 2)
    for i in range(_layers(sd, "clip.transformer.resblocks")):
        x = _block(x, sd, f"clip.transformer.resblocks.{i}", width // 64, mask)
    x = _ln(x.permute(1, 0, 2), sd, "clip.ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["clip.text_projection"]


# ---------------------------------------------------------------------------- the ESL head

_LV = "pool_frames.cross_attn.plus_encoder.encoders_1."
_SIM = "pool_frames.cross_attn.sims.calculator_1."


def _l2norm(x, dim=-1, eps=1e-8):
    return x / (torch.pow(x, 2).sum(dim=dim, keepdim=True).sqrt() + eps)


def _levels(sd, emb, side, heuristic):
    short = "img" if side == "image" else "txt"
    feed_norm = side == "image"
    outs = [emb]
    prev = emb
    lvl = 1
    while True:
        if heuristic:
            key = f"{_LV}{side}_levels.kernel_{short}_{lvl}.weight"
            if key not in sd:
                break
            k = sd[key].shape[-1]
            raw = F.conv1d(prev.unsqueeze(-2), sd[key], stride=k).sum(1)
        else:
            key = f"{_LV}{side}_levels.masks_{lvl}.weight"
            if key not in sd:
                break
            m = _l2norm(sd[key], dim=-1)
            select = min(2, m.shape[1])
            cut = m.sort(1, descending=True)[0][:, select - 1].unsqueeze(-1)
            m = (m >= cut).float() * m
            raw = prev.reshape(-1, prev.shape[-1]) @ m.t()
        out = _l2norm(raw, -1)
        outs.append(out)
        prev = out if feed_norm else raw
        lvl += 1
    return outs


def head_scores(sd, image_features, text_features, heuristic):
    """``MultiHeadedAttention.forward``: (N, E), (M, E) -> sims (N images, M texts)."""
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    xs = _levels(sd, image_features, "image", heuristic)
    ys = _levels(sd, text_features, "text", heuristic)
    w = sd[_SIM + "sim_eval.weight"]
    sigma = sd[_SIM + "temp_scale_1.weight"]
    lam = torch.exp(sd[_SIM + "temp_scale_2.weight"])
    thr = (torch.abs(w).max() - torch.abs(w).min()) * torch.sigmoid(sigma) + torch.abs(w).min()
    total = 0
    for lvl, (x, y) in enumerate(zip(xs, ys)):
        weight = torch.exp((torch.abs(w[0, lvl]) - thr) * lam) * w[0, lvl]
        d = sd[f"{_SIM}masks_{lvl}.weight"] * weight
        total = total + x @ d @ y.transpose(0, 1)
    return total / len(xs)


def released_similarity(sd, pixels, ids, heuristic):
    """The branch's ``CLIPTransformer.forward``: scores (N images, M texts)."""
    return head_scores(sd, encode_image(sd, pixels), encode_text(sd, ids), heuristic)


def clip_loss(sims, logit_scale):
    """``CLIPLoss.forward`` (its argument is the log-scale)."""
    logits = sims * logit_scale.exp()
    t2v = -torch.diag(F.log_softmax(logits, dim=1)).mean()
    v2t = -torch.diag(F.log_softmax(logits, dim=0)).mean()
    return (t2v + v2t) / 2.0


# ---------------------------------------------------------------------------- tokenizer


def _byte_table():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class ReferenceTokenizer:
    """``SimpleTokenizer`` with the branch's ``__call__`` (77 ids, cut at 77)."""

    def __init__(self, bpe_path):
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        table = _byte_table()
        vocab = list(table.values())
        vocab = (
            vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        )
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.table = table
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def _bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        if not pairs:
            return [token + "</w>"]
        while True:
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = {(a, b) for a, b in zip(word, word[1:])}
        return list(word)

    def encode(self, text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        out = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.table[b] for b in token.encode("utf-8"))
            out.extend(self.encoder[t] for t in self._bpe(token))
        return out

    def __call__(self, texts):
        sot, eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        result = torch.zeros(len(texts), 77, dtype=torch.long)
        for i, t in enumerate(texts):
            tokens = [sot, *self.encode(t), eot]
            tokens = tokens[:77]
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result


# ---------------------------------------------------------------------------- checkpoints


def random_release(
    strategy,
    embed=64,
    levels=3,
    kernel=2,
    vision_width=128,
    vision_layers=2,
    patch=16,
    image_size=32,
    text_width=128,
    text_layers=2,
    vocab=49408,
    context=77,
    seed=0,
):
    """A released-format ``{'epoch', 'state_dict', 'optimizer'}`` with every tensor random."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {}

    def block(prefix, width):
        sd[prefix + ".attn.in_proj_weight"] = r(3 * width, width, scale=width**-0.5)
        sd[prefix + ".attn.in_proj_bias"] = r(3 * width)
        sd[prefix + ".attn.out_proj.weight"] = r(width, width, scale=width**-0.5)
        sd[prefix + ".attn.out_proj.bias"] = r(width)
        for ln in ("ln_1", "ln_2"):
            sd[f"{prefix}.{ln}.weight"] = 1 + r(width, scale=0.1)
            sd[f"{prefix}.{ln}.bias"] = r(width)
        sd[prefix + ".mlp.c_fc.weight"] = r(4 * width, width, scale=width**-0.5)
        sd[prefix + ".mlp.c_fc.bias"] = r(4 * width)
        sd[prefix + ".mlp.c_proj.weight"] = r(width, 4 * width, scale=(4 * width) ** -0.5)
        sd[prefix + ".mlp.c_proj.bias"] = r(width)

    grid = image_size // patch
    sd["clip.visual.conv1.weight"] = r(vision_width, 3, patch, patch, scale=0.02)
    sd["clip.visual.class_embedding"] = r(vision_width, scale=0.5)
    sd["clip.visual.positional_embedding"] = r(grid * grid + 1, vision_width, scale=0.5)
    for ln in ("ln_pre", "ln_post"):
        sd[f"clip.visual.{ln}.weight"] = 1 + r(vision_width, scale=0.1)
        sd[f"clip.visual.{ln}.bias"] = r(vision_width)
    for i in range(vision_layers):
        block(f"clip.visual.transformer.resblocks.{i}", vision_width)
    sd["clip.visual.proj"] = r(vision_width, embed, scale=vision_width**-0.5)
    sd["clip.token_embedding.weight"] = r(vocab, text_width, scale=0.2)
    sd["clip.positional_embedding"] = r(context, text_width, scale=0.1)
    for i in range(text_layers):
        block(f"clip.transformer.resblocks.{i}", text_width)
    sd["clip.ln_final.weight"] = 1 + r(text_width, scale=0.1)
    sd["clip.ln_final.bias"] = r(text_width)
    sd["clip.text_projection"] = r(text_width, embed, scale=text_width**-0.5)
    sd["clip.logit_scale"] = torch.tensor(math.log(1 / 0.07)) + r(())
    dims = [embed // kernel**lvl for lvl in range(levels + 1)]
    for side, short in (("image", "img"), ("text", "txt")):
        for lvl in range(1, levels + 1):
            if strategy == "heuristic":
                sd[f"{_LV}{side}_levels.kernel_{short}_{lvl}.weight"] = r(4, 1, kernel, scale=0.5)
            else:
                sd[f"{_LV}{side}_levels.masks_{lvl}.weight"] = r(dims[lvl], dims[lvl - 1], scale=1.0)
    for lvl, n in enumerate(dims):
        sd[f"{_SIM}masks_{lvl}.weight"] = torch.eye(n) + r(n, n, scale=0.1)
    sd[_SIM + "sim_eval.weight"] = torch.rand(1, levels + 1, generator=g) * 0.4 + 0.05
    sd[_SIM + "temp_scale.weight"] = torch.tensor([[math.log(1 / 0.07)]])
    sd[_SIM + "temp_scale_1.weight"] = r(1, 1, scale=1.0)
    sd[_SIM + "temp_scale_2.weight"] = torch.tensor([[2.0]]) + r(1, 1, scale=0.5)
    optimizer = {
        "state": {0: {"step": 3, "exp_avg": r(2), "exp_avg_sq": r(2).abs()}},
        "param_groups": [{"lr": 1e-6, "weight_decay": 0.2, "params": [0]}],
    }
    return {"epoch": 5, "state_dict": sd, "optimizer": optimizer}
