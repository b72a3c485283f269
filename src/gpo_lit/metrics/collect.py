"""Evaluation embeddings accumulated across ranks and ranked once per evaluation.

:class:`RetrievalEmbeddings` is a torchmetrics ``Metric``: each step adds ``(dataset index,
embedding)`` of a batch of images or captions to list states that torchmetrics concatenates
across ranks (``dist_reduce_fx="cat"``); :meth:`RetrievalEmbeddings.compute` de-duplicates by
index (``DistributedSampler`` pads a split by repeating items) and ranks with the exact sharded
ranker of :mod:`gpo_lit.metrics.protocols`. Every rank computes the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from gpo_lit.metrics.protocols import evaluate, evaluate_protocols, get_protocol

if TYPE_CHECKING:
    from gpo_lit.metrics.eccv import CocoIds

log = logging.getLogger(__name__)
IMAGES, CAPTIONS = 0, 1  # the evaluation loaders (``dataloader_idx``)
Results = dict[str, dict[str, float]]


def deduplicate(idx: Tensor, emb: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows ``[n, d]`` of items ``0..n-1`` from ``idx`` ``[m]`` and ``emb`` ``[m, d]`` (an index
    that arrives twice keeps its first row), and which items arrived (``[n]`` bool; the rows of
    the others are NaN)."""
    m = idx.shape[0]
    order = torch.arange(m, device=idx.device)
    first = torch.full((n,), m, dtype=torch.long, device=idx.device)
    first.scatter_reduce_(0, idx.long(), order, reduce="amin")
    seen = first < m
    out = emb.new_full((n, emb.shape[-1]), float("nan"))
    out[seen] = emb[first[seen]]
    return out, seen


def embedded_subset(
    img: Tensor, cap: Tensor, cap2img: Tensor, img_seen: Tensor, cap_seen: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The part of a split that an evaluation on limited batches embedded, renumbered.

    Kept: the embedded captions whose image was embedded, and the embedded images with at least
    one kept caption (an image without a caption has no ground truth to rank). So image→text
    queries rank exactly the kept captions and text→image queries exactly the kept images.

    img: ``[n_img, d]``, cap: ``[n_cap, d]``, cap2img: ``[n_cap]`` image of each caption,
    img_seen / cap_seen: ``[n_img]`` / ``[n_cap]`` bool. Returns ``img[m_img]``, ``cap[m_cap]``
    and ``cap2img[m_cap]`` indexing the kept images (in their original order).
    """
    keep_cap = cap_seen & img_seen[cap2img]
    keep_img = torch.zeros_like(img_seen)
    keep_img[cap2img[keep_cap]] = True
    new_index = torch.cumsum(keep_img.long(), 0) - 1
    return img[keep_img], cap[keep_cap], new_index[cap2img[keep_cap]]


@dataclass(frozen=True)
class RankingTask:
    """What ranking one evaluation split needs besides its embeddings.

    cap2img: ``[n_captions]`` image of each caption; ``coco_ids``: called only when a package
    protocol (eccv, cxc) scores the whole split; ``limited``: the trainer embeds only part of the
    split (limited batches), so a partial evaluation ranks what was embedded instead of failing.
    """

    n_images: int
    n_captions: int
    cap2img: Any
    protocols: tuple[str, ...]
    shard_size: int = 1024
    ties: str = "pessimistic"
    coco_ids: Callable[[], CocoIds | None] | None = None
    limited: bool = False


@dataclass(frozen=True)
class RankedEmbeddings:
    """The embeddings an evaluation ranked: img ``[n_img, d]``, cap ``[n_cap, d]``, cap2img
    ``[n_cap]``. ``subset``: limited batches ranked part of the split (rows renumbered, not the
    split's items)."""

    img: Tensor
    cap: Tensor
    cap2img: Tensor
    subset: bool = False


class RetrievalEmbeddings(Metric):
    """Image and caption embeddings of one evaluation, gathered from every rank.

    ``update(which, idx, emb)``: ``which`` :data:`IMAGES` or :data:`CAPTIONS`, ``idx`` ``[B]``
    dataset indices, ``emb`` ``[B, d]``. Set :attr:`task` before :meth:`compute`, which returns
    ``{protocol: metrics}`` and keeps what it ranked in :attr:`ranked`; ``reset()`` after each
    evaluation.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(compute_with_cache=False, **kwargs)  # the task may change between calls
        for name in ("img_idx", "img_emb", "cap_idx", "cap_emb"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.task: RankingTask | None = None
        self.ranked: RankedEmbeddings | None = None

    def update(self, which: int, idx: Tensor, emb: Tensor) -> None:
        prefix = "img" if which == IMAGES else "cap"
        getattr(self, f"{prefix}_idx").append(idx.detach().long())
        getattr(self, f"{prefix}_emb").append(emb.detach().float())

    def gathered(self, which: int, n: int) -> tuple[Tensor, Tensor]:
        """:func:`deduplicate` of one modality's states (inside ``compute``: every rank's)."""
        prefix = "img" if which == IMAGES else "cap"
        idx = dim_zero_cat(getattr(self, f"{prefix}_idx"))
        emb = dim_zero_cat(getattr(self, f"{prefix}_emb"))
        return deduplicate(idx.to(emb.device), emb, n)

    def compute(self) -> Results:
        task = self.task
        if task is None:
            raise RuntimeError("RetrievalEmbeddings.compute: set .task first")
        img, img_seen = self.gathered(IMAGES, task.n_images)
        cap, cap_seen = self.gathered(CAPTIONS, task.n_captions)
        cap2img = torch.as_tensor(task.cap2img, device=img.device)
        subset = not bool(img_seen.all() and cap_seen.all())
        if subset:
            if not task.limited:
                raise RuntimeError(
                    f"evaluation embedded {int(img_seen.sum())} of {task.n_images} images and "
                    f"{int(cap_seen.sum())} of {task.n_captions} captions"
                )
            img, cap, cap2img = embedded_subset(img, cap, cap2img, img_seen, cap_seen)
        self.ranked = RankedEmbeddings(img, cap, cap2img, subset)
        shard, ties = task.shard_size, task.ties
        if subset:
            # Fold protocols (coco_1k) need the whole split: the subset is ranked at once;
            # eccv / cxc score the whole COCO testall only: no subset figure for them.
            whole = evaluate(img, cap, cap2img, "full", shard, ties)
            whole.update(n_images=float(img.shape[0]), n_captions=float(cap.shape[0]))
            return {p: dict(whole) for p in task.protocols if not get_protocol(p).package}
        ids = None
        if task.coco_ids is not None and any(get_protocol(p).package for p in task.protocols):
            ids = task.coco_ids()
        return evaluate_protocols(img, cap, cap2img, list(task.protocols), shard, ties, ids)
