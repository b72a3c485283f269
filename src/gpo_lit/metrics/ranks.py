"""Exact retrieval ranks from similarity shards: one matmul pass, no argsort, no full matrix.

A rank is 0-based: the number of candidates that are not ground truth and score at least as high
as the ground truth (``ties="pessimistic"``, the default: a tie counts against the query, so a
collapsed model whose similarities all tie ranks every query last). Image→text uses the image's
best-scoring ground-truth caption, and its other ground-truth captions are never counted against
it; text→image the caption's image. ``ties="optimistic"`` counts only the candidates scoring
STRICTLY above (ties in the query's favour), for comparison; the authors' code breaks ties by the
order its argsort happens to return. Similarity = inner product; an ensemble (lists of
embeddings) ranks the models' summed similarity matrices (the mean's order, no inexact 1/M), one
matmul of the concatenated embeddings.

Text→image needs, per caption column j, the exact ground-truth value g[j] = S[cap2img[j], j],
which only the shard holding image cap2img[j] computes. A cheap row-wise dot gives g≈[j] and a
tolerance δ[j] (a few hundred ulps of Σ|a_i b_i|), so every entry outside [g≈ − δ, g≈ + δ] is
classified in the same pass (above the band: counted; below: not, under either tie rule); the
rare entries inside that band, entries equal to g≈ ± δ included, are kept as (column, value) and
compared with the exact g[j] at the end (``>=`` or ``>``: an entry equal to g[j] is a tie).
Afterwards every g[j] is checked to lie inside its closed band, which is all the classification
needs: the result is exact with respect to the values the shards computed, ties included, not up
to an epsilon. A second pass over the same shards (same shapes, hence the same values) runs only
for the columns where that check fails (not seen in practice), where near-ties are so massive
that the band outgrows its memory budget (a collapsed model), or for all columns when float32
matmuls run at reduced precision (TF32 / bf16 via ``torch.set_float32_matmul_precision``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from gpo_lit.errors import expect
from gpo_lit.metrics.prepared import (  # re-exported: the ranker's inputs
    TIES,
    EmbeddingsLike,
    PreparedEmbeddings,
    check_ties,
    prepare_embeddings,
)
from gpo_lit.threads import one_thread

SHARD_BYTES = 256 * 2**20  # cap on one shard's buffers (similarities + two bool masks)

__all__ = [
    "TIES",
    "EmbeddingsLike",
    "PreparedEmbeddings",
    "check_ties",
    "prepare_embeddings",
    "ranks_from_prepared",
    "retrieval_ranks",
]


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the matmul's arithmetic (float32 may run as TF32/bf16 when allowed)."""
    if dtype == torch.float64:
        return 2.0**-53
    try:
        precision = torch.get_float32_matmul_precision()
    except Exception:  # unreadable mix of legacy/new TF32 flags: assume reduced precision
        precision = "medium"
    return {"highest": 2.0**-24, "high": 2.0**-11}.get(precision, 2.0**-8)


def _gt_estimate(p: PreparedEmbeddings, unit: float) -> tuple[Tensor, Tensor]:
    """g≈[j] = <img[cap2img[j]], cap[j]> by a row-wise dot, and a tolerance δ[j]. [n_cap] each.

    The exact GT value g[j] is whatever the shard's matmul computes; δ is meant to cover
    |g − g≈|. The worst case for K-term dot products in any order is 2 γ_K Σ|a_i b_i| with
    γ_K = K u / (1 − K u), but observed errors are ~u Σ|a_i b_i| (≤ 1.5 for random signs, ≤ 7 for
    all-positive data, K = 1024), so δ = min(2.02 γ_K, 4 √K u) Σ|a_i b_i| (+ underflow) keeps
    the band of uncertain entries narrow. Correctness never rests on it: the pass checks
    |g − g≈| ≤ δ for every caption afterwards and recounts the columns where it fails.
    """
    k = p.img.shape[1]
    gamma = k * unit / (1.0 - k * unit)
    factor = min(2.02 * gamma, 4.0 * math.sqrt(k) * unit)
    g = torch.empty(p.n_cap, dtype=p.img.dtype, device=p.img.device)
    absdot = torch.empty_like(g)
    chunk = max(1, (1 << 22) // k)  # gathered rows [chunk, K]: 16 MiB in float32, cache-sized
    for c0 in range(0, p.n_cap, chunk):
        prod = torch.index_select(p.img, 0, p.cap2img[c0 : c0 + chunk])
        prod.mul_(p.cap[c0 : c0 + chunk])
        g[c0 : c0 + chunk] = prod.sum(dim=1)
        absdot[c0 : c0 + chunk] = prod.abs_().sum(dim=1)
    # finite: prepare_embeddings bounds every product (d·max|img|·max|cap|)
    return g, absdot.mul_(factor).add_(4.0 * k * torch.finfo(p.img.dtype).tiny)


def _count_true_(mask: Tensor, dim: int) -> Tensor:
    """Number of True along ``dim`` (0 or 1) of mask [r, n] → [n] or [r]; may overwrite ``mask``.

    Up to 5 in-place halvings with uint8 adds (an entry then counts ≤ 2**5, no overflow), then a
    sum over the remaining 1/32. ``mask.sum()`` would first copy the whole mask to int64 (8 bytes
    per entry, on CPU and CUDA alike) and cost several times the comparison that made it.
    """
    m = mask.view(torch.uint8)
    rest: list[Tensor] = []  # odd leftovers, each counting ≤ 2**level
    for _ in range(5):
        w = m.shape[dim]
        if w < 2:
            break
        h = w // 2
        if w % 2:
            rest.append(m.narrow(dim, w - 1, 1).sum(dim=dim, dtype=torch.int32))
        m = m.narrow(dim, 0, h).add_(m.narrow(dim, h, h))
    total = m.sum(dim=dim, dtype=torch.int32)
    for r in rest:
        total += r
    return total


def _flat_nonzero(mask: Tensor, limit: int) -> Tensor | None:
    """Flat indices (int64, ascending) of the entries of a contiguous 0/1 uint8 tensor that are 1,
    or None when more than ``limit`` of the 8-aligned ones are.

    Scans 8 entries at a time through an int64 view first: for sparse masks that is several
    times faster than ``nonzero`` over every byte. The early None spares a dense mask (a collapsed
    model: every entry ties) index tensors of 24 bytes per entry.
    """
    flat = mask.reshape(-1)
    n8 = flat.numel() // 8 * 8
    words = flat[:n8].view(torch.int64)
    hit = words.nonzero().squeeze(1)  # words holding at least one set byte
    if hit.numel() > limit:
        return None
    hit_bytes = words[hit].view(torch.uint8)  # 0/1 each: their sum is the count
    if int(hit_bytes.sum()) > limit:
        return None
    wb = hit_bytes.view(-1, 8).nonzero()  # (word, byte) pairs, memory order
    pos = hit[wb[:, 0]] * 8 + wb[:, 1]
    if n8 == flat.numel():
        return pos
    return torch.cat([pos, flat[n8:].nonzero().squeeze(1) + n8])


@torch.inference_mode()
def ranks_from_prepared(
    p: PreparedEmbeddings, shard_size: int = 1024, ties: str = "pessimistic"
) -> tuple[Tensor, Tensor]:
    """(i2t_rank [n_img], t2i_rank [n_cap]), int64, on the embeddings' device. See module doc."""
    # A tie (a candidate equal to the ground truth) counts against the query under ``>=``.
    beats = torch.ge if check_ties(ties) == "pessimistic" else torch.gt
    expect(
        isinstance(shard_size, numbers.Integral) and not isinstance(shard_size, bool),
        "shard_size",
        "a positive integer",
        repr(shard_size),
    )
    shard_size = int(shard_size)
    expect(shard_size >= 1, "shard_size", "a positive integer", shard_size)
    # Fewer rows when a shard's buffers (similarities + two masks) would pass SHARD_BYTES, so
    # 25K images x 125K captions stay well within 1 GB above the embeddings.
    per_row = p.n_cap * (p.img.element_size() + 2)
    shard_size = max(1, min(shard_size, SHARD_BYTES // per_row))
    img, cap, cap2img = p.img, p.cap, p.cap2img
    n_img, n_cap, dev = p.n_img, p.n_cap, img.device
    unit = _unit_roundoff(img.dtype)
    single_pass = img.shape[1] * unit < 0.01  # else the band would hold nearly everything

    # Captions grouped by image: those of images [s0, s1) are order[ptr[s0]:ptr[s1]].
    order = torch.argsort(cap2img, stable=True)
    ptr = [0, *torch.bincount(cap2img, minlength=n_img).cumsum(0).tolist()]

    i2t = torch.empty(n_img, dtype=torch.int64, device=dev)
    t2i = torch.zeros(n_cap, dtype=torch.int64, device=dev)
    g = torch.empty(n_cap, dtype=img.dtype, device=dev)  # exact GT values, as the shards compute
    recount = torch.zeros(n_cap, dtype=torch.bool, device=dev)  # columns left to a second pass
    if single_pass:
        g_approx, delta = _gt_estimate(p, unit)
        hi = g_approx + delta
        # s ≥ g≈ − δ  ⟺  s > the next float below it: both band tests become ``>``
        lo_open = torch.nextafter(
            g_approx - delta, torch.tensor(-torch.inf, dtype=img.dtype, device=dev)
        )
    pend_cols: list[Tensor] = []  # band entries (column, value), compared with g at the end
    pend_vals: list[Tensor] = []
    n_pend, budget = 0, max(4 * n_cap, shard_size * n_cap // 4)

    # Buffers reused by every shard: fresh multi-MB tensors cost a page fault per 4 KiB on CPU.
    rows_max = min(shard_size, n_img)
    sims_buf = torch.empty(rows_max, n_cap, dtype=img.dtype, device=dev)
    mask_a = torch.empty(rows_max, n_cap, dtype=torch.bool, device=dev)
    mask_b = torch.empty_like(mask_a) if single_pass else mask_a

    for s0 in range(0, n_img, shard_size):
        s1 = min(s0 + shard_size, n_img)
        sims = torch.mm(img[s0:s1], cap.T, out=sims_buf[: s1 - s0])  # the only similarities
        # Memory-bound counting: on one thread while other processes compete for the cores, else
        # on every thread (measured both ways by bench/eval_speed.py; figures in the README).
        with one_thread(dev, when_busy=True):
            js = order[ptr[s0] : ptr[s1]]
            rows = cap2img[js] - s0
            gt_vals = sims[rows, js]
            g[js] = gt_vals
            best = torch.full((s1 - s0,), -torch.inf, dtype=img.dtype, device=dev)
            best.scatter_reduce_(0, rows, gt_vals, reduce="amax")  # best GT caption per image
            i2t[s0:s1] = _count_true_(beats(sims, best[:, None], out=mask_a[: s1 - s0]), dim=1)
            if beats is torch.ge:  # the image's GT captions equal to its best are not against it
                at_best = (gt_vals == best[rows]).long()
                i2t[s0:s1] -= torch.zeros_like(best, dtype=torch.int64).index_add_(0, rows, at_best)
            if not single_pass:
                continue

            above = torch.gt(sims, hi, out=mask_a[: s1 - s0])
            # Band lo ≤ s ≤ hi as uint8 0/1 (above ⊂ {s ≥ lo} since δ ≥ 0), less the GT entries
            # themselves (in the band by design, never counted against themselves); rare, kept as
            # (col, value). Entries above it beat g under either tie rule, those below it neither.
            band = torch.gt(sims, lo_open, out=mask_b[: s1 - s0]).view(torch.uint8)
            band.sub_(above.view(torch.uint8))
            band.view(-1)[rows * n_cap + js] = 0
            t2i += _count_true_(above, dim=0)
            flat = _flat_nonzero(band, budget - n_pend)
            if flat is None or n_pend + flat.numel() > budget:
                # Massive near-ties: bound the memory, recount those columns later.
                recount |= band.view(torch.bool).any(dim=0)
            elif flat.numel():
                pend_cols.append(flat % n_cap)
                pend_vals.append(sims.view(-1)[flat])
                n_pend += flat.numel()

    if single_pass:
        if pend_cols:
            cols, vals = torch.cat(pend_cols), torch.cat(pend_vals)
            t2i.index_add_(0, cols, beats(vals, g[cols]).long())  # recount columns: reset anyway
        # The classification above is right iff lo ≤ g ≤ hi (g = lo would make the entries equal
        # to lo, which are in the band, ties; below it nothing ties): checked exactly, per column.
        recount |= (g > hi) | (g <= lo_open)
    else:
        recount[:] = True
    del sims_buf, mask_a, mask_b  # the second pass allocates its own shard
    if bool(recount.any()):
        _recount(p, shard_size, g, recount, t2i, beats, order, ptr)
    return i2t, t2i


def _recount(
    p: PreparedEmbeddings,
    shard_size: int,
    g: Tensor,
    recount: Tensor,
    t2i: Tensor,
    beats: Any,
    order: Tensor,
    ptr: list[int],
) -> None:
    """Second pass over the same shards: exact text→image counts for the ``recount`` columns.

    ``beats`` is ``torch.ge`` or ``torch.gt`` (the tie rule); ``order``/``ptr`` group the captions
    by image as in the first pass, so each shard can take its GT entries out of the count.
    """
    cols = recount.nonzero().squeeze(1)
    whole = cols.numel() == p.n_cap
    g_cols = g if whole else g[cols]
    t2i[cols] = 0
    sims_buf = torch.empty(min(shard_size, p.n_img), p.n_cap, dtype=g.dtype, device=g.device)
    for s0 in range(0, p.n_img, shard_size):
        s1 = min(s0 + shard_size, p.n_img)
        sims = torch.mm(p.img[s0:s1], p.cap.T, out=sims_buf[: s1 - s0])  # as in the first pass
        js = order[ptr[s0] : ptr[s1]]
        # The GT entry never counts against its own caption: whatever the comparison below says
        # of it is taken back (under ``>=`` it always counts itself, under ``>`` never).
        own = beats(sims[p.cap2img[js] - s0, js], g[js]) & recount[js]
        if not whole:
            sims = sims[:, cols]
        t2i[cols] += _count_true_(beats(sims, g_cols), dim=0)
        t2i.index_add_(0, js, own.long(), alpha=-1)


def retrieval_ranks(
    img: EmbeddingsLike,
    cap: EmbeddingsLike,
    cap2img: Any,
    shard_size: int = 1024,
    ties: str = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """0-based image→text and text→image ranks, exact, from one pass of similarity shards.

    img: [n_img, d] (or a list of them = ensemble, similarity = mean of img_m @ cap_m.T);
    cap: [n_cap, d] (list likewise); cap2img: int [n_cap], caption → image, ≥ 1 caption per image.
    Returns i2t_rank [n_img] (other images' captions scoring ≥ the image's best GT caption) and
    t2i_rank [n_cap] (other images scoring ≥ the caption's image), int64 on the input device;
    ``ties="optimistic"``: strictly above instead of ≥. ``shard_size``: images per similarity
    shard, fewer where one shard's buffers would pass :data:`SHARD_BYTES`.
    """
    check_ties(ties)  # before the inputs are validated and copied
    return ranks_from_prepared(prepare_embeddings(img, cap, cap2img), shard_size, ties)
