"""R@K, median and mean rank, rsum from 0-based rank vectors (REFERENCE §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gpo_lit.errors import GpoLitError


def _as_ranks(ranks: Any, name: str) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    arr = np.asarray(ranks)
    if arr.ndim != 1 or arr.size == 0:
        raise GpoLitError(f"{name}: expected a non-empty 1-D rank vector, found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise GpoLitError(
            f"{name}: expected non-negative integer ranks, found dtype {arr.dtype}, min {arr.min()}"
        )
    return arr


def _direction(ranks: np.ndarray, prefix: str, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}
    out[f"{prefix}_medr"] = float(math.floor(float(np.median(ranks))) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks)) + 1.0
    return out


def recall_metrics(
    i2t_rank: Any, t2i_rank: Any, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Paper metrics from 0-based ranks: i2t_rank [n_img], t2i_rank [n_cap] (tensor/array/list).

    ``R@K = 100·mean(rank < K)``, ``medr = floor(median(rank)) + 1``, ``meanr = mean(rank) + 1``;
    ``rsum`` = the 2·len(ks) recalls summed. Keys: i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr,
    the same with t2i_, and rsum. Python floats.
    """
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise GpoLitError(f"ks: expected positive integers, found {ks}")
    i2t = _direction(_as_ranks(i2t_rank, "i2t_rank"), "i2t", ks)
    t2i = _direction(_as_ranks(t2i_rank, "t2i_rank"), "t2i", ks)
    rsum = sum(i2t[f"i2t_r{k}"] + t2i[f"t2i_r{k}"] for k in ks)
    return {**i2t, **t2i, "rsum": rsum}
