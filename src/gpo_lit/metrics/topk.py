"""Top-K retrieval lists and per-query results, from the similarity the ranker uses.

For each query the K best gallery items, best first. Equal similarities are ordered AGAINST the
query: among tied candidates the query's positives come last (so a tie between a positive and
another candidate counts against the query, as the pessimistic rule of
:mod:`gpo_lit.metrics.ranks`), then by gallery index — also at the K-th place, where a tie decides
which items make the list at all. Positives default to the ground truth of ``cap2img``; the
ECCV Caption / CxC protocols pass their own (:mod:`gpo_lit.metrics.eccv`), so each protocol's list
is ordered against its own positives.

Directions: ``i2t`` = image queries over the captions, ``t2i`` = caption queries over the images.
Similarity = ``img @ cap.T`` of :class:`~gpo_lit.metrics.prepared.PreparedEmbeddings` (ensembles
averaged), computed in shards of ``shard_size`` queries (text→image as ``cap @ img.T``: in float32
a product may round one ulp apart from the ranker's, which matters only for near-exact ties).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError, expect
from gpo_lit.metrics.prepared import PreparedEmbeddings
from gpo_lit.metrics.ranks import ranks_from_prepared

DIRECTIONS = ("i2t", "t2i")


def _sizes(p: PreparedEmbeddings, direction: str) -> tuple[int, int]:
    """(number of queries, gallery size) of a direction."""
    expect(direction in DIRECTIONS, "direction", "'i2t' or 't2i'", repr(direction))
    return (p.n_img, p.n_cap) if direction == "i2t" else (p.n_cap, p.n_img)


def ground_truth_pairs(p: PreparedEmbeddings, direction: str) -> tuple[Tensor, Tensor]:
    """(query index, gallery index) int64 [n_cap] each: the ``cap2img`` ground truth."""
    _sizes(p, direction)
    caps = torch.arange(p.n_cap, device=p.cap2img.device)
    return (p.cap2img, caps) if direction == "i2t" else (caps, p.cap2img)


def _order(vals: Tensor, idx: Tensor, is_pos: Tensor, n_gal: int) -> Tensor:
    """Positions sorting each row by (similarity desc, positive last, gallery index asc).

    ``vals`` [r, m] must be sorted descending along rows (``topk`` output): equal values are then
    contiguous groups, and one argsort of the key (group, positive, index) orders them.
    """
    group = torch.zeros_like(idx)
    torch.cumsum(vals[:, 1:] != vals[:, :-1], dim=1, out=group[:, 1:])
    return torch.argsort((group * 2 + is_pos.to(torch.int64)) * n_gal + idx, dim=1)


def _query_sims(p: PreparedEmbeddings, direction: str, q: Tensor, out: Tensor) -> Tensor:
    """Similarities [len(q), gallery] of queries ``q`` (the same products as the ranker's)."""
    if direction == "i2t":
        return torch.mm(p.img[q], p.cap.T, out=out[: q.numel()])
    return torch.mm(p.cap[q], p.img.T, out=out[: q.numel()])


def _is_positive(keys: Tensor, q: Tensor, g: Tensor, n_gal: int) -> Tensor:
    """Whether each (q, g) pair (broadcast) is among the sorted positive pair ``keys``."""
    want = q * n_gal + g
    at = torch.searchsorted(keys, want).clamp_(max=max(keys.numel() - 1, 0))
    return keys[at] == want if keys.numel() else torch.zeros_like(want, dtype=torch.bool)


@torch.inference_mode()
def topk_lists_multi(
    p: PreparedEmbeddings,
    direction: str,
    k: int,
    positive_sets: Sequence[tuple[Any, Any] | None],
    queries: Tensor | np.ndarray | Sequence[int] | None = None,
    shard_size: int = 1024,
) -> list[Tensor]:
    """:func:`topk_lists` for several positive sets at once: one list per set, one pass of
    similarities and one ``topk`` (only the order of ties differs between the sets)."""
    n_q, n_gal = _sizes(p, direction)
    expect(
        isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1,
        "k",
        "a positive integer",
        repr(k),
    )
    expect(
        isinstance(shard_size, numbers.Integral) and shard_size >= 1,
        "shard_size",
        "a positive integer",
        repr(shard_size),
    )
    k, shard_size, dev = min(int(k), n_gal), int(shard_size), p.img.device
    sets = []
    for pairs in positive_sets:
        pq, pg = pairs if pairs is not None else ground_truth_pairs(p, direction)
        pq = torch.as_tensor(pq, dtype=torch.int64, device=dev).reshape(-1)
        pg = torch.as_tensor(pg, dtype=torch.int64, device=dev).reshape(-1)
        ok = pq.numel() == pg.numel() and (
            pq.numel() == 0
            or (
                int(pq.min()) >= 0
                and int(pq.max()) < n_q
                and int(pg.min()) >= 0
                and int(pg.max()) < n_gal
            )
        )
        expect(
            ok, "positives", f"(query, gallery) index pairs in [0, {n_q}) × [0, {n_gal})", "others"
        )
        sets.append(torch.unique(pq * n_gal + pg))  # sorted pair keys
    if queries is None:
        q_all = torch.arange(n_q, device=dev)
    else:
        q_all = torch.as_tensor(np.asarray(queries), dtype=torch.int64, device=dev).reshape(-1)
        if q_all.numel() and (int(q_all.min()) < 0 or int(q_all.max()) >= n_q):
            raise GpoLitError(
                f"queries: expected indices in [0, {n_q}), found {q_all.tolist()[:5]}"
            )
        expect(
            torch.unique(q_all).numel() == q_all.numel(), "queries", "distinct indices", "repeats"
        )
    outs = [torch.empty(q_all.numel(), k, dtype=torch.int64, device=dev) for _ in sets]
    rows_max = min(shard_size, max(1, q_all.numel()))
    sims_buf = torch.empty(rows_max, n_gal, dtype=p.img.dtype, device=dev)
    extra = 1 if k < n_gal else 0  # one more: a tie across the K-th place shows as equal values
    for s0 in range(0, q_all.numel(), shard_size):
        q = q_all[s0 : s0 + shard_size]
        r = q.numel()
        sims = _query_sims(p, direction, q, sims_buf)
        vals, idx = sims.topk(k + extra, dim=1)  # sorted, descending
        crowded = (
            (vals[:, k] == vals[:, k - 1])
            if extra
            else torch.zeros(r, dtype=torch.bool, device=dev)
        )
        vals, idx = vals[:, :k], idx[:, :k]
        tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1) & ~crowded  # ties inside the list
        t_rows, c_rows = tied.nonzero().squeeze(1), crowded.nonzero().squeeze(1)
        for keys, out in zip(sets, outs, strict=True):
            out[s0 : s0 + r] = idx
            if t_rows.numel():
                tv, ti = vals[t_rows], idx[t_rows]
                pos = _is_positive(keys, q[t_rows, None], ti, n_gal)
                out[s0 + t_rows] = ti.gather(1, _order(tv, ti, pos, n_gal))
            for c0 in range(0, c_rows.numel(), 64):  # which tied items make the list at all
                rows = c_rows[c0 : c0 + 64]
                s = sims[rows]
                # every item scoring >= the K-th value competes: the top m hold them all
                m = int((s >= vals[rows, k - 1 :]).sum(dim=1).max())
                cv, ci = s.topk(m, dim=1)
                pos = _is_positive(keys, q[rows, None], ci, n_gal)
                out[s0 + rows] = ci.gather(1, _order(cv, ci, pos, n_gal)[:, :k])
    return outs


def topk_lists(
    p: PreparedEmbeddings,
    direction: str,
    k: int,
    positives: tuple[Any, Any] | None = None,
    queries: Tensor | np.ndarray | Sequence[int] | None = None,
    shard_size: int = 1024,
) -> Tensor:
    """Gallery indices int64 [n_queries, min(k, gallery)] of each query's top ``k``, best first.

    positives: (query index, gallery index) pairs whose ties count against the query (default:
    the ``cap2img`` ground truth); queries: a subset of query indices (default: all, in order).
    """
    return topk_lists_multi(p, direction, k, [positives], queries, shard_size)[0]


def per_query_results(
    p: PreparedEmbeddings, k: int = 10, shard_size: int = 1024
) -> dict[str, np.ndarray]:
    """Per query, both directions, over the whole split: the 0-based rank of the best ground truth
    (:func:`~gpo_lit.metrics.ranks.ranks_from_prepared`, the metrics' own rule) and the top ``k``.

    Keys: ``i2t_rank`` int64 [n_img], ``t2i_rank`` int64 [n_cap], ``i2t_top`` int64 [n_img, k]
    (caption indices), ``t2i_top`` int64 [n_cap, k] (image indices), ``cap2img`` int64 [n_cap].
    """
    i2t_rank, t2i_rank = ranks_from_prepared(p, shard_size)
    return {
        "i2t_rank": i2t_rank.cpu().numpy(),
        "t2i_rank": t2i_rank.cpu().numpy(),
        "i2t_top": topk_lists(p, "i2t", k, shard_size=shard_size).cpu().numpy(),
        "t2i_top": topk_lists(p, "t2i", k, shard_size=shard_size).cpu().numpy(),
        "cap2img": p.cap2img.cpu().numpy(),
    }
