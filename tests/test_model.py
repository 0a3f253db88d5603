"""The model: reference vs batched scorer, masking, batch independence, gradients, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _models import randomize, tiny_bert_config, tiny_bert_tokenizer, tiny_gru_model
from eslmatch import ESLConfig, EslmatchError, ESLModel, InputError, VSEModel
from eslmatch.losses import LossSettings, MatchingLoss, triplet_loss
from eslmatch.model.base import placeholder_init
from eslmatch.model.encoders import bert_from_config, length_groups


def random_inputs(model, n_images, n_caps, regions, words, seed=0, pad_regions=True):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    images = torch.relu(torch.randn(n_images, regions, cfg.img_dim, generator=g))
    img_len = (
        torch.randint(1, regions + 1, (n_images,), generator=g) if pad_regions else torch.full((n_images,), regions)
    )
    img_len[0] = regions
    cap_len = torch.randint(1, words + 1, (n_caps,), generator=g)
    cap_len[0] = words
    vocab = cfg.vocab_size or 50
    caps = torch.zeros(n_caps, words, dtype=torch.long)
    for j, n in enumerate(cap_len.tolist()):
        caps[j, :n] = torch.randint(1, vocab, (n,), generator=g)
    return images, img_len, caps, cap_len


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


CONFIGS = [
    # strategy, E, k, L, regions, words
    ("adaptive", 32, 2, 3, 5, 6),
    ("heuristic", 32, 2, 3, 5, 6),
    ("adaptive", 64, 2, 6, 7, 9),
    ("heuristic", 64, 2, 6, 3, 12),
    ("adaptive", 27, 3, 3, 4, 5),
    ("heuristic", 27, 3, 3, 6, 4),
    ("adaptive", 64, 4, 3, 8, 7),
    ("heuristic", 64, 4, 3, 2, 3),
    ("adaptive", 16, 2, 4, 1, 1),
    ("heuristic", 16, 2, 4, 1, 8),
    ("adaptive", 16, 2, 0, 5, 5),
    ("heuristic", 16, 2, 0, 6, 2),
    ("adaptive", 128, 2, 7, 9, 11),
    ("heuristic", 128, 2, 7, 10, 6),
    ("adaptive", 48, 2, 4, 12, 3),
    ("heuristic", 48, 2, 4, 3, 13),
    ("adaptive", 32, 2, 5, 2, 2),
    ("heuristic", 32, 2, 5, 4, 9),
    ("adaptive", 8, 2, 3, 6, 6),
    ("heuristic", 8, 2, 3, 7, 7),
    ("adaptive", 81, 3, 4, 5, 5),
    ("heuristic", 81, 3, 4, 5, 10),
]


@pytest.mark.parametrize("i,cfg", list(enumerate(CONFIGS)))
def test_reference_equals_batched(i, cfg):
    strategy, e, k, levels, regions, words = cfg
    model = tiny_gru_model(strategy, embed_size=e, kernel_size=k, num_levels=levels, seed=i).eval()
    images, img_len, caps, cap_len = random_inputs(model, 4, 6, regions, words, seed=i)
    with torch.no_grad():
        batched = model.similarity(images, img_len, caps, cap_len)
    ref = model.reference_similarity(images, img_len, caps, cap_len)
    assert batched.shape == (4, 6)
    assert rel_err(batched, ref) <= 1e-5


@pytest.mark.parametrize("strategy", ["adaptive", "heuristic"])
def test_padding_invariance(strategy):
    model = tiny_gru_model(strategy).eval()
    images, img_len, caps, cap_len = random_inputs(model, 3, 5, 6, 7, seed=3)
    with torch.no_grad():
        base = model.similarity(images, img_len, caps, cap_len)
        # extra padded regions holding garbage and extra padded word columns
        garbage = 5 * torch.rand(3, 4, images.shape[2])
        more_images = torch.cat([images, garbage], 1)
        for i, n in enumerate(img_len.tolist()):
            more_images[i, n:] = 7 * torch.rand(more_images.shape[1] - n, images.shape[2])
        more_caps = torch.cat([caps, torch.zeros(5, 6, dtype=torch.long)], 1)
        padded = model.similarity(more_images, img_len, more_caps, cap_len)
    assert rel_err(padded, base) <= 1e-6


@pytest.mark.parametrize("strategy", ["adaptive", "heuristic"])
def test_batch_independence(strategy):
    model = tiny_gru_model(strategy).eval()
    images, img_len, caps, cap_len = random_inputs(model, 5, 7, 6, 8, seed=4)
    with torch.no_grad():
        full = model.similarity(images, img_len, caps, cap_len)
        perm_i, perm_c = torch.randperm(5), torch.randperm(7)
        shuffled = model.similarity(images[perm_i], img_len[perm_i], caps[perm_c], cap_len[perm_c])
        single = model.similarity(images[2:3], img_len[2:3], caps[4:5], cap_len[4:5])
    assert rel_err(shuffled, full[perm_i][:, perm_c]) <= 1e-6
    assert abs(float(single[0, 0] - full[2, 4])) <= 1e-6 * float(full.abs().max())


def test_train_mode_batchnorm_ignores_padded_regions():
    model = tiny_gru_model("adaptive").train()
    images, img_len, _, _ = random_inputs(model, 3, 1, 6, 2, seed=5)
    emb = model.encode_images(images, img_len)
    padded = torch.cat([images, 9 * torch.rand(3, 3, images.shape[2])], 1)
    emb2 = model.encode_images(padded, img_len)
    mask = torch.arange(6)[None, :] < img_len[:, None]
    assert torch.allclose(emb[mask], emb2[:, :6][mask], atol=1e-6)


def _assert_all_grads(model, loss):
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert not missing, f"no gradient reached: {missing}"


@pytest.mark.parametrize("strategy", ["adaptive", "heuristic"])
def test_gradients_reach_every_parameter_gru(strategy):
    model = tiny_gru_model(strategy).train()
    images, img_len, caps, cap_len = random_inputs(model, 4, 4, 6, 7, seed=6)
    scores = model.similarity(images, img_len, caps, cap_len)
    loss = (0.2 + scores - scores.diag()[:, None]).clamp(min=0).sum()
    _assert_all_grads(model, loss + scores.sum())


def test_gradients_reach_every_parameter_bert(tmp_path):
    from transformers import BertModel

    cfg = tiny_bert_config(vocab_size=40)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    backbone = BertModel(cfg, add_pooling_layer=False)
    model = ESLModel(
        ESLConfig(strategy="heuristic", embed_size=32, num_levels=3, img_dim=16, text_model=None), backbone
    )
    randomize(model)
    model.train()
    images, img_len, caps, cap_len = random_inputs(model, 3, 3, 5, 6, seed=7)
    caps = caps.clamp(max=39)
    scores = model.similarity(images, img_len, caps, cap_len)
    _assert_all_grads(model, scores.sum() + (scores**2).sum())


def test_save_and_load_gru_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_gru_model("heuristic").eval()
    images, img_len, caps, cap_len = random_inputs(model, 3, 4, 5, 6, seed=8)
    model.save_pretrained(tmp_path / "m")
    again = ESLModel.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(
            model.similarity(images, img_len, caps, cap_len), again.similarity(images, img_len, caps, cap_len)
        )
    assert again.tokenizer.tokens == model.tokenizer.tokens
    ids, lens = again.tokenize(["a red circle left of a blue square"])
    assert ids.shape == (1, 10) and int(lens[0]) == 10


def test_save_and_load_bert_with_tokenizer_offline(tmp_path, monkeypatch):

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = tiny_bert_tokenizer(tmp_path / "tok")
    backbone = bert_from_config(tiny_bert_config(vocab_size=len(tok)))
    model = ESLModel(ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None), backbone, tok)
    randomize(model)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    again = ESLModel.from_pretrained(tmp_path / "m")
    ids, lens = again.tokenize(["a red circle", "the big blue square and a small green circle"])
    assert ids[0, 0] == tok.cls_token_id and int(lens[1]) == 11
    images = torch.rand(2, 4, 16)
    with torch.no_grad():
        assert torch.equal(model.similarity(images, None, ids, lens), again.similarity(images, None, ids, lens))


def test_save_is_atomic_and_replaces(tmp_path):
    model = tiny_gru_model()
    target = tmp_path / "m"
    model.save_pretrained(target)
    model.save_pretrained(target)  # replacing an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_input_errors():
    model = tiny_gru_model().eval()
    images, img_len, caps, cap_len = random_inputs(model, 2, 2, 4, 5, seed=9)
    with pytest.raises(InputError, match="dimension 15"):
        model.similarity(images[..., :15], img_len, caps, cap_len)
    with pytest.raises(InputError, match="beyond the tensor"):
        model.similarity(images, torch.tensor([4, 9]), caps, cap_len)
    with pytest.raises(InputError, match="beyond the tensor"):
        model.similarity(images, img_len, caps, torch.tensor([5, 6]))
    with pytest.raises(InputError, match="all-padding|empty"):
        model.similarity(images, img_len, caps, torch.tensor([5, 0]))
    empty = caps.clone()
    empty[1] = 0
    with pytest.raises(InputError, match="empty"):
        model.similarity(images, img_len, empty, cap_len)
    with pytest.raises(InputError, match="captions must"):
        model.similarity(images, img_len, caps.float(), cap_len)
    with pytest.raises(InputError, match="empty"):
        model.tokenize(["a red circle", "   "])


def test_config_validation():
    with pytest.raises(EslmatchError, match="divisible"):
        ESLConfig(embed_size=48, kernel_size=2, num_levels=5)
    with pytest.raises(EslmatchError, match="strategy"):
        ESLConfig(strategy="magic")
    with pytest.raises(EslmatchError, match="unknown model configuration key"):
        ESLConfig.from_dict({"embed_size": 32, "nonsense": 1})
    assert ESLConfig().level_dims == [512, 256, 128, 64, 32, 16, 8, 4, 2]
    assert ESLConfig().total_dim == 1022


@pytest.mark.parametrize("strategy", ["adaptive", "heuristic"])
def test_global_vectors_give_the_exact_mean_affinity(strategy):
    model = tiny_gru_model(strategy).eval()
    images, img_len, caps, cap_len = random_inputs(model, 3, 4, 6, 7, seed=11)
    with torch.no_grad():
        img, cap = model.embed_images(images, img_len), model.embed_captions(caps, cap_len)
        fast = model.index_vectors_images(img, img_len) @ model.index_vectors_captions(cap, cap_len).t()
        for i in range(3):
            for j in range(4):
                a = model.pair_affinity(cap[j, : cap_len[j]], img[i, : img_len[i]])
                assert abs(float(a.mean() - fast[i, j])) <= 1e-5 * float(a.abs().max())


def test_frozen_bert_backbone_is_cached_and_equal():
    cfg = tiny_bert_config(vocab_size=40)
    config = ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None)
    live = ESLModel(config, bert_from_config(cfg))
    randomize(live)
    frozen = ESLModel(config.replace(freeze_text_backbone=True), bert_from_config(cfg))
    frozen.load_state_dict(live.state_dict())
    live.eval()
    frozen.train()
    _, _, caps, cap_len = random_inputs(live, 1, 5, 4, 6, seed=12)
    caps = caps.clamp(max=39)
    a = live.encode_captions(caps, cap_len)
    b = frozen.encode_captions(caps, cap_len)
    mask = torch.arange(6)[None, :] < cap_len[:, None]
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    assert len(frozen.text_encoder._caches["fp32"]) == len({tuple(r[:n].tolist()) for r, n in zip(caps, cap_len)})
    b[mask].sum().backward()
    assert all(p.grad is None for p in frozen.text_encoder.backbone.parameters())
    assert frozen.text_encoder.proj.weight.grad is not None
    assert not frozen.text_encoder.backbone.training


def _whole_and_top_layers(train_layers: int):
    """A 3-layer BERT ESL model and a copy training only its top ``train_layers`` layers (eval mode)."""
    cfg = tiny_bert_config(vocab_size=40)
    cfg.num_hidden_layers = 3
    config = ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None)
    live = ESLModel(config, bert_from_config(cfg))
    randomize(live)
    part = ESLModel(config.replace(text_train_layers=train_layers), bert_from_config(cfg))
    part.load_state_dict(live.state_dict())
    return cfg, config, live.eval(), part.eval()


def test_top_layers_train_on_cached_lower_layers():
    cfg, config, live, part = _whole_and_top_layers(1)
    _, _, caps, cap_len = random_inputs(live, 1, 5, 4, 6, seed=13)
    caps = caps.clamp(max=39)
    mask = torch.arange(6)[None, :] < cap_len[:, None]
    a = live.encode_captions(caps, cap_len)
    b = part.encode_captions(caps, cap_len)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)  # the split forward is the same function
    enc = part.text_encoder
    assert len(enc._caches["fp32"]) == len({tuple(r[:n].tolist()) for r, n in zip(caps, cap_len)})
    part.train()
    assert not enc.backbone.embeddings.training and not enc.backbone.encoder.layer[1].training
    assert enc.backbone.encoder.layer[2].training
    part.encode_captions(caps, cap_len)[mask].sum().backward()
    named = dict(enc.backbone.named_parameters())
    top = [n for n in named if n.startswith("encoder.layer.2.")]
    assert top and all(named[n].grad is not None for n in top)
    assert all(p.grad is None for n, p in named.items() if n not in top)
    with pytest.raises(EslmatchError, match="text_train_layers must be >= 0"):
        ESLModel(config.replace(text_train_layers=-1), bert_from_config(cfg))
    # 0 is frozen, k >= the depth trains everything
    assert ESLModel(config.replace(text_train_layers=0), bert_from_config(cfg)).text_encoder.frozen
    whole = ESLModel(config.replace(text_train_layers=5), bert_from_config(cfg)).text_encoder
    assert whole.split == 0 and all(p.requires_grad for p in whole.backbone.parameters())


def test_top_layers_run_in_length_groups_as_one_padded_batch():
    _, _, live, part = _whole_and_top_layers(2)
    gen = torch.Generator().manual_seed(3)
    cap_len = torch.randint(2, 13, (50,), generator=gen)
    caps = torch.randint(1, 40, (50, 12), generator=gen) * (torch.arange(12)[None, :] < cap_len[:, None])
    groups = length_groups(cap_len, 16)
    assert len(groups) == 3 and sorted(torch.cat(groups).tolist()) == list(range(50))
    assert all(cap_len[a].max() <= cap_len[b].min() for a, b in zip(groups, groups[1:]))
    mask = torch.arange(12)[None, :] < cap_len[:, None]
    a = live.encode_captions(caps, cap_len)
    b = part.encode_captions(caps, cap_len)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)
    part.train()
    part.encode_captions(caps, cap_len)[mask].sum().backward()
    assert part.text_encoder.backbone.encoder.layer[1].attention.self.query.weight.grad is not None
    assert part.text_encoder.backbone.encoder.layer[0].attention.self.query.weight.grad is None


def test_frozen_cache_is_shared_by_content_and_rekeyed_on_load():
    cfg = tiny_bert_config(vocab_size=40)
    config = ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None, freeze_text_backbone=True)
    a = ESLModel(config, bert_from_config(cfg))
    b = ESLModel(config, bert_from_config(cfg))  # other random weights: another cache
    assert a.text_encoder._caches == {}  # keyed on first use only (a search never pays for it)
    cache_a = a.text_encoder._cache_now("fp32")
    assert cache_a is not b.text_encoder._cache_now("fp32")
    b.load_state_dict(a.state_dict())  # same weights now: the same cache
    assert b.text_encoder._caches == {} and b.text_encoder._cache_now("fp32") is cache_a


def test_vse_baseline_honours_the_frozen_text_backbone():
    cfg = tiny_bert_config(vocab_size=40)
    config = ESLConfig(
        model_type="vse", embed_size=32, num_levels=3, img_dim=16, text_model=None, freeze_text_backbone=True
    )
    model = VSEModel(config, bert_from_config(cfg))
    assert model.text_encoder.frozen
    assert not any(p.requires_grad for p in model.text_encoder.backbone.parameters())


def test_auxiliary_first_stage_loss_trains_the_index_vectors():
    """global_loss_weight > 0 adds the hinge on the index vectors' inner products (the exact
    mean affinity), differentiable down to the encoders; a VSE model refuses it."""
    model = tiny_gru_model("adaptive")
    images, img_len, caps, cap_len = random_inputs(model, 3, 3, 5, 6, seed=13)
    loss = MatchingLoss(model, LossSettings(margin=0.2, global_loss_weight=0.5))
    terms = loss(images, img_len, caps, cap_len)
    assert set(terms) == {"loss", "match", "global"}
    with torch.no_grad():
        img, cap = model.embed_images(images, img_len), model.embed_captions(caps, cap_len)
        g = model.index_vectors_images(img, img_len) @ model.index_vectors_captions(cap, cap_len).t()
        s = model.score(img, img_len, cap, cap_len)
    assert float(terms["global"].detach()) == pytest.approx(float(triplet_loss(g)), rel=1e-5)
    assert float(terms["match"].detach()) == pytest.approx(float(triplet_loss(s)), rel=1e-5)
    assert float(terms["loss"].detach()) == pytest.approx(
        float(terms["match"].detach()) + 0.5 * float(terms["global"].detach()), rel=1e-6
    )
    terms["global"].backward()
    assert model.correspondence.S[0].grad is not None and model.image_encoder.fc.weight.grad is not None
    vse = VSEModel(model.config.replace(model_type="vse"), tokenizer=model.tokenizer)
    with pytest.raises(EslmatchError, match="index vectors are its score"):
        MatchingLoss(vse, LossSettings(global_loss_weight=0.5))


def test_placeholder_init_draws_nothing_and_puts_torch_back():
    """A model built to receive saved weights skips the random initialisation (no random
    numbers drawn), and ``torch.nn.init`` works again after the block, errors included."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with placeholder_init():
        nn.Linear(64, 64), nn.Embedding(10, 8), nn.GRU(4, 4)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(RuntimeError, match="boom"), placeholder_init():
        raise RuntimeError("boom")
    torch.manual_seed(0)
    nn.Linear(64, 64)
    assert not torch.equal(torch.rand(3), expected)


def test_a_loaded_model_equals_the_saved_one_bit_for_bit(tmp_path):
    model = tiny_gru_model(seed=4)
    loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / "m"))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
