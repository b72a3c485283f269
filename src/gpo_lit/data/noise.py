"""Noisy correspondences (REFERENCE §12, PCME++'s ``noise_ratio``): a fraction of the training
captions shown with the wrong image, chosen once and deterministically from the seed.

⌊r·N⌋ of the N training caption slots are chosen uniformly at random and their captions permuted
among themselves; images, image ids and every other slot stay as they are. PCME++ permutes them
uniformly, so a slot can keep its caption or get another caption of its own image, and fewer than
⌊r·N⌋ pairs end up wrong. With ``derangement=True`` (the default) every chosen slot gets a caption
of another image: exactly ⌊r·N⌋ pairs are mismatched.

The derangement: order the chosen slots in runs by image (images in random order, slots in random
order within a run), then give each slot the caption ``g`` places further round the cycle, ``g``
being the longest run. A run of length ≤ g is left entirely by a shift of g, and, when g ≤ m/2
(m chosen slots), the shift cannot wrap back into the run it started from, so no caption stays
with its image. If one image holds more than half of the chosen slots (only possible for tiny m),
the slots are drawn again.
"""

from __future__ import annotations

import math

import numpy as np

from gpo_lit.errors import GpoLitError

_REDRAWS = 100


def _derange(slots: np.ndarray, images: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Captions for ``slots`` (a permutation of them) each from another image, or None when one
    image holds more than half of the slots."""
    m = len(slots)
    _, runs = np.unique(images, return_counts=True)
    g = int(runs.max())
    if 2 * g > m:
        return None
    relabel = rng.permutation(int(images.max()) + 1)  # random order of the image runs
    order = np.lexsort((rng.random(m), relabel[images]))
    out = np.empty(m, dtype=np.int64)
    out[order] = slots[order[(np.arange(m) + g) % m]]
    return out


def noisy_caption_map(
    cap2img: np.ndarray, ratio: float, seed: int, derangement: bool = True
) -> np.ndarray:
    """The caption shown at each training slot: ``caption[j] = map[j]``, image ``cap2img[j]``.

    Args:
        cap2img: ``[N]`` image index of each caption slot.
        ratio: fraction r in [0, 1] of slots whose captions are permuted (⌊r·N⌋ slots).
        seed: the data seed; the same seed gives the same map.
        derangement: every chosen slot gets a caption of another image (exactly ⌊r·N⌋ pairs
            mismatched); off = a plain uniform permutation, as PCME++.

    Returns:
        ``[N]`` int64, a permutation of ``0 … N−1`` moving only the chosen slots.
    """
    cap2img = np.asarray(cap2img, dtype=np.int64)
    n = len(cap2img)
    if not 0.0 <= ratio <= 1.0:
        raise GpoLitError(f"data.noise_ratio: expected a fraction in [0, 1], found {ratio}")
    m = math.floor(ratio * n)
    mapping = np.arange(n, dtype=np.int64)
    if m == 0:
        return mapping
    rng = np.random.default_rng([int(seed), 0x6E6F697A])  # a stream of its own ("noiz")
    for _ in range(_REDRAWS):
        slots = np.sort(rng.choice(n, size=m, replace=False))
        if not derangement:
            mapping[slots] = rng.permutation(slots)
            return mapping
        captions = _derange(slots, cap2img[slots], rng)
        if captions is not None:
            mapping[slots] = captions
            return mapping
    raise GpoLitError(
        f"data.noise_ratio: expected ⌊r·N⌋ = {m} captions that can all move to other images, "
        f"found one image holding most of them in {_REDRAWS} draws (too few captions; raise "
        f"data.noise_ratio or set data.noise_derangement=false)"
    )


def mismatched_fraction(cap2img: np.ndarray, mapping: np.ndarray) -> float:
    """Fraction of slots whose caption belongs to another image."""
    cap2img = np.asarray(cap2img)
    return float(np.mean(cap2img[mapping] != cap2img)) if len(cap2img) else 0.0
