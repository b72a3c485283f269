"""CLIP's text tower as a token set (REFERENCE §12): a tiny CLIP checkpoint and byte-level BPE
tokenizer written offline, read back the way ``openai/clip-vit-base-patch32`` is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    EOT,
    SOT,
    TINY_GRID_DEMO,
    VIT_DEMO,
    OneCaptionSplit,
    clip_vocab,
    compose_cfg,
    run,
    save_tiny_clip,
)
from hydra.utils import instantiate
from omegaconf import open_dict

from gpo_lit.data.datasets import Augment, PairDataset
from gpo_lit.data.tokenize import HFTokenizer
from gpo_lit.encoders import HFTextEncoder
from gpo_lit.errors import GpoLitError


def test_tokenizer_limits_word_ids_and_mask_token(clip_dir: Path) -> None:
    vocab = clip_vocab()
    tok = HFTokenizer(str(clip_dir), max_length=None, mask_token="M")
    assert tok.max_length == 12  # the tokenizer's own model_max_length (77 for CLIP)
    assert tok.mask_id == vocab["M"] == 44  # as in CLIP's real vocabulary (PCME++'s mask)
    assert tok.pad_id == vocab[EOT] and tok.vocab_size == len(vocab)
    ids, word_ids = tok.encode("A dog's cat, 2 dogs!")
    pieces = [
        SOT,
        "a</w>",
        "dog</w>",
        "'",
        "s</w>",
        "cat</w>",
        ",</w>",
        "2</w>",
        "do",
        "g",
        "s</w>",
    ]
    assert ids == [vocab[p] for p in [*pieces, EOT]]  # 12 tokens: "!" is cut, <|endoftext|> kept
    # words from CLIP's pre-tokenizer: "'s" is a word of two pieces, "dogs" one of three
    assert word_ids == [None, 0, 1, 2, 2, 3, 4, 5, 6, 6, 6, None]
    with pytest.raises(GpoLitError, match=r"max_length: expected >= 3 and <= 12 .*found 13"):
        HFTokenizer(str(clip_dir), max_length=13, mask_token="M")
    with pytest.raises(GpoLitError, match="mask_token: expected a token .* found none") as e:
        HFTokenizer(str(clip_dir))  # CLIP has no mask token of its own
    assert "\n" not in str(e.value)
    with pytest.raises(GpoLitError, match="found 'zebra' \\(not in its vocabulary\\)"):
        HFTokenizer(str(clip_dir), mask_token="zebra")


def test_text_tower_is_every_token_after_the_final_norm_without_projection(clip_dir) -> None:
    from transformers import CLIPModel

    torch.manual_seed(0)
    enc = HFTextEncoder(str(clip_dir), embed_dim=8).eval()
    full = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    assert type(enc.bert).__name__ == "CLIPTextModel"  # the text tower alone
    assert not any("vision" in n or "projection" in n for n, _ in enc.named_parameters())
    mine = enc.bert.state_dict()
    theirs = full.text_model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert enc.linear.in_features == 32  # hidden size, not the projection's 24

    tok = HFTokenizer(str(clip_dir), max_length=None, mask_token="M")
    a, b = tok.encode("a dog"), tok.encode("a cat, a dog")
    ids = torch.full((2, len(b[0])), tok.pad_id)
    ids[0, : len(a[0])], ids[1] = torch.tensor(a[0]), torch.tensor(b[0])
    lengths = torch.tensor([len(a[0]), len(b[0])])
    with torch.no_grad():
        out, out_len = enc(ids, lengths)
        states = full.text_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        expected = enc.linear(full.text_model.final_layer_norm(states))
    assert out.shape == (2, len(b[0]), 8) and out_len.tolist() == lengths.tolist()
    # causal attention: a caption's tokens never see the padding after it, masked or not
    torch.testing.assert_close(out[1], expected[1])
    torch.testing.assert_close(out[0, : len(a[0])], expected[0, : len(a[0])])


def test_word_level_augmentation_and_per_token_option(clip_dir: Path) -> None:
    tok = HFTokenizer(str(clip_dir), max_length=None, mask_token="M")
    caption = "a dog's cat"  # words: a, dog, 's (two pieces), cat
    ids, word_ids = tok.encode(caption)
    split = OneCaptionSplit(caption)
    masked = Augment(region_keep_prob=None, word_prob=1.0, word_mask_prob=1.0, word_random_prob=0)
    item = PairDataset(split, tok, masked)[(0, 0)]
    assert item["cap"] == [ids[0], *[tok.mask_id] * (len(ids) - 2), ids[-1]]  # start / end kept

    # half the words masked: the two pieces of "'s" share one decision, unless per_token
    half = {
        "region_keep_prob": None,
        "word_prob": 0.5,
        "word_mask_prob": 1.0,
        "word_random_prob": 0,
    }
    pieces = [k for k, w in enumerate(word_ids) if w == 2]
    for per_token, split_decisions in ((False, 0), (True, 1)):
        data = PairDataset(split, tok, Augment(**half, per_token=per_token))
        caps = np.array([data[(0, epoch)]["cap"] for epoch in range(400)])
        differ = (caps[:, pieces[0]] == tok.mask_id) != (caps[:, pieces[1]] == tok.mask_id)
        assert (differ.mean() > 0.3) == bool(split_decisions), per_token  # 0.5 for independent


def test_clip_text_config_builds_the_model(clip_dir: Path) -> None:
    cfg = compose_cfg("train", "experiment=demo", "model/text=clip", "model.embed_dim=8",
                      f"model.text.encoder.name_or_path={clip_dir}")  # fmt: skip
    with open_dict(cfg):
        cfg.model.visual.in_dim = 6
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=None)
    assert (model.tokenizer.max_length, model.tokenizer.mask_id) == (12, 44)
    ids, _ = model.tokenizer.encode("a dog")
    emb = model.embed_captions(torch.tensor([ids]), torch.tensor([len(ids)]))
    assert emb.shape == (1, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


def demo_words() -> list[str]:
    """Every word the demo captions are made of (colours, shapes, sizes, positions, openers)."""
    from gpo_lit.data.demo import regions, vocab

    phrases = [
        *(
            w
            for table in (vocab.COLOURS, vocab.SHAPES, vocab.SIZES)
            for ws in table.values()
            for w in ws
        ),
        *(p for after, opening in vocab.POSITIONS.values() for p in (*after, *opening)),
        *regions.OPENERS,
        "a an and",
    ]
    return sorted({w for phrase in phrases for w in phrase.split()})


@pytest.fixture(scope="module")
def clip_words_dir(tmp_path_factory) -> Path:
    """The tiny CLIP with one BPE token per demo word and 64 positions (a demo caption: ≤ 44
    tokens). The default tiny CLIP spells words byte by byte and keeps 12 tokens: the opening
    words of a caption ("on the left t"), which name nothing in the image."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip_words"), 64, demo_words())


def test_demo_captions_fit_the_word_level_clip_tokenizer(clip_words_dir: Path) -> None:
    from gpo_lit.data.demo.regions import demo_scenes

    tok = HFTokenizer(str(clip_words_dir), max_length=None, mask_token="M")
    eot = tok.pad_id
    caps = demo_scenes(seed=0, n_train=50, n_dev=1, n_test=1)["train"][1]
    for cap in caps:  # never truncated: the end token is there, within the 64 positions
        ids, _ = tok.encode(cap)
        assert len(ids) <= 64 and ids[-1] == eot and eot not in ids[:-1], cap
    words = demo_words()
    one_token = [w for w in words if len(tok.encode(w)[0]) == 3]  # start, the word, end
    assert len(one_token) >= 0.95 * len(words)
    assert {"red", "cube", "sphere", "left", "tiny"} <= set(one_token)


@pytest.mark.slow
def test_vit_and_clip_text_train_end_to_end(clip_words_dir: Path, tmp_path: Path) -> None:
    """The CLIP-era pair on the demo images learns beyond the same seed's untrained model: a tiny
    ViT image tower (frozen in epoch 0, then trained with the loss warm-up over epoch 1) and the
    tiny CLIP text tower, PCME++'s per-token masking; InfoNCE with CLIP's temperature (1/0.07),
    lr 1e-3, max pooling (from random init it learns fastest: README, "CLIP-era demo"), 3 epochs
    of 25 steps. Measured: test rsum 68.0 against 37.4 untrained on 100 test images / 500
    captions (chance ≈ 31); with GPO 40.6 against 28.6. Before (byte-level tiny CLIP cut at 12
    tokens, triplet loss, GPO, lr 5e-4, 2 epochs, 40 test images): 41.5 against 65.0."""
    import json

    common = (
        "experiment=demo_grid",
        *TINY_GRID_DEMO,
        "++data.demo.n_test=100",
        "data.eval_batch_size=100",
        *VIT_DEMO,
        "model/text=clip",
        f"model.text.encoder.name_or_path={clip_words_dir}",
        "data.augment.per_token=true",
        "loss=infonce_clip",
        "~loss.all_negatives_epochs",
        "optim.lr=1e-3",
        "model/pooling=max",
        f"paths.data_dir={tmp_path / 'data'}",
    )

    def rsum(name: str, *overrides: str) -> float:
        run_dir = tmp_path / name
        res = run("gpo_lit.train", *common, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())["full"]["rsum"]

    untrained = rsum(
        "untrained", "trainer.max_epochs=1", "optim.lr=1e-12", "trainer.limit_train_batches=1"
    )
    trained = rsum("trained", "trainer.max_epochs=3")
    print(f"ViT + CLIP text: trained rsum {trained:.2f}, untrained {untrained:.2f}")
    assert trained > 1.5 * untrained and trained > untrained + 20, (trained, untrained)
