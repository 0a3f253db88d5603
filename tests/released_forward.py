"""An independent transcription of the released ESL forward pass, for tests only.

Written from spec sections 1-4 in the released code's own structure: raw state dicts with
the released key names, ``F.conv1d`` / matrix products per level, one caption at a time
repeated over every image, and the released pooling with its transposes. It shares no code
with :mod:`eslmatch` (only torch and transformers), so agreement is evidence of parity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _l2(x, dim=-1):
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def image_embed(img: dict, v: torch.Tensor) -> torch.Tensor:
    n, r, d = v.shape
    fc = F.linear(v, img["fc.weight"], img["fc.bias"])
    x = F.linear(v.reshape(n * r, d), img["mlp.layers.0.weight"], img["mlp.layers.0.bias"])
    x = F.batch_norm(
        x,
        img["mlp.bns.0.running_mean"],
        img["mlp.bns.0.running_var"],
        img["mlp.bns.0.weight"],
        img["mlp.bns.0.bias"],
        False,
        0.1,
        1e-5,
    )
    x = F.linear(torch.relu(x), img["mlp.layers.1.weight"], img["mlp.layers.1.bias"])
    return _l2(fc + x.reshape(n, r, -1))


def text_embed(txt: dict, ids: torch.Tensor) -> torch.Tensor:
    from transformers import BertConfig, BertModel

    words = txt["bert.embeddings.word_embeddings.weight"]
    n_layers = 1 + max(int(k.split(".")[3]) for k in txt if k.startswith("bert.encoder.layer."))
    cfg = BertConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=n_layers,
        num_attention_heads=12,
        intermediate_size=txt["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=txt["bert.embeddings.position_embeddings.weight"].shape[0],
    )
    cfg._attn_implementation = "eager"
    bert = BertModel(cfg).eval()
    bert.load_state_dict({k[5:]: v for k, v in txt.items() if k.startswith("bert.")}, strict=False)
    hidden = bert(ids, (ids != 0).float())[0]
    return _l2(F.linear(hidden, txt["linear.weight"], txt["linear.bias"]))


def _adaptive_mask(w):
    m = _l2(w)
    sel = min(2, m.shape[1])
    rng = m.sort(1, descending=True)[0][:, sel - 1].unsqueeze(-1)
    return (m >= rng).float() * m


def levels(sim: dict, emb: torch.Tensor, side: str, n_levels: int, heuristic: bool) -> torch.Tensor:
    """side 'image' feeds normalised levels forward, 'text' the raw ones."""
    pre = "plus_encoder.encoders_1." + ("image_levels." if side == "image" else "text_levels.")
    b, n, _ = emb.shape
    outs, prev = [emb], emb
    for lvl in range(1, n_levels + 1):
        flat = prev.reshape(b * n, -1)
        if heuristic:
            w = sim[pre + (f"kernel_img_{lvl}" if side == "image" else f"kernel_txt_{lvl}") + ".weight"]
            k = w.shape[-1]
            raw = F.conv1d(flat.unsqueeze(-2), w, stride=k).sum(1)
        else:
            raw = flat @ _adaptive_mask(sim[pre + f"masks_{lvl}.weight"]).t()
        raw = raw.reshape(b, n, -1)
        out = _l2(raw)
        outs.append(out)
        prev = out if side == "image" else raw
    return torch.cat(outs, -1)


def _weights(attn, smooth):
    a = F.leaky_relu(attn.transpose(1, 2).contiguous(), 0.1)
    a = _l2(a, 2).transpose(1, 2).contiguous()
    return F.softmax(a * smooth, dim=2)


def scores(sim: dict, img_lv: torch.Tensor, cap_lv: torch.Tensor, cap_lens, n_levels: int, heuristic: bool):
    p = "sims.calculator_1."
    w = sim[p + "sim_eval.weight"]
    smooth = torch.exp(sim[p + "temp_scale.weight"])
    sigma = sim[p + "temp_scale_1.weight"]
    lam = torch.exp(sim[p + "temp_scale_2.weight"]) if heuristic else 0
    thr = (w.abs().max() - w.abs().min()) * sigma + w.abs().min()
    dims = [sim[p + f"masks_{lv}.weight"].shape[0] for lv in range(n_levels + 1)]
    ds = []
    for lv, n in enumerate(dims):
        c = torch.exp((w[0, lv].abs() - thr) * lam) * w[0, lv]
        s = sim[p + f"masks_{lv}.weight"]
        ds.append(F.layer_norm(s, (n, n), sim[p + f"lynorm_{lv}.weight"], sim[p + f"lynorm_{lv}.bias"], 1e-8) * c)
    bounds = [sum(dims[:i]) for i in range(len(dims) + 1)]
    n_img = img_lv.shape[0]
    cols = []
    for i in range(cap_lv.shape[0]):
        nw = int(cap_lens[i])
        attn = 0
        for lv in range(len(dims)):
            x = cap_lv[i, :nw, bounds[lv] : bounds[lv + 1]].unsqueeze(0).repeat(n_img, 1, 1)
            y = img_lv[:, :, bounds[lv] : bounds[lv + 1]]
            attn = attn + x @ ds[lv] @ y.transpose(1, 2)
        attn_t = attn.transpose(1, 2).contiguous()
        t2i = attn.mul(_weights(torch.tanh(attn), smooth)).sum(-1).mean(dim=1, keepdim=True)
        i2t = attn_t.mul(_weights(torch.tanh(attn_t), smooth)).sum(-1).mean(dim=1, keepdim=True)
        cols.append(t2i + i2t)
    return torch.cat(cols, 1)


@torch.no_grad()
def released_similarity(ckpt: dict, images, captions, cap_lens) -> torch.Tensor:
    img, txt, sim = ({k.removeprefix("module."): v for k, v in sd.items()} for sd in ckpt["model"])
    heuristic = any("kernel_img_" in k for k in sim)
    n_levels = len([k for k in sim if k.startswith("plus_encoder.encoders_1.image_levels.")])
    img_lv = levels(sim, image_embed(img, images), "image", n_levels, heuristic)
    cap_lv = levels(sim, text_embed(txt, captions), "text", n_levels, heuristic)
    return scores(sim, img_lv, cap_lv, cap_lens, n_levels, heuristic)
