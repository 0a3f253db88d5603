"""PlainBert and SavedBertTokenizer equal transformers' BertModel and BERT tokenizer.

A saved BERT-based model loads its text side without transformers (eslmatch.model.bert,
eslmatch.text.SavedBertTokenizer); these tests hold that nothing changes by it: the same
state-dict names, the same values (float32 and bf16 autocast, eval and training mode with
dropout), the same token ids, and transformers for what PlainBert does not build.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _models import randomize, tiny_bert_config, tiny_bert_tokenizer
from eslmatch.config import ESLConfig
from eslmatch.model.bert import BertSettings, PlainBert, supports
from eslmatch.model.encoders import bert_from_config, text_backbone_for_loading
from eslmatch.model.esl import ESLModel
from eslmatch.text import SavedBertTokenizer, load_tokenizer, minilm_path, tokenize

AWKWARD = [
    "A red circle LEFT of a blue square.",
    "Café naïve résumé ÅNGSTRÖM İstanbul ß",
    "北京 is 大 and ｆｕｌｌｗｉｄｔｈ",
    "emoji 😀 here, tabs\t\tand\nnew lines  ",
    "don't stop -- it's 3.14 m/s!",
    "\u0000control\u200bzero\u00a0width",
    "[CLS] [MASK] [SEP] [PAD] [UNK] inside",
    "x" * 700,
    " ".join(["word"] * 700),
]


def pair(hidden: int = 48, layers: int = 3, act: str = "gelu", seed: int = 0):
    """transformers' BertModel with random weights and a PlainBert holding the same ones."""
    config = tiny_bert_config(vocab_size=80, hidden=hidden)
    config.num_hidden_layers, config.hidden_act, config.intermediate_size = layers, act, 64
    torch.manual_seed(seed)
    reference = bert_from_config(config)
    randomize(reference)
    plain = PlainBert(BertSettings(config.to_dict()))
    plain.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), plain.eval()


def ragged_ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 80, (5, 9), generator=g)
    for row, n in enumerate([9, 7, 3, 1, 5]):
        ids[row, n:] = 0
    return ids


def test_same_state_dict_names_and_shapes():
    reference, plain = pair()
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()
    }


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("padded", [True, False])
def test_same_values_fp32(act, padded):
    reference, plain = pair(act=act)
    ids = ragged_ids() if padded else ragged_ids().clamp(min=5)
    mask = (ids != 0).long()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask)[0]
        got = plain(ids, mask)[0]
    real = mask.bool()
    assert torch.equal(got[real], want[real])


def test_same_values_bf16_autocast():
    reference, plain = pair()
    for ids in (ragged_ids(), ragged_ids()[:1, :4].clamp(min=5)):  # padded batch, one short query
        mask = (ids != 0).long()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            want = reference(input_ids=ids, attention_mask=mask)[0]
            got = plain(ids, mask)[0]
        assert got.dtype == want.dtype
        assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_same_values_in_training_mode_with_dropout():
    reference, plain = pair()
    reference.train(), plain.train()
    ids = ragged_ids()
    mask = (ids != 0).long()
    torch.manual_seed(7)
    want = reference(input_ids=ids, attention_mask=mask)[0]
    torch.manual_seed(7)
    got = plain(ids, mask)[0]
    assert torch.equal(got[mask.bool()], want[mask.bool()])
    got[mask.bool()].sum().backward()
    assert all(p.grad is not None for p in plain.parameters() if p.requires_grad and p.dim() > 1)


def test_real_minilm_weights():
    from transformers import AutoModel

    folder = minilm_path()
    reference = AutoModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager").eval()
    plain = text_backbone_for_loading(Path(folder))
    assert isinstance(plain, PlainBert)
    plain.load_state_dict(reference.state_dict(), strict=True)
    plain.eval()
    tok = load_tokenizer("minilm", required=True)
    ids, lens = tokenize(tok, AWKWARD[:5])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask)[0]
        got = plain(ids, mask)[0]
    assert (got - want)[mask.bool()].abs().max() <= 1e-6


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "roberta"},
        {"position_embedding_type": "relative_key"},
        {"hidden_act": "gelu_new"},
        {"is_decoder": True},
        {"hidden_size": "big"},
    ],
)
def test_other_architectures_are_left_to_transformers(change, tmp_path):
    config = tiny_bert_config().to_dict()
    assert supports(config)
    config.update(change)
    assert not supports(config)
    if change.get("hidden_size") == "big":
        return
    if change.get("model_type") == "roberta":
        config.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not isinstance(text_backbone_for_loading(tmp_path), PlainBert)


def bert_esl(tmp_path, train_layers=None):
    tok = tiny_bert_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    backbone = bert_from_config(tiny_bert_config(vocab_size=len(tok)))
    config = ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None, text_train_layers=train_layers)
    model = ESLModel(config, backbone, tok)
    randomize(model)
    return model.eval()


@pytest.mark.parametrize("train_layers", [None, 0])
def test_a_saved_model_loads_plain_bert_with_the_same_scores(tmp_path, train_layers):
    model = bert_esl(tmp_path, train_layers)
    model.save_pretrained(tmp_path / "m")
    again = ESLModel.from_pretrained(tmp_path / "m").eval()
    assert isinstance(again.text_encoder.backbone, PlainBert)
    assert isinstance(again.tokenizer, SavedBertTokenizer)
    ids, lens = again.tokenize(["a red circle", "the big blue square and a small green circle left of it"])
    assert torch.equal(
        ids, model.tokenize(["a red circle", "the big blue square and a small green circle left of it"])[0]
    )
    images = torch.rand(2, 4, 16)
    with torch.no_grad():
        assert torch.equal(model.similarity(images, None, ids, lens), again.similarity(images, None, ids, lens))
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(model.similarity(images, None, ids, lens), again.similarity(images, None, ids, lens))
    # written back, the folder is the same model to both loaders
    again.save_pretrained(tmp_path / "m2")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "m2" / "text_encoder")).hidden_size == 24
    third = ESLModel.from_pretrained(tmp_path / "m2").eval()
    with torch.no_grad():
        assert torch.equal(third.similarity(images, None, ids, lens), model.similarity(images, None, ids, lens))


def test_top_layers_only_training_path(tmp_path):
    """With ``text_train_layers`` the frozen lower layers are cached and the top ones run with
    PlainBert's own mask: equal to the transformers model built in memory."""
    config = tiny_bert_config(vocab_size=len(tiny_bert_tokenizer(tmp_path / "tok")))
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = ESLModel(
        ESLConfig(embed_size=32, num_levels=3, img_dim=16, text_model=None, text_train_layers=1),
        bert_from_config(config),
        tiny_bert_tokenizer(tmp_path / "tok"),
    )
    randomize(model)
    model.eval().save_pretrained(tmp_path / "m")
    again = ESLModel.from_pretrained(tmp_path / "m").eval()
    assert again.text_encoder.split == 2
    texts = ["a red circle", "the big blue square and a small green circle", "a"]
    ids, lens = model.tokenize(texts)
    with torch.no_grad():
        assert torch.equal(model.encode_captions(ids, lens), again.encode_captions(ids, lens))


@pytest.mark.parametrize("folder", ["minilm", "tiny"])
def test_tokenizer_ids_equal_transformers(folder, tmp_path):
    from transformers import AutoTokenizer

    if folder == "minilm":
        path = minilm_path()
    else:
        tiny_bert_tokenizer(tmp_path / "t").save_pretrained(str(tmp_path / "saved"))
        path = str(tmp_path / "saved")
    fast = load_tokenizer(path, required=True)
    assert isinstance(fast, SavedBertTokenizer)
    reference = AutoTokenizer.from_pretrained(path)
    for max_length in (512, 8):
        want = [reference(t, truncation=True, max_length=max_length)["input_ids"] for t in AWKWARD]
        assert fast.encode_ids(AWKWARD, max_length) == want
    ids = want[0]
    assert fast.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_tokenizer_hands_the_rest_to_transformers(tmp_path):
    fast = load_tokenizer("minilm", required=True)
    assert isinstance(fast, SavedBertTokenizer)
    assert (
        fast("a red circle", add_special_tokens=False)["input_ids"] == fast.encode_ids(["a red circle"], 512)[0][1:-1]
    )
    assert fast.mask_token_id == 103 and fast.is_fast
    fast.save_pretrained(str(tmp_path / "out"))
    assert isinstance(load_tokenizer(tmp_path / "out", required=True), SavedBertTokenizer)
    clone = copy.deepcopy(fast)
    assert clone.encode_ids(["a cat"], 512) == fast.encode_ids(["a cat"], 512)
    with pytest.raises(AttributeError):
        _ = fast._not_there


def test_a_tokenizer_config_that_disagrees_goes_to_transformers(tmp_path):
    fast = load_tokenizer("minilm", required=True)
    fast.save_pretrained(str(tmp_path / "t"))
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    cfg["do_lower_case"] = False  # transformers rebuilds the normaliser from this; so must we
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert SavedBertTokenizer.open(tmp_path / "t") is None
    assert not isinstance(load_tokenizer(tmp_path / "t", required=True), SavedBertTokenizer)


def test_loading_and_encoding_a_saved_model_imports_no_transformers(tmp_path):
    bert_esl(tmp_path).save_pretrained(tmp_path / "m")
    code = (
        "import sys, torch; from eslmatch.factory import load_model; "
        f"m = load_model({str(tmp_path / 'm')!r}); ids, lens = m.tokenize(['a red circle']); "
        "m.encode_captions(ids, lens); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
