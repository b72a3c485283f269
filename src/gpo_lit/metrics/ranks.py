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
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
from gpo_lit.threads import machine_busy, one_thread

SHARD_BYTES = (
    256 * 2**20
)  # cap on one shard's buffers: its similarities (+ its 0/1 tile off the CPU)
# On the CPU the comparisons run over tiles of whole rows of this many bytes, written as 0/1 in
# the similarities' float type into a tile-sized buffer: a tile stays in the core's cache between
# its three comparisons and their counts, and torch's comparisons into bool are not vectorised
# (figures in the README, bench/eval_speed.py).
TILE_BYTES = 512 * 2**10
# Entries in a column's band (rare) are fetched per group of tiles of about this many bytes of
# similarities, right after they were counted, from those columns only: a column gather from a
# whole shard misses the cache at every entry.
GROUP_BYTES = 8 * 2**20
FLOAT32_COUNTS = 2**24  # 0/1 sums in float32 are exact below this; float64 above it
BAND_GATHER_BYTES = 16 * 2**20  # columns with band entries are gathered this much at a time
GT_CHUNK_BYTES = 16 * 2**20  # image rows gathered per caption chunk for the GT estimate

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
    chunk = min(p.n_cap, max(1, GT_CHUNK_BYTES // (k * p.img.element_size())))
    # One buffer for every chunk: a fresh multi-MB tensor per chunk costs a page fault per 4 KiB.
    buf = p.img.new_empty(chunk, k)
    for c0 in range(0, p.n_cap, chunk):
        prod = buf[: min(chunk, p.n_cap - c0)]
        torch.index_select(p.img, 0, p.cap2img[c0 : c0 + chunk], out=prod)
        prod.mul_(p.cap[c0 : c0 + chunk])
        g[c0 : c0 + chunk] = prod.sum(dim=1)
        absdot[c0 : c0 + chunk] = prod.abs_().sum(dim=1)
    # finite: prepare_embeddings bounds every product (d·max|img|·max|cap|)
    return g, absdot.mul_(factor).add_(4.0 * k * torch.finfo(p.img.dtype).tiny)


def _spans(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """[a, b) ranges covering [start, stop), ``step`` at a time."""
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def _rows_per(n_bytes: int, row_bytes: int, max_rows: int, device: torch.device) -> int:
    """Whole rows in ``n_bytes`` (at least one) on the CPU; elsewhere all ``max_rows`` at once
    (there each op is a kernel launch, and memory bandwidth is plentiful)."""
    return min(max(1, n_bytes // row_bytes) if device.type == "cpu" else max_rows, max_rows)


class _Tiles:
    """Row tiles of a shard and a reused 0/1 buffer for comparisons over them.

    A comparison writes 1/0 (not bool) into the buffer in ``dtype``; its row sums and column sums
    (a product with ones) are then exact counts. Whole rows, ``rows`` per tile: on the CPU as many
    as fit :data:`TILE_BYTES`, elsewhere the whole shard in one tile.
    """

    def __init__(self, max_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device):
        self.rows = _rows_per(TILE_BYTES, n_cols * torch.finfo(dtype).bits // 8, max_rows, device)
        self.buf = torch.empty(self.rows, n_cols, dtype=dtype, device=device)
        self.ones = torch.ones(self.rows, dtype=dtype, device=device)

    def spans(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Row ranges [a, b) of tiles covering rows [start, stop)."""
        return _spans(start, stop, self.rows)

    def compare(self, op: Any, tile: Tensor, other: Tensor) -> Tensor:
        """``op(tile, other)`` as 0/1 in the buffer: [b − a, n_cols]."""
        return op(tile, other, out=self.buf[: tile.shape[0]])

    def add_column_counts_(self, acc: Tensor, mask: Tensor) -> None:
        """acc [n_cols] += the column sums of a 0/1 tile [r, n_cols] (one matrix-vector product)."""
        acc.addmv_(mask.T, self.ones[: mask.shape[0]])


class _Counter:
    """What one counting thread owns: its tiles' 0/1 buffer, the column counts of its current
    group ``cols [2, n_cap]`` and its share of the text→image ranks ``t2i [n_cap]`` (int64)."""

    def __init__(self, max_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device):
        self.tiles = _Tiles(max_rows, n_cols, dtype, device)
        self.cols = torch.empty(2, n_cols, dtype=dtype, device=device)
        self.t2i = torch.zeros(n_cols, dtype=torch.int64, device=device)


def _share(items: list[tuple], counters: list[_Counter], work: Callable[..., None]) -> None:
    """``work(counter, *item)`` for every item, on one thread per counter (this one included),
    each taking the next item when it is done with its last: a thread that the scheduler sets
    aside takes fewer items instead of holding the others up."""
    pending = iter(items)
    lock = threading.Lock()
    inference = torch.is_inference_mode_enabled()  # thread-local: the helpers take this one's

    def run(c: _Counter) -> None:
        with torch.inference_mode(inference):
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                work(c, *item)

    with ThreadPoolExecutor(len(counters) - 1, "gpo-ranks") as pool:
        helpers = [pool.submit(run, c) for c in counters[1:]]
        run(counters[0])
        for h in helpers:
            h.result()  # re-raises a helper's error


def _count_dtype(p: PreparedEmbeddings, rows: int) -> torch.dtype:
    """The float type of the 0/1 counts: the similarities', or float64 where float32 sums of up
    to ``n_cap`` (a row) or ``rows`` (a column of a shard) ones would not be exact."""
    if p.img.dtype == torch.float32 and max(p.n_cap, rows) >= FLOAT32_COUNTS:
        return torch.float64
    return p.img.dtype


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
    img, cap, cap2img = p.img, p.cap, p.cap2img
    n_img, n_cap, dev = p.n_img, p.n_cap, img.device
    # Fewer rows when a shard's buffers would pass SHARD_BYTES, so 25K images x 125K captions stay
    # well within 1 GB above the embeddings: its similarities, and off the CPU its one 0/1 tile.
    count_dtype = _count_dtype(p, min(shard_size, n_img))
    per_row = n_cap * img.element_size()
    if dev.type != "cpu":
        per_row += n_cap * torch.finfo(count_dtype).bits // 8
    shard_size = max(1, min(shard_size, SHARD_BYTES // per_row, n_img))
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
    lock = threading.Lock()  # guards the four above and ``recount`` when counters share a shard

    # Buffers reused by every shard: fresh multi-MB tensors cost a page fault per 4 KiB on CPU.
    sims_buf = torch.empty(shard_size, n_cap, dtype=img.dtype, device=dev)
    n_counters = torch.get_num_threads() if dev.type == "cpu" else 1
    counters = [_Counter(shard_size, n_cap, count_dtype, dev) for _ in range(n_counters)]
    group_rows = _rows_per(GROUP_BYTES, n_cap * img.element_size(), shard_size, dev)
    row_counts = torch.empty(shard_size, dtype=count_dtype, device=dev)

    def count_group(c: _Counter, s0: int, g0: int, g1: int, sims: Tensor, best: Tensor) -> None:
        """Count rows [g0, g1) of the shard at ``s0``: their rows' counts into ``row_counts``,
        their columns' into ``c.t2i``; their band entries kept (or their columns recounted)."""
        nonlocal n_pend
        c.cols.zero_()  # [above hi, at least lo] over the group's rows
        for a, b in c.tiles.spans(g0, g1):
            tile = sims[a:b]
            torch.sum(c.tiles.compare(beats, tile, best[a:b]), dim=1, out=row_counts[a:b])
            if single_pass:
                # Entries above the band beat g under either tie rule, those below it neither;
                # the band lo ≤ s ≤ hi is counted, then its entries fetched.
                c.tiles.add_column_counts_(c.cols[0], c.tiles.compare(torch.gt, tile, hi))
                c.tiles.add_column_counts_(c.cols[1], c.tiles.compare(torch.gt, tile, lo_open))
        if not single_pass:
            return
        c.t2i += c.cols[0].long()
        # The GT entries themselves are in the band by design, never counted against themselves:
        # taken out of the band's count.
        band = c.cols[1].sub_(c.cols[0])
        jg = order[ptr[s0 + g0] : ptr[s0 + g1]]
        gt_in_band = (g[jg] > lo_open[jg]) & (g[jg] <= hi[jg])
        band.index_add_(0, jg, gt_in_band.to(count_dtype), alpha=-1)
        n_band = int(band.sum())
        with lock:
            fetch = n_band and n_pend + n_band <= budget
            if fetch:
                n_pend += n_band
            elif n_band:  # massive near-ties (a collapsed model): bound the memory, recount later
                recount.logical_or_(band > 0)
        if fetch:
            band_cols = band.nonzero().squeeze(1)
            cols, vals = _band_entries(sims[g0:g1], s0 + g0, band_cols, p, lo_open, hi)
            with lock:
                pend_cols.append(cols)
                pend_vals.append(vals)

    for s0 in range(0, n_img, shard_size):
        s1 = min(s0 + shard_size, n_img)
        sims = torch.mm(img[s0:s1], cap.T, out=sims_buf[: s1 - s0])  # the only similarities
        # Memory-bound counting: on a busy machine (other processes compete for the cores) in
        # one Python thread per intra-op thread, each on its own groups with ops on one thread
        # (no parallel region that waits for a descheduled thread); else on every intra-op
        # thread (measured both ways by bench/eval_speed.py; figures in the README).
        split = n_counters > 1 and machine_busy()
        with one_thread(dev, when=split):
            js = order[ptr[s0] : ptr[s1]]
            rows = cap2img[js] - s0
            gt_vals = sims[rows, js]
            g[js] = gt_vals
            best = torch.full((s1 - s0, 1), -torch.inf, dtype=img.dtype, device=dev)
            best.view(-1).scatter_reduce_(0, rows, gt_vals, reduce="amax")  # best GT per image
            # Groups of row tiles: each tile stays in cache through its comparisons and counts.
            groups = [(s0, g0, g1, sims, best) for g0, g1 in _spans(0, s1 - s0, group_rows)]
            if split and len(groups) > 1:
                _share(groups, counters, count_group)
            else:
                for args in groups:
                    count_group(counters[0], *args)
            i2t[s0:s1] = row_counts[: s1 - s0].long()
            if beats is torch.ge:  # the image's GT captions equal to its best are not against it
                at_best = (gt_vals == best.view(-1)[rows]).long()
                i2t[s0:s1] -= torch.zeros_like(i2t[s0:s1]).index_add_(0, rows, at_best)
    for c in counters:
        t2i += c.t2i

    if single_pass:
        if pend_cols:
            cols, vals = torch.cat(pend_cols), torch.cat(pend_vals)
            t2i.index_add_(0, cols, beats(vals, g[cols]).long())  # recount columns: reset anyway
        # The classification above is right iff lo ≤ g ≤ hi (g = lo would make the entries equal
        # to lo, which are in the band, ties; below it nothing ties): checked exactly, per column.
        recount |= (g > hi) | (g <= lo_open)
    else:
        recount[:] = True
    del sims_buf, counters  # the second pass allocates its own shard
    if bool(recount.any()):
        _recount(p, shard_size, count_dtype, g, recount, t2i, beats, order, ptr)
    return i2t, t2i


def _band_entries(
    sims: Tensor, s0: int, cols: Tensor, p: PreparedEmbeddings, lo_open: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor]:
    """The (column, value) pairs of a shard's entries in the band lo ≤ s ≤ hi of their column,
    GT entries excluded, for the band ``cols`` only; gathered a few MiB of columns at a time."""
    out_cols: list[Tensor] = []
    out_vals: list[Tensor] = []
    n_rows = sims.shape[0]
    step = max(1, BAND_GATHER_BYTES // (n_rows * sims.element_size()))
    for c0 in range(0, cols.numel(), step):
        cc = cols[c0 : c0 + step]
        sub = sims[:, cc]  # [n_rows, k]
        in_band = (sub > lo_open[cc]) & ~(sub > hi[cc])  # the same tests as the counts
        gt_row = p.cap2img[cc] - s0
        own = (gt_row >= 0) & (gt_row < n_rows)
        in_band[gt_row[own], own.nonzero().squeeze(1)] = False
        r, k = in_band.nonzero().unbind(1)
        out_cols.append(cc[k])
        out_vals.append(sub[r, k])
    return torch.cat(out_cols), torch.cat(out_vals)


def _recount(
    p: PreparedEmbeddings,
    shard_size: int,
    count_dtype: torch.dtype,
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
    sims_buf = torch.empty(shard_size, p.n_cap, dtype=g.dtype, device=g.device)
    tiles = _Tiles(shard_size, cols.numel(), count_dtype, g.device)
    counts = torch.empty(cols.numel(), dtype=count_dtype, device=g.device)
    for s0 in range(0, p.n_img, shard_size):
        s1 = min(s0 + shard_size, p.n_img)
        sims = torch.mm(p.img[s0:s1], p.cap.T, out=sims_buf[: s1 - s0])  # as in the first pass
        js = order[ptr[s0] : ptr[s1]]
        # The GT entry never counts against its own caption: whatever the comparison below says
        # of it is taken back (under ``>=`` it always counts itself, under ``>`` never).
        own = beats(sims[p.cap2img[js] - s0, js], g[js]) & recount[js]
        if not whole:
            sims = sims[:, cols]
        counts.zero_()
        for a, b in tiles.spans(0, s1 - s0):
            tiles.add_column_counts_(counts, tiles.compare(beats, sims[a:b], g_cols))
        t2i[cols] += counts.long()
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
