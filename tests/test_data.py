"""The data layer: precomp splits, checks, augmentation, collation and bucketed encoding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from _datagen import make_precomp
from _models import tiny_gru_model
from eslmatch.data import (
    CaptionDataset,
    build_vocab,
    choose_word_actions,
    collate,
    drop_regions,
    encode_split,
    length_batches,
    open_split,
    word_pieces,
)
from eslmatch.data.augment import augment_caption
from eslmatch.errors import EslmatchError
from eslmatch.text import UNK, WordVocab

BERT_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "red",
    "blue",
    "circle",
    "square",
    "the",
    "big",
    "##s",
    "##gest",
    "left",
    "of",
    ".",
    "and",
]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(str(d))
    assert tok.tokenize("circles") == ["circle", "##s"]  # the vocabulary really is in use
    return tok


# ---------------------------------------------------------------------- opening splits
@pytest.mark.parametrize("layout", ["per5", "repeated"])
def test_layouts_give_one_row_per_image(tmp_path, layout):
    folder = make_precomp(tmp_path, splits=["test"], n_images=7, layout=layout, ids=True, image_paths=True)
    rows = np.load(folder / "test_ims.npy")
    split = open_split(tmp_path, "test")
    assert split.n_images == 7 and split.n_captions == 35 and split.captions_per_image == 5
    assert split.layout == ("repeated" if layout == "repeated" else "per-image")
    expected = rows[::5] if layout == "repeated" else rows
    np.testing.assert_array_equal(np.asarray(split.images), expected)
    assert split.captions == (folder / "test_caps.txt").read_text().splitlines()
    assert [split.image_of_caption(c) for c in (0, 4, 5, 34)] == [0, 0, 1, 6]
    assert split.ids == [str(1000 + i) for i in range(7)]
    assert split.image_paths[3] == "images/test/00003.jpg"
    assert split.root == folder and split.name == "test"


@pytest.mark.parametrize("layout", ["per5", "repeated"])
def test_images_are_memory_mapped_views(tmp_path, layout):
    folder = make_precomp(tmp_path, splits=["train"], n_images=6, layout=layout)
    split = open_split(folder, "train")
    assert isinstance(split.images, np.memmap)
    assert not split.images.flags.owndata  # a view of the map, never a loaded copy
    assert str(split.images.filename) == str((folder / "train_ims.npy").resolve())
    assert isinstance(split.head(2).images, np.memmap)
    # pickling (DataLoader workers) does not carry the array; the copy re-opens the file
    blob = pickle.dumps(split)
    assert len(blob) < split.images.nbytes
    again = pickle.loads(blob)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(split.images))


def test_float16_features_are_read_as_float32(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=3, dtype="float16")
    split = open_split(tmp_path, "test")
    assert split.images.dtype == np.float16
    assert split.read_images(slice(0, 2)).dtype == np.float32


@pytest.mark.parametrize("folder", ["f30k_precomp", "coco_precomp", "f30k/precomp", "coco/precomp"])
def test_folder_spellings(tmp_path, folder):
    make_precomp(tmp_path, splits=["dev"], n_images=2, folder=folder)
    assert open_split(tmp_path, "dev").root == tmp_path / folder
    assert open_split(tmp_path / folder, "dev").root == tmp_path / folder


def test_several_datasets_need_a_name(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=2, folder="f30k_precomp")
    make_precomp(tmp_path, splits=["test"], n_images=3, folder="coco_precomp")
    with pytest.raises(EslmatchError, match="several datasets.*data_name"):
        open_split(tmp_path, "test")
    assert open_split(tmp_path, "test", data_name="coco_precomp").n_images == 3
    assert open_split(tmp_path, "test", data_name="f30k").n_images == 2


def test_general_captions_per_image(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=4, folder=None)
    np.save(tmp_path / "test_ims.npy", np.load(tmp_path / "test_ims.npy")[:2].repeat(2, 0)[:4])
    # 4 rows, 20 captions: 5 per image
    assert open_split(tmp_path, "test").captions_per_image == 5
    lines = (tmp_path / "test_caps.txt").read_text().splitlines()
    (tmp_path / "test_caps.txt").write_text("\n".join(lines[:8]) + "\n")
    split = open_split(tmp_path, "test")
    assert (split.captions_per_image, split.n_images, split.layout) == (2, 4, "per-image")
    (tmp_path / "test_caps.txt").write_text("\n".join(lines[:4]) + "\n")
    # rows == captions but not a multiple of 5: one caption per image
    split = open_split(tmp_path, "test")
    assert (split.captions_per_image, split.n_images) == (1, 4)


def test_head_takes_first_images_and_their_captions(tmp_path):
    make_precomp(tmp_path, splits=["dev"], n_images=6, layout="repeated")
    split = open_split(tmp_path, "dev")
    sub = split.head(2)
    assert sub.n_images == 2 and sub.captions == split.captions[:10]
    np.testing.assert_array_equal(np.asarray(sub.images), np.asarray(split.images[:2]))


# ---------------------------------------------------------------------- bad data
def _break(folder, case):
    ims, caps = folder / "test_ims.npy", folder / "test_caps.txt"
    if case == "missing images":
        ims.unlink()
        return "test_ims.npy", "test_ims.npy and test_caps.txt"
    if case == "missing captions":
        caps.unlink()
        return "test_caps.txt", "test_ims.npy and test_caps.txt"
    if case == "truncated npy":
        ims.write_bytes(ims.read_bytes()[:-50])
        return "test_ims.npy", "truncated or corrupt"
    if case == "corrupt npy":
        ims.write_bytes(b"not an array at all" * 10)
        return "test_ims.npy", "truncated or corrupt"
    if case == "rank 2":
        np.save(ims, np.zeros((4, 16), np.float32))
        return "test_ims.npy", "3-D"
    if case == "integer dtype":
        np.save(ims, np.zeros((4, 6, 16), np.int32))
        return "test_ims.npy", "floating point"
    if case == "wrong width":
        np.save(ims, np.zeros((4, 6, 15), np.float32))
        return "test_ims.npy", "width 15.*expects 16"
    if case == "count mismatch":
        caps.write_text("\n".join(["a red circle"] * 19) + "\n")
        return "test_caps.txt", r"19 captions.*test_ims.npy has 4 image rows"
    if case == "empty caption":
        lines = caps.read_text().splitlines()
        lines[6] = "   "
        caps.write_text("\n".join(lines) + "\n")
        return "test_caps.txt", "line 7 is empty"
    if case == "not utf-8":
        lines = caps.read_bytes().splitlines()
        lines[2] = b"a caf\xe9 circle"
        caps.write_bytes(b"\n".join(lines) + b"\n")
        return "test_caps.txt", "line 3 is not valid UTF-8"
    if case == "nan first row":
        a = np.load(ims)
        a[0, 2, 3] = np.nan
        np.save(ims, a)
        return "test_ims.npy", "image 0 .*non-finite"
    if case == "inf last row":
        a = np.load(ims)
        a[-1, 0, 0] = np.inf
        np.save(ims, a)
        return "test_ims.npy", "image 3 .*non-finite"
    raise AssertionError(case)


BAD_CASES = [
    "missing images",
    "missing captions",
    "truncated npy",
    "corrupt npy",
    "rank 2",
    "integer dtype",
    "wrong width",
    "count mismatch",
    "empty caption",
    "not utf-8",
    "nan first row",
    "inf last row",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_names_the_file(tmp_path, case):
    folder = make_precomp(tmp_path, splits=["test"], n_images=4, regions=6, dim=16)
    name, pattern = _break(folder, case)
    with pytest.raises(EslmatchError, match=pattern) as info:
        open_split(tmp_path, "test", img_dim=16)
    assert name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_folder_says_what_was_looked_for(tmp_path):
    with pytest.raises(EslmatchError, match="f30k_precomp, coco_precomp"):
        open_split(tmp_path, "test")
    with pytest.raises(EslmatchError, match="no such data folder"):
        open_split(tmp_path / "nope", "test")


def test_sampled_check_versus_full_scan(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=600, regions=1, dim=2, folder=None)
    a = np.load(tmp_path / "test_ims.npy")
    sampled = set(np.unique(np.linspace(0, 599, 256).round().astype(int)).tolist())
    hidden = next(i for i in range(1, 599) if i not in sampled)
    a[hidden, 0, 1] = np.nan
    np.save(tmp_path / "test_ims.npy", a)
    assert open_split(tmp_path, "test").n_images == 600  # the sample misses it
    with pytest.raises(EslmatchError, match=f"image {hidden} "):
        open_split(tmp_path, "test", full_check=True)
    a[sorted(sampled)[100], 0, 0] = np.inf  # a sampled row is caught by default
    np.save(tmp_path / "test_ims.npy", a)
    with pytest.raises(EslmatchError, match=f"image {sorted(sampled)[100]} "):
        open_split(tmp_path, "test")


# ---------------------------------------------------------------------- augmentation
def test_region_dropping():
    image = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    for i in range(30):
        out = drop_regions(image, 0.2, np.random.default_rng([0, 0, i]))
        assert 1 <= len(out) <= 20
        kept = out[:, 0].astype(int) // 3
        assert np.all(np.diff(kept) > 0)  # original rows, original order, at the front
        np.testing.assert_array_equal(out, image[kept])
    assert len(drop_regions(image, 1.0, np.random.default_rng(1))) == 1  # never empty
    assert len(drop_regions(image, 0.0, np.random.default_rng(1))) == 20
    sizes = [len(drop_regions(image, 0.2, np.random.default_rng([5, i]))) for i in range(500)]
    assert abs(np.mean(sizes) / 20 - 0.8) < 0.02


def test_word_action_proportions():
    actions = choose_word_actions(200_000, 0.2, np.random.default_rng(3))
    chosen = actions > 0
    assert abs(chosen.mean() - 0.2) < 0.005
    shares = [np.mean(actions[chosen] == a) for a in (1, 2, 3)]
    np.testing.assert_allclose(shares, [0.5, 0.1, 0.4], atol=0.01)
    for seed in range(50):  # every word chosen: one is still kept
        assert (choose_word_actions(3, 1.0, np.random.default_rng(seed)) != 3).any()


def test_bert_word_masking(bert_tokenizer):
    tok = bert_tokenizer
    text = "The biggest red circles left of a blue square."
    pieces = word_pieces(tok, text)
    assert pieces[1] == tok.convert_tokens_to_ids(["big", "##gest"])
    plain = augment_caption(tok, text, 0.0, np.random.default_rng(0))
    assert plain == tok(text)["input_ids"]
    special = set(tok.all_special_ids)
    seen = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        actions = choose_word_actions(len(pieces), 0.5, np.random.default_rng(seed))
        ids = augment_caption(tok, text, 0.5, rng)
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        kept = sum(len(p) for p, a in zip(pieces, actions) if a != 3)
        assert len(ids) == kept + 2
        masked = sum(len(p) for p, a in zip(pieces, actions) if a == 1)
        assert ids.count(tok.mask_token_id) == masked
        random_pos = [i + 1 for i, t in enumerate(_expand(pieces, actions)) if t == 2]
        assert all(ids[j] not in special for j in random_pos)
        seen.update(int(a) for a in actions)
    assert seen == {0, 1, 2, 3}
    for seed in range(30):  # everything chosen: never an empty caption
        assert len(augment_caption(tok, "circles", 1.0, np.random.default_rng(seed))) >= 3


def test_the_dataset_masks_from_word_pieces_made_once(bert_tokenizer):
    """A training item's caption ids are those of :func:`augment_caption` with the item's own
    generator, though the dataset tokenises every caption once, in one call (it took most
    of a batch's loading time each epoch)."""
    from eslmatch.data.augment import PieceTokens, augment_pieces, word_pieces_of

    tok = bert_tokenizer
    texts = ["The biggest red circles left of a blue square.", "a dog", "Two tiny stars, above!"]
    assert word_pieces_of(tok, texts) == [word_pieces(tok, t) for t in texts]
    tokens = PieceTokens.of(tok)
    assert tokens.wrap([7]) == tok("", add_special_tokens=True)["input_ids"][:1] + [7] + [tok.sep_token_id]
    for seed in range(40):
        for text, pieces in zip(texts, word_pieces_of(tok, texts)):
            want = augment_caption(tok, text, 0.5, np.random.default_rng(seed))
            assert augment_pieces(tokens, pieces, 0.5, np.random.default_rng(seed)) == want


def _expand(pieces, actions):
    return [a for p, a in zip(pieces, actions) if a != 3 for _ in p]


def test_gru_word_masking():
    vocab = WordVocab.build(["a red circle left of a blue square"])
    text = "a red circle left of a blue square"
    assert augment_caption(vocab, text, 0.0, np.random.default_rng(0)) == vocab.encode(text)
    for seed in range(100):
        actions = choose_word_actions(8, 0.6, np.random.default_rng(seed))
        ids = augment_caption(vocab, text, 0.6, np.random.default_rng(seed))
        body = ids[1:-1]
        assert ids[0] == vocab.index["<start>"] and ids[-1] == vocab.index["<end>"]
        assert len(body) == int((actions != 3).sum()) >= 1
        kept_actions = actions[actions != 3]
        assert all(t == vocab.index[UNK] for t, a in zip(body, kept_actions) if a == 1)
        assert all(4 <= t < len(vocab) for t, a in zip(body, kept_actions) if a == 2)


def test_dataset_determinism_and_epochs(tmp_path):
    make_precomp(tmp_path, splits=["train"], n_images=6, regions=10)
    split = open_split(tmp_path, "train")
    vocab = build_vocab(split)
    a = CaptionDataset(split, vocab, train=True, seed=7)
    b = CaptionDataset(split, vocab, train=True, seed=7)
    for i in (0, 13, 29):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["ids"], y["ids"])
        assert x["caption_index"] == i and x["image_index"] == i // 5
    items0 = [a[i] for i in range(30)]
    a.set_epoch(1)
    items1 = [a[i] for i in range(30)]
    differ = sum(
        not (torch.equal(p["image"], q["image"]) and torch.equal(p["ids"], q["ids"])) for p, q in zip(items0, items1)
    )
    assert differ >= 20
    assert all(1 <= it["image"].shape[0] <= 10 for it in items1)
    assert any(it["image"].shape[0] < 10 for it in items1)


def test_eval_dataset_and_collate(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=3, regions=4)
    split = open_split(tmp_path, "test")
    model = tiny_gru_model()
    ds = CaptionDataset(split, model.tokenizer, train=False)
    items = [ds[i] for i in (0, 7, 14)]
    ids, lens = model.tokenize([split.captions[i] for i in (0, 7, 14)])
    for j, it in enumerate(items):
        assert torch.equal(it["ids"], ids[j, : lens[j]])
        np.testing.assert_array_equal(it["image"].numpy(), np.asarray(split.images[it["image_index"]]))
    items[1]["image"] = items[1]["image"][:2]  # as after region dropping
    batch = collate(items)
    assert batch.images.shape == (3, 4, 16) and batch.image_lengths.tolist() == [4, 2, 4]
    assert bool((batch.images[1, 2:] == 0).all())
    assert batch.captions.shape == (3, int(lens.max()))
    assert batch.caption_lengths.tolist() == lens.tolist()
    assert batch.image_index.tolist() == [0, 1, 2] and batch.caption_index.tolist() == [0, 7, 14]
    assert batch.to("cpu").captions.dtype == torch.long


def test_build_vocab_covers_training_words(tmp_path):
    make_precomp(tmp_path, splits=["train"], n_images=8)
    split = open_split(tmp_path, "train")
    vocab = build_vocab(split)
    assert all(vocab.encode(c).count(vocab.index[UNK]) == 0 for c in split.captions)


def test_length_batches_cover_every_index_longest_first():
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_batches(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(7)) and all(len(b) <= 3 for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_encode_split_matches_direct_encoding(tmp_path):
    make_precomp(tmp_path, splits=["test"], n_images=4, layout="repeated")
    split = open_split(tmp_path, "test")
    model = tiny_gru_model()
    model.train()
    img, img_len, cap, cap_len = encode_split(model, split, batch_size=3, progress=False)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        ids, lens = model.tokenize(split.captions)
        ref_cap = model.embed_captions(ids, lens)
        ref_img = model.embed_images(torch.from_numpy(split.read_images(slice(None))))
    assert img.shape == ref_img.shape and cap.shape == ref_cap.shape
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-6)
    assert torch.equal(cap_len, lens) and img_len.tolist() == [6] * 4
    mask = torch.arange(cap.shape[1])[None, :] < lens[:, None]
    torch.testing.assert_close(cap[mask], ref_cap[mask], rtol=1e-5, atol=1e-6)
    assert bool((cap[~mask] == 0).all())


def test_word_pieces_without_a_fast_tokenizer(bert_tokenizer):
    class Slow:  # only the slow-tokenizer API: tokenize + convert_tokens_to_ids
        is_fast = False

        def tokenize(self, text):
            return bert_tokenizer.tokenize(text)

        def convert_tokens_to_ids(self, tokens):
            return bert_tokenizer.convert_tokens_to_ids(tokens)

    text = "the biggest red circles left of a blue square"
    assert word_pieces(Slow(), text) == word_pieces(bert_tokenizer, text)
