"""Caption word perturbation and region dropping (REFERENCE.md §4): frequencies on many draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gpo_lit.data.augment import drop_regions, perturb_words

MASK, SEP = 4, 3
VOCAB, RANDOM_LOW = 1000, 500  # random replacements land in [500, 1000), apart from real ids
N_WORDS = 10


def caption(n_words=N_WORDS):
    """[CLS] w0 [SEP] w1 [SEP] …: word k has 1 + k % 3 pieces with ids 100 + 10k + piece.

    The never-touched separators between words let a test read each word's outcome directly.
    """
    ids, word_ids = [2], [None]
    for k in range(n_words):
        for piece in range(1 + k % 3):
            ids.append(100 + 10 * k + piece)
            word_ids.append(k)
        ids.append(SEP)
        word_ids.append(None)
    return ids, word_ids


def outcomes(out, ids):
    """Per word: 'keep' / 'mask' / 'random' / 'delete'; fails on a word whose pieces disagree."""
    assert out[0] == 2 and out[-1] == SEP
    got, orig = _segments(out), _segments(ids)
    assert len(got) == len(orig)  # separators survive
    result = []
    for seg, o in zip(got, orig, strict=True):
        if not seg:
            result.append("delete")
        elif seg == o:
            result.append("keep")
        elif len(seg) == len(o) and all(t == MASK for t in seg):
            result.append("mask")
        elif len(seg) == len(o) and all(RANDOM_LOW <= t < VOCAB for t in seg):
            result.append("random")
        else:
            raise AssertionError(f"pieces of one word treated differently: {seg} from {o}")
    return result


def _segments(ids):
    segs, cur = [], []
    for t in ids[1:]:
        if t == SEP:
            segs.append(cur)
            cur = []
        else:
            cur.append(t)
    return segs


def within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rng_kind", ["random", "numpy"])
def test_perturb_frequencies(rng_kind):
    rng = random.Random(0) if rng_kind == "random" else np.random.default_rng(0)
    ids, word_ids = caption()
    counts = {"keep": 0, "mask": 0, "random": 0, "delete": 0}
    for _ in range(3000):
        out = perturb_words(
            ids, word_ids, mask_id=MASK, vocab_size=VOCAB, rng=rng, random_low=RANDOM_LOW
        )
        for o in outcomes(out, ids):
            counts[o] += 1
    n = 3000 * N_WORDS
    perturbed = n - counts["keep"]
    assert within(perturbed, n, 0.2), counts
    # conditional on being perturbed: 50% mask, 10% random, 40% delete
    assert within(counts["mask"], perturbed, 0.5), counts
    assert within(counts["random"], perturbed, 0.1), counts
    assert within(counts["delete"], perturbed, 0.4), counts


def test_random_ids_uniform_per_piece():
    rng = random.Random(1)
    ids, word_ids = [2, 7, 8, 9, 3], [None, 0, 0, 0, None]  # one word of three pieces
    draws, distinct = [], 0
    for _ in range(2000):
        out = perturb_words(
            ids, word_ids, mask_id=MASK, vocab_size=50, rng=rng, p=1.0, p_mask=0.0, p_random=1.0
        )
        assert out[0] == 2 and out[-1] == 3 and len(out) == 5
        draws += out[1:4]
        distinct += len(set(out[1:4])) > 1
    counts = np.bincount(draws, minlength=50)
    assert counts.min() > 0 and len(counts) == 50  # the whole range [0, 50), specials included
    assert abs(np.mean(draws) - 24.5) < 5 * math.sqrt((50**2 - 1) / 12 / len(draws))
    assert distinct > 1900  # each piece its own draw (all equal with prob 1/2500)
    low = perturb_words(
        ids,
        word_ids,
        mask_id=MASK,
        vocab_size=50,
        rng=rng,
        p=1.0,
        p_mask=0.0,
        p_random=1.0,
        random_low=45,
    )
    assert all(45 <= t < 50 for t in low[1:4])


def test_specials_untouched_and_masking_all_pieces():
    ids, word_ids = caption()
    out = perturb_words(
        ids,
        word_ids,
        mask_id=MASK,
        vocab_size=VOCAB,
        rng=random.Random(0),
        p=1.0,
        p_mask=1.0,
        p_random=0.0,
    )
    assert out == [t if w is None else MASK for t, w in zip(ids, word_ids, strict=True)]


def test_all_deleted_keeps_original():
    ids, word_ids = caption(3)
    out = perturb_words(
        ids,
        word_ids,
        mask_id=MASK,
        vocab_size=VOCAB,
        rng=random.Random(0),
        p=1.0,
        p_mask=0.0,
        p_random=0.0,
    )
    assert out == ids and out is not ids
    # One-word captions: unchanged = kept (0.8) + every-word-deleted guard (0.2 · 0.4 = 0.08).
    rng = random.Random(2)
    ids, word_ids = caption(1)
    n = 20000
    unchanged = sum(
        perturb_words(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, rng=rng, random_low=RANDOM_LOW)
        == ids
        for _ in range(n)
    )
    assert within(unchanged, n, 0.88)
    # A caption with no words at all passes through.
    assert perturb_words([2, 3], [None, None], mask_id=MASK, vocab_size=VOCAB, rng=rng) == [2, 3]


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_perturb_deterministic(make_rng):
    ids, word_ids = caption()

    def run(seed):
        rng = make_rng(seed)
        return [
            perturb_words(ids, word_ids, mask_id=MASK, vocab_size=VOCAB, rng=rng) for _ in range(20)
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_perturb_validates():
    with pytest.raises(ValueError, match="length"):
        perturb_words([1, 2], [None], mask_id=MASK, vocab_size=VOCAB, rng=random.Random(0))
    with pytest.raises(ValueError, match="probabilities"):
        perturb_words(
            [1], [0], mask_id=MASK, vocab_size=VOCAB, rng=random.Random(0), p_mask=0.8, p_random=0.3
        )
    with pytest.raises(ValueError, match="random_low"):
        perturb_words(
            [1], [0], mask_id=MASK, vocab_size=VOCAB, rng=random.Random(0), random_low=VOCAB
        )


# --- regions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rng_kind", ["random", "numpy"])
def test_drop_regions_rate_and_order(rng_kind):
    rng = random.Random(0) if rng_kind == "random" else np.random.default_rng(0)
    r, n = 36, 2000
    feats = np.repeat(np.arange(r, dtype=np.float32)[:, None], 4, axis=1)
    kept = 0
    for _ in range(n):
        out = drop_regions(feats, rng)
        assert out.ndim == 2 and out.shape[1] == 4 and 1 <= len(out) <= r
        rows = out[:, 0]
        assert np.all(np.diff(rows) > 0)  # original order, no duplicates
        assert np.all(out == rows[:, None])  # whole rows kept
        kept += len(out)
    assert within(kept, r * n, 0.8)
    assert np.array_equal(drop_regions(feats, rng, p_keep=1.0), feats)


def test_drop_regions_never_empty():
    rng = np.random.default_rng(0)
    feats = np.arange(8, dtype=np.float32).reshape(4, 2)
    picks = []
    for _ in range(4000):  # p_keep tiny: the guard fires every time and keeps one random region
        out = drop_regions(feats, rng, p_keep=1e-12)
        assert out.shape == (1, 2)
        picks.append(int(out[0, 0]) // 2)
    assert all(within(c, 4000, 0.25) for c in np.bincount(picks, minlength=4))
    single = np.ones((1, 3), dtype=np.float32)
    assert drop_regions(single, rng, p_keep=0.2).shape == (1, 3)


def test_drop_regions_memmap_and_validation(tmp_path):
    path = tmp_path / "feats.npy"
    np.save(path, np.arange(72, dtype=np.float32).reshape(36, 2))
    mm = np.load(path, mmap_mode="r")
    out = drop_regions(mm, random.Random(0))
    assert type(out) is np.ndarray and not np.shares_memory(out, mm)
    with pytest.raises(ValueError):
        drop_regions(np.zeros((0, 3)), random.Random(0))
    with pytest.raises(ValueError):
        drop_regions(np.zeros((3, 3)), random.Random(0), p_keep=0.0)


# --- specials perturbed like words (the released BiGRU code) -------------------------------------

START, END = 1, 2  # BiGRU-style caption: <start> w1 … wn <end>, one id per word
P, P_MASK, P_RANDOM = 0.2, 0.5, 0.1  # REFERENCE §4
P_DELETE = 1 - P_MASK - P_RANDOM


def bigru_caption(n):
    """``<start> w0 … w(n-1) <end>``: word k has id 10 + k (all distinct, below RANDOM_LOW)."""
    return [START, *range(10, 10 + n), END], [None, *range(n), None]


@pytest.mark.parametrize("perturb_specials", [True, False])
def test_caption_statistics_match_reference_probabilities(perturb_specials):
    """100,000 captions of 4-15 words against the per-token probabilities of REFERENCE §4.

    Per perturbed unit (a word, and with ``perturb_specials`` each of <start>/<end>): kept 0.8,
    masked 0.2·0.5, random 0.2·0.1, deleted 0.2·0.4, independently. The every-word-deleted guard
    fires with probability <= 0.08**4 = 4e-5 per caption: it moves each mean by < 0.02 standard
    errors, so it is left out of the expectations here (it has its own tests).
    """
    rng = np.random.default_rng(123)
    n_caps = 100_000
    n_words = np.random.default_rng(7).integers(4, 16, size=n_caps)
    outs = []
    for n in n_words:
        ids, word_ids = bigru_caption(int(n))
        outs.append(
            perturb_words(
                ids,
                word_ids,
                mask_id=MASK,
                vocab_size=VOCAB,
                rng=rng,
                random_low=RANDOM_LOW,
                perturb_specials=perturb_specials,
            )
        )
    lengths = np.array([len(o) for o in outs])
    flat = np.concatenate([np.asarray(o) for o in outs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    intact = (flat[starts] == START) & (flat[starts + lengths - 1] == END)
    per_cap = np.repeat(np.arange(n_caps), lengths)
    masks = np.bincount(per_cap, weights=flat == MASK, minlength=n_caps)
    randoms = np.bincount(per_cap, weights=flat >= RANDOM_LOW, minlength=n_caps)

    units = n_words + 2 if perturb_specials else n_words  # tokens that can be perturbed
    fixed = 0 if perturb_specials else 2  # tokens that never change

    def check(observed, expected_per_cap, var_per_cap):
        expected = expected_per_cap.mean()
        se = math.sqrt(var_per_cap.sum()) / n_caps
        assert abs(observed.mean() - expected) <= 4 * se, (observed.mean(), expected, se)

    def binomial(k, q):
        return k * q, k * q * (1 - q)

    p_keep = 1 - P
    if perturb_specials:
        check(intact, np.full(n_caps, p_keep**2), np.full(n_caps, p_keep**2 * (1 - p_keep**2)))
        assert abs(intact.mean() - 0.64) < 0.01
    else:
        assert intact.all()
    kept_mean, kept_var = binomial(units, 1 - P * P_DELETE)  # a masked / random token still counts
    check(lengths, fixed + kept_mean, kept_var)
    check(masks, *binomial(units, P * P_MASK))
    check(randoms, *binomial(units, P * P_RANDOM))


def test_perturbed_specials_act_alone():
    """p = 1, all masked: every token masked, each special on its own; all deleted: the guard."""
    ids, word_ids = bigru_caption(3)
    kwargs = dict(mask_id=MASK, vocab_size=VOCAB, rng=random.Random(0), perturb_specials=True)
    assert perturb_words(ids, word_ids, p=1.0, p_mask=1.0, p_random=0.0, **kwargs) == [MASK] * 5
    assert perturb_words(ids, word_ids, p=1.0, p_mask=0.0, p_random=0.0, **kwargs) == ids
    # no words and both specials deleted: kept whole, never empty
    bare = perturb_words([START, END], [None, None], p=1.0, p_mask=0.0, p_random=0.0, **kwargs)
    assert bare == [START, END]


def test_all_words_deleted_guard_with_perturbed_specials():
    """1-word captions: unchanged iff the word is deleted (guard, 0.08) or all 3 tokens kept
    (0.8³ = 0.512), i.e. 0.592; without the option 0.88 (see test_all_deleted_keeps_original).
    Only the specials gone (the word kept): 0.8 · 0.08² = 0.00512, as the released code allows."""
    rng = np.random.default_rng(5)
    ids, word_ids = bigru_caption(1)
    n = 40_000
    outs = [
        perturb_words(
            ids,
            word_ids,
            mask_id=MASK,
            vocab_size=VOCAB,
            rng=rng,
            random_low=RANDOM_LOW,
            perturb_specials=True,
        )
        for _ in range(n)
    ]
    assert within(sum(o == ids for o in outs), n, 0.08 + 0.8**3)
    assert within(sum(o == [10] for o in outs), n, 0.8 * 0.08**2)
    assert all(outs)  # never empty
