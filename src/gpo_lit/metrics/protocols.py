"""Evaluation protocols by name (REFERENCE §6): all images at once, or the mean over folds.

``full`` (aliases ``f30k_1k``, ``coco_5k``) ranks the whole split at once. ``coco_1k`` is the MEAN
over 5 contiguous folds of 1,000 images (images 1000f … 1000f+999 with their captions, wherever
those captions sit), every metric averaged over the folds — never the first fold alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.ranks import (
    EmbeddingsLike,
    check_ties,
    prepare_embeddings,
    ranks_from_prepared,
)
from gpo_lit.metrics.retrieval import recall_metrics


@dataclass(frozen=True)
class Protocol:
    """All images at once (``n_folds is None``) or the mean over contiguous image folds."""

    name: str
    n_folds: int | None = None
    fold_size: int | None = None


def folds(n_folds: int, fold_size: int, name: str | None = None) -> Protocol:
    """Mean over ``n_folds`` contiguous folds of ``fold_size`` images each."""
    if n_folds < 1 or fold_size < 1:
        raise GpoLitError(
            f"folds: expected positive n_folds and fold_size, found {n_folds}, {fold_size}"
        )
    return Protocol(name or f"folds{n_folds}x{fold_size}", n_folds, fold_size)


PROTOCOLS: dict[str, Protocol] = {
    "full": Protocol("full"),
    "f30k_1k": Protocol("f30k_1k"),
    "coco_5k": Protocol("coco_5k"),
    "coco_1k": folds(5, 1000, "coco_1k"),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A Protocol from its name (or itself); unknown names raise a one-line GpoLitError."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise GpoLitError(f"protocol: expected one of {', '.join(PROTOCOLS)}, found {protocol!r}")
    return PROTOCOLS[protocol]


def evaluate(
    img: EmbeddingsLike,
    cap: EmbeddingsLike,
    cap2img: Any,
    protocol: str | Protocol = "full",
    shard_size: int = 1024,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """Retrieval metrics (see ``recall_metrics``) of embeddings under a protocol.

    img: [n_img, d] or a list (ensemble: similarities averaged); cap: [n_cap, d] likewise;
    cap2img: int [n_cap]. Fold protocols average every metric over the folds. ``ties``:
    ``"pessimistic"`` (a candidate scoring equal to the ground truth counts against the query) or
    ``"optimistic"`` (only candidates strictly above count); see ``gpo_lit.metrics.ranks``.
    """
    proto = get_protocol(protocol)
    check_ties(ties)
    prep = prepare_embeddings(img, cap, cap2img)  # validates once, incl. ≥ 1 caption per image
    if proto.n_folds is None:
        return recall_metrics(*ranks_from_prepared(prep, shard_size, ties))

    expected = proto.n_folds * proto.fold_size
    if prep.n_img != expected:
        raise GpoLitError(
            f"protocol {proto.name}: expected {expected} images ({proto.n_folds} folds × "
            f"{proto.fold_size}), found {prep.n_img}"
        )
    per_fold = []
    for f in range(proto.n_folds):
        fold = prep.fold(f * proto.fold_size, (f + 1) * proto.fold_size)
        per_fold.append(recall_metrics(*ranks_from_prepared(fold, shard_size, ties)))
    return {key: sum(m[key] for m in per_fold) / len(per_fold) for key in per_fold[0]}
