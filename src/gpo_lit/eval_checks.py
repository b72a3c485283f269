"""What an evaluation needs, checked before anything is embedded: protocol sizes and COCO ids.

Opening a split reads headers and text files only, so ``make eval … protocols=[coco_5k]`` on a
1,000-image split, or ``protocols=[eccv]`` without the CxC id files, fails in one line at once
instead of after embedding (and after a whole training run, for ``gpo-train``).
"""

from __future__ import annotations

from typing import Any

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.eccv import CocoIds, find_ids_dir, read_coco_ids
from gpo_lit.metrics.protocols import check_size, get_protocol


def stage_protocols(eval_cfg: dict, stage: str) -> list[str]:
    """The protocols a ``val`` / ``test`` stage evaluates."""
    if stage == "val":
        return [eval_cfg["val_protocol"]]
    return list(eval_cfg["test_protocols"])


def coco_ids_for(eval_cfg: dict, data_root: Any, split: Any) -> CocoIds:
    """The COCO ids of ``split`` (``evaluation.coco_ids``, else found beside ``data_root``)."""
    folder = find_ids_dir(eval_cfg.get("coco_ids"), data_root)
    return read_coco_ids(folder, split.cap2img, getattr(split, "image_ids", None))


def check_protocols(
    eval_cfg: dict, stage: str, split: Any, split_name: str, data_root: Any
) -> CocoIds | None:
    """Check the protocols of one stage against its opened split (a reader); the split's COCO
    ids when a test protocol needs them (eccv, cxc), else None. One-line GpoLitError otherwise."""
    protocols = [get_protocol(p) for p in stage_protocols(eval_cfg, stage)]
    where = f"split '{split_name}' of {data_root}"
    for proto in protocols:
        check_size(proto, split.n_images, where)
    package = [p.name for p in protocols if p.package]
    if package and stage == "val":
        raise GpoLitError(
            f"evaluation.val_protocol: expected a protocol scored from ranks (full, f30k_1k, "
            f"coco_5k, coco_1k), found {package[0]} (a COCO testall protocol: test only)"
        )
    return coco_ids_for(eval_cfg, data_root, split) if package else None


def check_evaluation(
    eval_cfg: dict, datamodule: Any, stages: tuple[str, ...] = ("test",)
) -> CocoIds | None:
    """:func:`check_protocols` for each stage of a :class:`RetrievalDataModule`; the test
    split's COCO ids when needed."""
    ids = None
    for stage in stages:
        split = datamodule.eval_split(stage)
        got = check_protocols(eval_cfg, stage, split, datamodule.splits[stage], datamodule.root)
        ids = got if got is not None else ids
    return ids
