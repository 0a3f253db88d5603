"""Small models, tokenizers and released-format checkpoints made on the fly for tests."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from eslmatch.config import ESLConfig
from eslmatch.model.base import MatchingModel
from eslmatch.model.esl import ESLModel
from eslmatch.text import WordVocab
from eslmatch.utils import l2n

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
# The released code's reference outputs live beside the repository (../shared), not in it: a
# plain clone skips the tests that read them, with this one-line reason.
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "official_adaptive.pth.tar").is_file(),
    reason=f"reference fixtures not found at {FIXTURES} (a clone without ../shared)",
)
# A small CLIP architecture for ESL-CLIP tests (random weights; 32 px images, 1-layer towers).
TINY_CLIP = {
    "embed_dim": 32,
    "image_size": 32,
    "patch_size": 16,
    "vision_width": 64,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_width": 64,
    "text_layers": 1,
    "text_heads": 2,
}
WORDS = ["a", "red", "blue", "green", "circle", "square", "left", "of", "right", "above", "big", "small", "the", "and"]


def tiny_vocab() -> WordVocab:
    return WordVocab.build([" ".join(WORDS)])


def tiny_gru_model(
    strategy: str = "adaptive",
    embed_size: int = 32,
    kernel_size: int = 2,
    num_levels: int = 3,
    img_dim: int = 16,
    seed: int = 0,
) -> ESLModel:
    torch.manual_seed(seed)
    vocab = tiny_vocab()
    cfg = ESLConfig(
        strategy=strategy,
        embed_size=embed_size,
        kernel_size=kernel_size,
        num_levels=num_levels,
        img_dim=img_dim,
        text_encoder="gru",
        text_model=None,
        vocab_size=len(vocab),
        word_dim=16,
    )
    model = ESLModel(cfg, tokenizer=vocab)
    randomize(model)
    return model


def randomize(model: torch.nn.Module) -> None:
    """Move every parameter and BatchNorm statistic off its initial constant."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("correspondence.w"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.05)
            elif name.endswith("pooling.t"):
                p.fill_(2.0)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def tiny_bert_tokenizer(directory: Path):
    """A BERT WordPiece tokenizer over a small vocabulary, built offline."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory))


def tiny_bert_config(vocab_size: int = 60, hidden: int = 24):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=12,
        intermediate_size=16,
        max_position_embeddings=32,
    )


def make_released_checkpoint(
    path: Path,
    strategy: str,
    embed_size: int = 64,
    kernel_size: int = 2,
    num_levels: int = 3,
    img_dim: int = 32,
    seed: int = 0,
) -> dict:
    """A checkpoint in the released training format (spec section 7) with random values."""
    from transformers import BertModel

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g)

    e = embed_size
    img = {
        "fc.weight": rnd(e, img_dim, scale=0.1),
        "fc.bias": rnd(e, scale=0.1),
        "mlp.layers.0.weight": rnd(e // 2, img_dim, scale=0.1),
        "mlp.layers.0.bias": rnd(e // 2, scale=0.1),
        "mlp.layers.1.weight": rnd(e, e // 2, scale=0.1),
        "mlp.layers.1.bias": rnd(e, scale=0.1),
    }
    for i, n in ((0, e // 2), (1, e)):
        img.update(
            {
                f"mlp.bns.{i}.weight": 1 + rnd(n, scale=0.1),
                f"mlp.bns.{i}.bias": rnd(n, scale=0.1),
                f"mlp.bns.{i}.running_mean": rnd(n, scale=0.1),
                f"mlp.bns.{i}.running_var": 0.5 + torch.rand(n, generator=g),
                f"mlp.bns.{i}.num_batches_tracked": torch.tensor(7),
            }
        )
    bert_cfg = tiny_bert_config()
    bert = BertModel(bert_cfg)
    txt = {f"bert.{k}": rnd(*v.shape, scale=0.2) if v.is_floating_point() else v for k, v in bert.state_dict().items()}
    txt = {k: v for k, v in txt.items() if not k.endswith("position_ids")}
    txt["linear.weight"] = rnd(e, bert_cfg.hidden_size, scale=0.2)
    txt["linear.bias"] = rnd(e, scale=0.1)
    dims = [e // kernel_size**lv for lv in range(num_levels + 1)]
    sim = {}
    for side, short in (("image", "img"), ("text", "txt")):
        for lv in range(1, num_levels + 1):
            if strategy == "adaptive":
                sim[f"plus_encoder.encoders_1.{side}_levels.masks_{lv}.weight"] = rnd(dims[lv], dims[lv - 1])
            else:
                sim[f"plus_encoder.encoders_1.{side}_levels.kernel_{short}_{lv}.weight"] = rnd(
                    4, 1, kernel_size, scale=0.5
                )
    p = "sims.calculator_1."
    sim[p + "sim_eval.weight"] = 0.05 + 0.3 * torch.rand(1, num_levels + 1, generator=g)
    sim[p + "temp_scale.weight"] = torch.tensor([[2.3]])
    sim[p + "temp_scale_1.weight"] = torch.tensor([[0.3]])
    sim[p + "temp_scale_2.weight"] = torch.tensor([[1.5]])
    for lv, n in enumerate(dims):
        sim[p + f"masks_{lv}.weight"] = rnd(n, n)
        sim[p + f"lynorm_{lv}.weight"] = 1 + rnd(n, n, scale=0.1)
        sim[p + f"lynorm_{lv}.bias"] = rnd(n, n, scale=0.1)
    opt = argparse.Namespace(
        embed_size=e,
        kernel_size=kernel_size,
        img_dim=img_dim,
        margin=0.2,
        precomp_enc_type="basic",
        vocab_size=bert_cfg.vocab_size,
    )
    ckpt = {
        "epoch": 3,
        "model": [{f"module.{k}": v for k, v in sd.items()} for sd in (img, txt, sim)],
        "best_rsum": 123.4,
        "opt": opt,
        "Eiters": 100,
    }
    torch.save(ckpt, path)
    return ckpt


def released_inputs(
    n_images: int = 5, n_caps: int = 7, regions: int = 6, img_dim: int = 32, vocab: int = 60, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    images = torch.relu(torch.randn(n_images, regions, img_dim, generator=g))
    lens = torch.randint(3, 10, (n_caps,), generator=g)
    lens[0] = 10
    caps = torch.zeros(n_caps, 10, dtype=torch.long)
    for j, n in enumerate(lens.tolist()):
        caps[j, 0] = 2
        caps[j, 1 : n - 1] = torch.randint(5, vocab, (n - 2,), generator=g)
        caps[j, n - 1] = 3
    return images, caps, lens


# ---------------------------------------------------------------------- a model that takes pixels
TOY_WORDS = ["<pad>", "<unk>", *WORDS, "is"]


@dataclass
class ToyConfig:
    model_type: str = "toy-pixels"
    embed_size: int = 12
    image_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ToyConfig:
        return cls(**{k: data[k] for k in ("embed_size", "image_size") if k in data})


class ToyPixelModel(MatchingModel):
    """A stand-in for ESL-CLIP: 16x16 pixels -> linear image tower; bag of words -> text tower."""

    family = "toy-pixels"
    config_class = ToyConfig
    exact_index = True
    inputs = "pixels"

    def __init__(self, config: ToyConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or ToyConfig()
        s, e = self.config.image_size, self.config.embed_size
        g = torch.Generator().manual_seed(seed)
        self.image_tower = nn.Linear(3 * s * s, e)
        self.word_vectors = nn.Embedding(len(TOY_WORDS), e, padding_idx=0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.word_vectors.weight[0] = 0
        self.tokenizer = None

    def preprocess(self, image) -> torch.Tensor:  # a PIL image
        from PIL import Image

        s = self.config.image_size
        pixels = np.asarray(image.convert("RGB").resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def preprocess_image(self, image) -> torch.Tensor:
        return self.preprocess(image)

    def tokenize(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [[TOY_WORDS.index(w) if w in TOY_WORDS else 1 for w in t.lower().split()] or [1] for t in texts]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) for r in rows])

    def parts(self) -> dict[str, nn.Module]:
        return {"image_tower": self.image_tower, "word_vectors": self.word_vectors}

    def embed_images(self, images, image_lengths=None):
        return l2n(self.image_tower(images.to(self.device).flatten(1)))

    def embed_captions(self, captions, caption_lengths):
        summed = self.word_vectors(captions.to(self.device)).sum(1)
        return l2n(summed / torch.as_tensor(caption_lengths, device=self.device)[:, None].float())

    def score(self, image_emb, image_lengths, caption_emb, caption_lengths, options=None):
        return image_emb @ caption_emb.t()

    def index_vectors_images(self, image_emb, image_lengths=None):
        return image_emb

    def index_vectors_captions(self, caption_emb, caption_lengths):
        return caption_emb

    @classmethod
    def build_for_loading(cls, config, directory):
        return cls(config)
