"""Example retrievals of an evaluated split: queries spread over the split, each with the rank
of its best ground truth and its top list, both from :mod:`gpo_lit.metrics` (the metrics' own
ranking rule; ties count against the query)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

HIT = "✓"


def item_names(split: Any, n: int) -> list[str]:
    """Names of a split's items: its image / video ids when it has them, else ``#i``."""
    for attr in ("image_ids", "video_ids"):
        ids = getattr(split, attr, None)
        if ids is not None and len(ids) >= n:
            return [str(i) for i in ids[:n]]
    return [f"#{i}" for i in range(n)]


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``0..n-1`` (deterministic queries)."""
    if n <= 0 or k <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))})


def _mark(text: str, hit: bool) -> str:
    return f"{HIT} {text}" if hit else text


@dataclass
class Example:
    """One example query: its index, the 0-based rank of its best ground truth (the metrics' own
    rule, :mod:`gpo_lit.metrics.ranks`), its top list (best first), which of those are ground
    truth, and all of its ground truth (t2i: the caption's item; i2t: the item's captions)."""

    query: int
    rank: int
    top: list[int]
    hits: list[bool]
    truth: list[int]


def query_examples(
    img: Tensor,
    cap: Tensor,
    cap2img: Tensor | np.ndarray | Sequence[int],
    n_queries: int = 8,
    top_k: int = 5,
) -> dict[str, list[Example]]:
    """``{"text_to_image": [...], "image_to_text": [...]}``: queries spread evenly over the
    captions / items; ranks from :func:`ranks_from_prepared` over the whole split and top lists
    from :func:`topk_lists` (ties count against the query in both)."""
    from gpo_lit.metrics.ranks import prepare_embeddings, ranks_from_prepared
    from gpo_lit.metrics.topk import topk_lists

    p = prepare_embeddings(img.float(), cap.float(), torch.as_tensor(np.asarray(cap2img)))
    i2t_rank, t2i_rank = (r.cpu().numpy() for r in ranks_from_prepared(p))
    c2i = p.cap2img.cpu().numpy()
    caps_of: dict[int, list[int]] = {}
    for j, i in enumerate(c2i.tolist()):
        caps_of.setdefault(i, []).append(j)
    out: dict[str, list[Example]] = {"text_to_image": [], "image_to_text": []}
    q = _spread(p.n_cap, n_queries)
    if q:
        tops = topk_lists(p, "t2i", top_k, queries=q).cpu().numpy()
        for j, top in zip(q, tops, strict=True):
            g = int(c2i[j])
            picks = [int(i) for i in top]
            out["text_to_image"].append(
                Example(j, int(t2i_rank[j]), picks, [i == g for i in picks], [g])
            )
    q = _spread(p.n_img, n_queries)
    if q:
        tops = topk_lists(p, "i2t", top_k, queries=q).cpu().numpy()
        for i, top in zip(q, tops, strict=True):
            picks = [int(j) for j in top]
            out["image_to_text"].append(
                Example(i, int(i2t_rank[i]), picks, [int(c2i[j]) == i for j in picks], caps_of[i])
            )
    return out


def retrieval_examples(
    img: Tensor,
    cap: Tensor,
    cap2img: Tensor | np.ndarray | Sequence[int],
    captions: Sequence[str],
    item_names: Sequence[str],
    n_queries: int = 8,
    top_k: int = 5,
    thumb: Callable[[int, str], Any] | None = None,
) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Example retrievals as ``{"text_to_image": (columns, rows), "image_to_text": (...)}``.

    Queries are spread evenly over the captions / items (:func:`query_examples`). A text→image
    row is the caption, its image, the (1-based) rank of that image and the top ``top_k`` items;
    an image→text row is the item, one of its captions, the best rank of its captions and the top
    ``top_k`` captions. Retrieved entries that are ground truth start with ``✓``. ``thumb(i,
    label)`` turns an item cell into something else (a ``wandb.Image`` thumbnail); default: the
    label.
    """
    show = thumb or (lambda i, label: label)
    ex = query_examples(img, cap, cap2img, n_queries, top_k)
    k_img, k_cap = min(top_k, img.shape[0]), min(top_k, cap.shape[0])

    t2i_cols = ["caption", "ground truth", "rank of ground truth"]
    t2i_cols += [f"top {r + 1}" for r in range(k_img)]
    t2i_rows = []
    for e in ex["text_to_image"]:
        g = e.truth[0]
        picks = [show(i, _mark(item_names[i], h)) for i, h in zip(e.top, e.hits, strict=True)]
        t2i_rows.append([captions[e.query], show(g, item_names[g]), e.rank + 1, *picks])

    i2t_cols = ["image", "a ground-truth caption", "best rank of its captions"]
    i2t_cols += [f"top {r + 1}" for r in range(k_cap)]
    i2t_rows = []
    for e in ex["image_to_text"]:
        picks = [_mark(captions[j], h) for j, h in zip(e.top, e.hits, strict=True)]
        first = captions[e.truth[0]]
        i2t_rows.append([show(e.query, item_names[e.query]), first, e.rank + 1, *picks])
    return {"text_to_image": (t2i_cols, t2i_rows), "image_to_text": (i2t_cols, i2t_rows)}
