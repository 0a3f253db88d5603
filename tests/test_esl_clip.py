"""ESL-CLIP against an independent transcription of the CLIP-based branch: scores, loss,
tokens, released checkpoints (strict, safe), our format, the inner-product property."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import eslmatch
from eslmatch.cli import main as cli_main
from eslmatch.errors import CheckpointError, InputError
from eslmatch.factory import load_model, load_pretrained
from eslmatch.losses import clip_loss as our_clip_loss
from eslmatch.model.esl_clip import ClipTokenizer, ESLClipConfig, ESLClipModel
from eslmatch.model.esl_clip.tokenizer import VOCAB_FILE
from released_clip_forward import ReferenceTokenizer, clip_loss, random_release, released_similarity

SENTENCES = [
    "a photo of a cat",
    "Two dogs   playing in the SNOW!!",
    "A man riding a wave on top of a surfboard.",
    "café crème &amp; naïve façade, 3 x 4 = 12",
    "it's a red-and-white bus; they'll stop... don't",
    "emoji 🐶🐱 and CJK 猫と犬 and ﬁ ligature",
    "word " * 90,  # longer than the context: cut at 77 like the branch
]
# (strategy, embed, levels, kernel): the branch's 8 levels and other shapes
ARCHS = [("heuristic", 256, 8, 2), ("adaptive", 256, 8, 2), ("heuristic", 64, 3, 2), ("adaptive", 64, 2, 4)]


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def tokens():
    ref = ReferenceTokenizer(VOCAB_FILE)
    return ref(SENTENCES)


def test_tokens_equal_the_branch_tokenizer(tokens):
    ids, lengths = ClipTokenizer()(SENTENCES, pad_to_context=True)
    assert torch.equal(ids, tokens)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    expect = [(row != 0).sum().item() for row in tokens]
    assert lengths.tolist() == expect and lengths[-1] == 77 and ids[-1, -1] != 49407  # cut, no end token


@pytest.mark.parametrize("strategy,embed,levels,kernel", ARCHS)
def test_released_checkpoint_parity(tmp_path, tokens, strategy, embed, levels, kernel):
    ckpt = random_release(strategy, embed=embed, levels=levels, kernel=kernel, seed=levels)
    path = tmp_path / f"model_best_{strategy}_coco_clip_based.pth"
    torch.save(ckpt, path)
    model = eslmatch.load_official_checkpoint(path)
    assert isinstance(model, ESLClipModel) and not model.training
    c = model.config
    assert (c.strategy, c.clip.embed_dim, c.num_levels, c.kernel_size) == (strategy, embed, levels, kernel)
    assert (c.clip.image_size, c.clip.patch_size, c.clip.vision_heads, c.clip.text_layers) == (32, 16, 2, 2)
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(5, 3, 32, 32, generator=g)
    ids = tokens[:5]
    lengths = (ids != 0).sum(1)
    sd = ckpt["state_dict"]
    with torch.no_grad():
        ref = released_similarity(sd, pixels, ids, strategy == "heuristic")  # (N images, M texts)
        ours = model.similarity(pixels, None, ids, lengths)
        trimmed = model.similarity(pixels, None, ids[:, : int(lengths.max())], lengths)
    err = rel(ours, ref)
    print(f"{strategy} E={embed} L={levels} k={kernel}: max relative error {err:.2e}")
    assert err <= 1e-5 and rel(trimmed, ref) <= 1e-5
    loss_ref = clip_loss(ref, sd["clip.logit_scale"])
    loss = our_clip_loss(ours, model.logit_scale.detach())
    assert abs(float(loss) - float(loss_ref)) <= 1e-5 * abs(float(loss_ref))
    # convert: our format reloads to identical scores
    out = tmp_path / "converted"
    assert cli_main(["convert", str(path), str(out)]) == 0
    again = load_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again.similarity(pixels, None, ids, lengths), ours)
    assert isinstance(load_model(out), ESLClipModel)


def test_score_is_an_inner_product_of_index_vectors(tmp_path):
    ckpt = random_release("adaptive", embed=64, levels=3)
    torch.save(ckpt, tmp_path / "m.pth")
    model = eslmatch.load_official_checkpoint(tmp_path / "m.pth")
    ids, lengths = model.tokenize(SENTENCES[:4])
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        img, cap = model.embed_images(pixels), model.embed_captions(ids, lengths)
        direct = model.score(img, None, cap, lengths)
        vec = model.index_vectors_images(img) @ model.index_vectors_captions(cap, lengths).t()
        literal = released_similarity(ckpt["state_dict"], pixels, ids, False)
    assert model.exact_index
    assert rel(vec, direct) <= 1e-6 and rel(vec, literal) <= 1e-5


def test_strict_keys_and_safe_loading(tmp_path):
    ckpt = random_release("heuristic", embed=64, levels=3)
    missing = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if "ln_post.bias" not in k}}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys .*post_layernorm.bias"):
        eslmatch.load_official_checkpoint(tmp_path / "missing.pth")
    extra = {**ckpt, "state_dict": {**ckpt["state_dict"], "pool_frames.cross_attn.q_proj.weight": torch.zeros(2, 2)}}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: pool_frames.cross_attn.q_proj.weight"):
        eslmatch.load_official_checkpoint(tmp_path / "extra.pth")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"epoch": 1, "state_dict": {"clip.x": Evil()}}, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        eslmatch.load_official_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_input_checks():
    cfg = ESLClipConfig(
        num_levels=2,
        clip={
            "embed_dim": 32,
            "image_size": 32,
            "vision_width": 64,
            "vision_layers": 1,
            "vision_heads": 1,
            "text_width": 64,
            "text_layers": 1,
            "text_heads": 1,
        },
    )
    model = ESLClipModel(cfg).eval()
    ids, lengths = model.tokenize(["a cat"])
    assert ids.shape == (1, 77) and lengths.tolist() == [4]
    with pytest.raises(InputError, match="expects 32x32"):
        model.similarity(torch.zeros(1, 3, 64, 64), None, ids, lengths)
    with pytest.raises(InputError, match="preprocessed pixels"):
        model.similarity(torch.zeros(1, 64, 64), None, ids, lengths)
    with pytest.raises(InputError, match="token ids must lie"):
        model.similarity(torch.zeros(1, 3, 32, 32), None, ids + 50000, lengths)
    with pytest.raises(InputError, match="empty"):
        model.tokenize([" "])


def test_preprocess_matches_the_clip_transform():
    """Shorter side to 224 (the longer truncated, as torchvision), centre crop, CLIP's mean/std."""
    from PIL import Image

    from eslmatch.model.esl_clip import ClipPreprocess

    image = Image.new("RGB", (300, 200), (255, 0, 0))
    x = ClipPreprocess(224)(image)
    assert x.shape == (3, 224, 224)
    expect = torch.tensor([(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258, (0 - 0.40821073) / 0.27577711])
    assert torch.allclose(x[:, 100, 100], expect, atol=1e-5)


def test_a_release_with_the_branch_config_object_loads(tmp_path, monkeypatch):
    """The branch's checkpoints also hold ``'config'``: a pickled ``config.all_config.AllConfig``.
    It loads as inert data (the branch's module is not importable here, and nothing runs)."""
    import sys
    import types

    module = types.ModuleType("config.all_config")

    class AllConfig:
        def __init__(self):
            self.clip_lr, self.noclip_lr, self.dataset_name = 1e-6, 3e-5, "MS-COCO"

    AllConfig.__module__ = "config.all_config"
    AllConfig.__qualname__ = "AllConfig"
    module.AllConfig = AllConfig
    monkeypatch.setitem(sys.modules, "config", types.ModuleType("config"))
    monkeypatch.setitem(sys.modules, "config.all_config", module)
    ckpt = random_release("heuristic", embed=64, levels=3)
    ckpt["config"] = AllConfig()
    torch.save(ckpt, tmp_path / "release.pth")
    monkeypatch.delitem(sys.modules, "config.all_config")
    monkeypatch.delitem(sys.modules, "config")
    model = eslmatch.load_official_checkpoint(tmp_path / "release.pth")
    assert isinstance(model, ESLClipModel) and model.config.num_levels == 3


def test_pretrained_towers_load_from_a_transformers_clip_folder(tmp_path):
    """``clip_model`` names a transformers CLIP folder (e.g. openai/clip-vit-base-patch16): its
    towers are loaded as they are (here a small random one saved by transformers)."""
    from transformers import CLIPModel

    from _models import TINY_CLIP

    cfg = ESLClipConfig(num_levels=2, clip=TINY_CLIP)
    towers = CLIPModel(cfg.clip.to_transformers())
    towers.save_pretrained(tmp_path / "clip")
    model = eslmatch.build_model(cfg.replace(clip_model=str(tmp_path / "clip")))
    for name, t in towers.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], t), name
    bigger = ESLClipConfig(num_levels=2, clip={**TINY_CLIP, "vision_layers": 2})
    with pytest.raises(Exception, match="vision_config.num_hidden_layers differs"):
        eslmatch.build_model(bigger.replace(clip_model=str(tmp_path / "clip")))


def test_the_towers_compute_what_transformers_clip_computes():
    """The towers are eslmatch's own (no transformers import: seconds saved on every command of
    an ESL-CLIP model); on the same weights they give transformers' ``CLIPModel`` outputs."""
    from transformers import CLIPModel

    from _models import TINY_CLIP
    from eslmatch.model.esl_clip.towers import ClipTowers

    cfg = ESLClipConfig(num_levels=2, clip={**TINY_CLIP, "text_layers": 2, "vision_layers": 2})
    torch.manual_seed(3)
    theirs = CLIPModel(cfg.clip.to_transformers()).eval()
    ours = ClipTowers(cfg.clip).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    pixels = torch.randn(4, 3, cfg.clip.image_size, cfg.clip.image_size)
    ids, _ = ClipTokenizer(cfg.clip.context_length)(SENTENCES[:3], pad_to_context=True)
    with torch.no_grad():
        want_img = theirs.visual_projection(theirs.vision_model(pixel_values=pixels).pooler_output)
        want_txt = theirs.text_model(input_ids=ids).last_hidden_state
        got_img, got_txt = ours.visual_projection(ours.vision_model(pixels)), ours.text_model(ids)
    assert rel(got_img, want_img) <= 1e-6 and rel(got_txt, want_txt) <= 1e-6
    assert torch.equal(ours.logit_scale, theirs.logit_scale)


def test_a_vision_tower_built_alone_holds_no_uninitialised_memory():
    """Its class embedding was ``torch.empty``: a ``VisionTransformer`` built outside
    ``ClipTowers`` (the encoder benchmark's) answered NaN for ViT-B/16."""
    from eslmatch.model.esl_clip.config import ClipArchitecture
    from eslmatch.model.esl_clip.towers import VisionTransformer

    arch = ClipArchitecture(image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=2)
    for _ in range(3):
        tower = VisionTransformer(arch).eval()
        assert torch.equal(tower.embeddings.class_embedding, torch.zeros(64))
        with torch.inference_mode():
            assert torch.isfinite(tower(torch.randn(2, 3, 32, 32))).all()
