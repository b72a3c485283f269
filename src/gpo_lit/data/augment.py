"""Training-time "size augmentation" of VSE∞ (REFERENCE.md §4) for captions and region sets.

Both functions take an explicit random generator — ``random.Random`` or ``np.random.Generator`` —
so a seeded dataset worker reproduces its batches exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import numpy as np

Rng = random.Random | np.random.Generator
_Action = Literal["keep", "mask", "random", "delete"]


def _uniform(rng: Rng) -> float:
    return float(rng.random())


def _randint(rng: Rng, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)``."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(low, high))
    return rng.randrange(low, high)


def _uniforms(rng: Rng, n: int) -> np.ndarray:
    if isinstance(rng, np.random.Generator):
        return rng.random(n)
    return np.array([rng.random() for _ in range(n)])


def perturb_words(
    ids: Sequence[int],
    word_ids: Sequence[int | None],
    *,
    mask_id: int,
    vocab_size: int,
    rng: Rng,
    p: float = 0.2,
    p_mask: float = 0.5,
    p_random: float = 0.1,
    random_low: int = 0,
    perturb_specials: bool = False,
) -> list[int]:
    """Perturb whole words of a tokenised caption (all pieces of a word share one decision).

    Each word is perturbed with probability ``p``; a perturbed word has every piece replaced by
    ``mask_id`` (prob ``p_mask``), every piece replaced by a random id (prob ``p_random``, one
    independent draw per piece), or is deleted (the remaining ``1 - p_mask - p_random``).
    With the defaults: 10% masked, 2% random, 8% deleted per word. Tokens whose word id is None
    (``[CLS]``/``[SEP]``, ``<start>``/``<end>``) are never touched, unless ``perturb_specials``:
    then each of them is perturbed like a one-piece word, as the released BiGRU code does with
    ``<start>``/``<end>`` (both survive intact in 0.8² = 64% of captions). The released BERT
    code adds ``[CLS]``/``[SEP]`` after perturbing, so they stay intact there.

    Random ids are drawn uniformly from ``[random_low, vocab_size)``. With ``random_low=0``, as in
    the released code (which draws from the whole vocabulary for BERT and the BiGRU alike), a
    special id (pad, mask, [CLS], ...) can be drawn; pass the first non-special id to exclude them
    where specials occupy the low ids.

    If every word of the caption would be deleted, the original caption is returned unchanged,
    so no caption loses all its words (specials are not counted as words here, perturbed or
    not). This happens with probability ``(p·p_delete)^n`` for ``n`` words, 0.08^n with the
    defaults: 8% of 1-word captions, 0.64% of 2-word ones, < 1e-10 for the ~10+ tokens of a
    typical F30K/COCO caption. The released code has no such guard. A caption without words
    whose perturbed specials would all be deleted is returned unchanged too (never empty).

    Args:
        ids: ``[L]`` token ids, specials included.
        word_ids: ``[L]`` word index per token, None for specials (``CaptionTokenizer.encode``).
        mask_id, vocab_size: from the tokenizer.
        rng: random source; one uniform per word (and per special if ``perturb_specials``),
            plus one per piece of a randomised word.
        perturb_specials: perturb tokens whose word id is None too, each on its own.

    Returns:
        the perturbed ids ``[L']``, ``L' <= L``.
    """
    if len(ids) != len(word_ids):
        raise ValueError(
            f"perturb_words: ids and word_ids differ in length ({len(ids)} vs {len(word_ids)})"
        )
    if not (0.0 <= p <= 1.0 and p_mask >= 0.0 and p_random >= 0.0 and p_mask + p_random <= 1.0):
        raise ValueError(
            f"perturb_words: bad probabilities p={p}, p_mask={p_mask}, p_random={p_random}"
        )
    if not 0 <= random_low < vocab_size:
        raise ValueError(
            f"perturb_words: need 0 <= random_low < vocab_size, got {random_low}, {vocab_size}"
        )

    actions: dict[int, _Action] = {}  # per word index; specials (if perturbed) at -1 - position
    out: list[int] = []
    for pos, (tok, w) in enumerate(zip(ids, word_ids, strict=True)):
        if w is None:
            if not perturb_specials:
                out.append(tok)
                continue
            w = -1 - pos  # a special is a word of its own, apart from every word index >= 0
        action = actions.get(w)
        if action is None:  # first piece of this word decides for all its pieces
            u = _uniform(rng)
            if u >= p:
                action = "keep"
            else:
                u /= p  # uniform on [0, 1) again given u < p, as in the released code
                action = "mask" if u < p_mask else "random" if u < p_mask + p_random else "delete"
            actions[w] = action
        if action == "keep":
            out.append(tok)
        elif action == "mask":
            out.append(mask_id)
        elif action == "random":
            out.append(_randint(rng, random_low, vocab_size))
        # "delete": drop the piece

    words = [a for w, a in actions.items() if w >= 0]
    if (words and all(a == "delete" for a in words)) or (ids and not out):
        return list(ids)
    return out


def drop_regions(feats: np.ndarray, rng: Rng, p_keep: float = 0.8) -> np.ndarray:
    """Keep each region (row) independently with probability ``p_keep``, in the original order.

    At least one region always survives: if none does, one uniformly random region is kept. That
    guard fires with probability ``(1 - p_keep)^R``: 0.2^36 ≈ 7e-26 for 36 BUTD regions.

    Args:
        feats: ``[R, D]`` region features (a memory map is fine; the result is an in-memory copy).
        rng: random source; ``R`` uniforms (plus one integer if the guard fires).
        p_keep: keep probability per region (0.8 in the paper).

    Returns:
        ``[M, D]``, ``1 <= M <= R``.
    """
    feats = np.asarray(feats)  # a plain ndarray even for np.memmap input
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(
            f"drop_regions: expected a non-empty [R, D] array, got shape {feats.shape}"
        )
    return feats[kept_regions(feats.shape[0], rng, p_keep)]


def kept_regions(n: int, rng: Rng, p_keep: float = 0.8) -> np.ndarray:
    """The regions :func:`drop_regions` keeps of ``n``: a bool mask ``[n]``, drawn from ``rng``
    exactly as it draws them (so a reader can copy out only the kept rows)."""
    if n <= 0:
        raise ValueError(f"drop_regions: expected at least one region, got {n}")
    if not 0.0 < p_keep <= 1.0:
        raise ValueError(f"drop_regions: p_keep must be in (0, 1], got {p_keep}")
    keep = _uniforms(rng, n) < p_keep
    if not keep.any():
        keep[_randint(rng, 0, n)] = True
    return keep
