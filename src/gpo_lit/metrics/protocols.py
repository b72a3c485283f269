"""Evaluation protocols by name (REFERENCE §6, §11): the whole split, a mean over folds, or the
ECCV Caption / CxC positives of COCO testall.

``full`` ranks the whole split at once, any size. ``f30k_1k`` (1,000 images) and ``coco_5k``
(5,000 images) do the same but refuse any other size. ``coco_1k`` is the MEAN over 5 contiguous
folds of 1,000 images (images 1000f … 1000f+999 with their captions, wherever those captions sit),
every metric averaged over the folds — never the first fold alone. ``eccv`` and ``cxc`` score
top-500 lists of the 5,000 COCO testall images with the ``eccv-caption`` package
(:mod:`gpo_lit.metrics.eccv`); they need the split's COCO ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.prepared import EmbeddingsLike, check_ties, prepare_embeddings
from gpo_lit.metrics.ranks import ranks_from_prepared
from gpo_lit.metrics.retrieval import recall_metrics

if TYPE_CHECKING:
    from gpo_lit.metrics.eccv import CocoIds


@dataclass(frozen=True)
class Protocol:
    """All images at once (``n_folds is None``) or the mean over contiguous image folds.

    n_images: the number of images the protocol is defined on (None: any); ``package``: scored
    by eccv-caption on top-K lists (needs COCO ids) instead of from ranks.
    """

    name: str
    n_folds: int | None = None
    fold_size: int | None = None
    n_images: int | None = None
    package: bool = False

    @property
    def expected_images(self) -> int | None:
        if self.n_folds is not None and self.fold_size is not None:
            return self.n_folds * self.fold_size
        return self.n_images


def folds(n_folds: int, fold_size: int, name: str | None = None) -> Protocol:
    """Mean over ``n_folds`` contiguous folds of ``fold_size`` images each."""
    if n_folds < 1 or fold_size < 1:
        raise GpoLitError(
            f"folds: expected positive n_folds and fold_size, found {n_folds}, {fold_size}"
        )
    return Protocol(name or f"folds{n_folds}x{fold_size}", n_folds, fold_size)


PROTOCOLS: dict[str, Protocol] = {
    "full": Protocol("full"),
    "f30k_1k": Protocol("f30k_1k", n_images=1000),
    "coco_5k": Protocol("coco_5k", n_images=5000),
    "coco_1k": folds(5, 1000, "coco_1k"),
    "eccv": Protocol("eccv", n_images=5000, package=True),
    "cxc": Protocol("cxc", n_images=5000, package=True),
}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """A Protocol from its name (or itself); unknown names raise a one-line GpoLitError."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise GpoLitError(f"protocol: expected one of {', '.join(PROTOCOLS)}, found {protocol!r}")
    return PROTOCOLS[protocol]


def check_size(protocol: str | Protocol, n_images: int, where: str = "") -> Protocol:
    """Refuse (one line) a split whose size the protocol is not defined on; ``where`` names the
    split in the message. Cheap: call it before embedding anything."""
    proto = get_protocol(protocol)
    expected = proto.expected_images
    if expected is not None and n_images != expected:
        how = (
            f"{proto.n_folds} folds × {proto.fold_size}"
            if proto.n_folds is not None
            else "COCO testall"
            if expected == 5000
            else "Flickr30K test"
            if expected == 1000
            else ""
        )
        raise GpoLitError(
            f"protocol {proto.name}: expected {expected} images ({how}), found {n_images}"
            + (f" in {where}" if where else "")
            + " (protocol full ranks a split of any size)"
        )
    return proto


def evaluate(
    img: EmbeddingsLike,
    cap: EmbeddingsLike,
    cap2img: Any,
    protocol: str | Protocol = "full",
    shard_size: int = 1024,
    ties: str = "pessimistic",
    coco_ids: CocoIds | None = None,
) -> dict[str, float]:
    """Retrieval metrics (see ``recall_metrics``) of embeddings under a protocol.

    img: [n_img, d] or a list (ensemble: similarities averaged); cap: [n_cap, d] likewise;
    cap2img: int [n_cap]. Fold protocols average every metric over the folds. ``ties``:
    ``"pessimistic"`` (a candidate scoring equal to the ground truth counts against the query) or
    ``"optimistic"`` (only candidates strictly above count); see ``gpo_lit.metrics.ranks``.
    ``eccv`` / ``cxc`` need ``coco_ids`` (:func:`gpo_lit.metrics.eccv.read_coco_ids`).
    """
    name = get_protocol(protocol).name
    return evaluate_protocols(img, cap, cap2img, [protocol], shard_size, ties, coco_ids)[name]


def evaluate_protocols(
    img: EmbeddingsLike,
    cap: EmbeddingsLike,
    cap2img: Any,
    protocols: Sequence[str | Protocol],
    shard_size: int = 1024,
    ties: str = "pessimistic",
    coco_ids: CocoIds | None = None,
) -> dict[str, dict[str, float]]:
    """``{protocol name: metrics}`` for several protocols, validating the inputs once. The
    package protocols (``eccv``, ``cxc``) always order ties against the query."""
    protos = [get_protocol(p) for p in protocols]
    check_ties(ties)
    prep = prepare_embeddings(img, cap, cap2img)  # validates once, incl. ≥ 1 caption per image
    for proto in protos:
        check_size(proto, prep.n_img)
    package = [p.name for p in protos if p.package]
    if package and coco_ids is None:
        raise GpoLitError(
            f"protocol {package[0]}: expected the split's COCO ids (cxc_annots/testall_ids.txt, "
            "testall_capids.txt), found none given"
        )
    scored: dict[str, dict[str, float]] = {}
    if package and coco_ids is not None:
        from gpo_lit.metrics.eccv import package_metrics

        scored = package_metrics(prep, coco_ids, package, shard_size)
    out: dict[str, dict[str, float]] = {}
    whole = None  # full / f30k_1k / coco_5k rank the same split: count once
    for proto in protos:
        if proto.package:
            out[proto.name] = scored[proto.name]
        elif proto.n_folds is None:
            whole = whole or recall_metrics(*ranks_from_prepared(prep, shard_size, ties))
            out[proto.name] = dict(whole)
        else:
            assert proto.fold_size is not None  # folds() sets both
            per_fold = []
            for f in range(proto.n_folds):
                fold = prep.fold(f * proto.fold_size, (f + 1) * proto.fold_size)
                per_fold.append(recall_metrics(*ranks_from_prepared(fold, shard_size, ties)))
            out[proto.name] = {k: sum(m[k] for m in per_fold) / len(per_fold) for k in per_fold[0]}
    return out
