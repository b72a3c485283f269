"""ECCV Caption and CxC protocols on COCO ``testall`` (REFERENCE §11), scored by ``eccv-caption``.

The PyPI package ``eccv-caption`` ships the positive lists and computes the metrics; gpo_lit only
feeds it each query's top-500 list (COCO ids ranked by similarity, :func:`topk_lists`, ties
ordered against the protocol's own positives) and reports its fractions as percentages:

- ``eccv``: ``i2t_map_at_r``, ``i2t_rprecision``, ``i2t_r1`` and the same with ``t2i_`` (over
  the 1,261 image / 1,332 caption queries ECCV annotates);
- ``cxc``: ``i2t_r1``, ``i2t_r5``, ``i2t_r10``, ``t2i_r1``, ``t2i_r5``, ``t2i_r10``.

Both rank the whole 5K / 25K gallery. The COCO ids of the split's images and captions come from
the CxC annotation files (``cxc_annots/testall_ids.txt``: one image id per caption line,
``cxc_annots/testall_capids.txt``: the caption ids), checked against the split and the package.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.prepared import PreparedEmbeddings
from gpo_lit.metrics.topk import topk_lists_multi

TOP_K = 500  # the list length eccv-caption's authors evaluate with (PCME / PCME++)
ANNOTS_DIR = "cxc_annots"
IMG_IDS_FILE = "testall_ids.txt"
CAP_IDS_FILE = "testall_capids.txt"
SOURCE = (
    "the CxC annotation files of the VSE-infinity / PCME++ releases (cxc_annots/testall_ids.txt, "
    "cxc_annots/testall_capids.txt; put cxc_annots/ next to the COCO precomp/ folder, e.g. "
    "data/coco/cxc_annots, or set evaluation.coco_ids)"
)
PACKAGE_METRICS = {
    "eccv": (("eccv_map_at_r", "map_at_r"), ("eccv_rprecision", "rprecision"), ("eccv_r1", "r1")),
    "cxc": (("cxc_r1", "r1"), ("cxc_r5", "r5"), ("cxc_r10", "r10")),
}


@dataclass(frozen=True)
class CocoIds:
    """COCO ids of a split's items: ``img`` int64 [n_img], ``cap`` int64 [n_cap]; ``source`` names
    the files they were read from (for messages)."""

    img: np.ndarray
    cap: np.ndarray
    source: str = "coco ids"


def find_ids_dir(given: str | os.PathLike | None, data_root: str | os.PathLike | None) -> Path:
    """The folder holding ``testall_ids.txt`` and ``testall_capids.txt``.

    ``given`` (``evaluation.coco_ids``): that folder or one holding ``cxc_annots/``; else
    ``<data_root>/cxc_annots``, then ``<data_root>/../cxc_annots`` (the authors' layout puts it
    beside ``precomp/``). A one-line error names the files and where they come from.
    """
    if given:
        bases = [Path(given)]
    elif data_root is not None:
        bases = [Path(data_root), Path(data_root).parent]
    else:
        bases = []
    tried = []
    for base in bases:
        for folder in (base, base / ANNOTS_DIR) if given else (base / ANNOTS_DIR,):
            tried.append(folder)
            if (folder / CAP_IDS_FILE).is_file():
                return folder
    where = " or ".join(str(t / CAP_IDS_FILE) for t in tried) or "no folder (no data root)"
    raise GpoLitError(
        f"evaluation.coco_ids: expected the COCO ids of testall for the eccv / cxc protocols, "
        f"found no {where}; they come from {SOURCE}"
    )


def _read_int_lines(path: Path, n: int) -> np.ndarray:
    from gpo_lit.data.formats.base import read_lines  # the one text-line reader

    lines = read_lines(path, "id")
    if len(lines) != n:
        raise GpoLitError(f"{path}: expected {n} ids (one per caption), found {len(lines)}")
    try:
        return np.array([int(s) for s in lines], dtype=np.int64)
    except ValueError:
        bad = next(s for s in lines if not s.lstrip("-").isdigit())
        raise GpoLitError(f"{path}: expected integer COCO ids, found {bad!r}") from None


def read_coco_ids(
    folder: str | os.PathLike,
    cap2img: Any,
    image_ids: Sequence[str] | None = None,
) -> CocoIds:
    """Read and check the COCO ids of a split from ``folder`` (see :func:`find_ids_dir`).

    cap2img: int [n_cap]; ``testall_capids.txt`` holds one caption id per caption and
    ``testall_ids.txt`` (optional when ``image_ids`` is given: the split's own ids, e.g. precomp
    ``testall_ids.txt``) one image id per caption line. Every image's captions must share one
    image id, distinct images distinct ids, and both sources must agree.
    """
    folder = Path(folder)
    c2i = np.asarray(cap2img, dtype=np.int64)
    n_cap, n_img = len(c2i), int(c2i.max()) + 1 if len(c2i) else 0
    cap_path, img_path = folder / CAP_IDS_FILE, folder / IMG_IDS_FILE
    cap = _read_int_lines(cap_path, n_cap)
    if len(np.unique(cap)) != n_cap:
        raise GpoLitError(f"{cap_path}: expected distinct caption ids, found repeated ones")
    split_ids = None
    if image_ids is not None:
        try:
            split_ids = np.array([int(s) for s in image_ids], dtype=np.int64)
        except ValueError:
            split_ids = None  # non-numeric ids (not COCO): the CxC file decides
    if img_path.is_file():
        per_cap = _read_int_lines(img_path, n_cap)
        img = np.full(n_img, -1, dtype=np.int64)
        img[c2i] = per_cap
        bad = np.flatnonzero(img[c2i] != per_cap)
        if bad.size:
            raise GpoLitError(
                f"{img_path}: expected one image id for all captions of an image (the split's "
                f"caption order), found several for image {int(c2i[bad[0]])} (line {bad[0] + 1})"
            )
        if split_ids is not None and not np.array_equal(split_ids, img):
            found = f"{len(split_ids)} split ids for {n_img} images"
            if len(split_ids) == n_img:
                first = int(np.flatnonzero(split_ids != img)[0])
                found = (
                    f"{int((split_ids != img).sum())} images with another id (first: image "
                    f"{first}, {img[first]} here, {split_ids[first]} in the split)"
                )
            raise GpoLitError(
                f"{img_path}: expected the image ids of the split's own ids file, in its order, "
                f"found {found}"
            )
        source = f"{img_path}, {cap_path}"
    elif split_ids is not None and len(split_ids) == n_img:
        img, source = split_ids, f"the split's image ids, {cap_path}"
    else:
        raise GpoLitError(
            f"{img_path}: expected the image id of every caption (the split has no numeric image "
            f"ids), found no such file; it comes from {SOURCE}"
        )
    if len(np.unique(img)) != n_img:
        raise GpoLitError(f"{source}: expected distinct image ids, found repeated ones")
    return CocoIds(img, cap, source)


@functools.lru_cache(maxsize=1)
def _package() -> Any:
    """``eccv_caption.Metrics()`` (positive lists loaded once per process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson": it falls back to json
        try:
            from eccv_caption import Metrics
        except ImportError:
            raise GpoLitError(
                "protocols: expected the eccv-caption package for eccv / cxc, found it not "
                "installed (pip install eccv-caption)"
            ) from None
        return Metrics()


def _check_ids(m: Any, ids: CocoIds, cap2img: np.ndarray) -> None:
    """The ids must be the package's COCO 5K test split, each caption with its own image."""
    ours, theirs = set(ids.cap.tolist()), set(int(c) for c in m.coco_ids)
    if ours != theirs:
        raise GpoLitError(
            f"{ids.source}: expected the {len(theirs)} caption ids of the COCO 5K test split "
            f"(eccv-caption's coco_test_ids), found {len(ours - theirs)} others"
        )
    c2i = m.coco_gts["t2i"]
    img_of_cap = dict(zip(ids.cap.tolist(), ids.img[cap2img].tolist(), strict=True))
    wrong = [c for c, i in img_of_cap.items() if c2i[c][0] != i]
    if wrong:
        raise GpoLitError(
            f"{ids.source}: expected each caption's own COCO image, found {len(wrong)} captions "
            f"paired with another image (first: caption {wrong[0]})"
        )


def _positives(
    gts: dict[int, list[int]], q_index: dict[int, int], g_index: dict[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(q_index[q], g_index[g]) for q, gs in gts.items() for g in gs if g in g_index]
    arr = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def package_metrics(
    p: PreparedEmbeddings,
    ids: CocoIds,
    protocols: Sequence[str] = ("eccv", "cxc"),
    shard_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """``{protocol: metrics}`` for ``eccv`` / ``cxc`` from eccv-caption on top-500 lists.

    p: prepared embeddings of the COCO 5K test split (5,000 images, 25,000 captions); ids: their
    COCO ids (:func:`read_coco_ids`). Values in percent.
    """
    m = _package()
    if len(ids.img) != p.n_img or len(ids.cap) != p.n_cap:
        raise GpoLitError(
            f"{ids.source}: expected ids of {p.n_img} images and {p.n_cap} captions, found "
            f"{len(ids.img)} and {len(ids.cap)}"
        )
    _check_ids(m, ids, p.cap2img.cpu().numpy())
    img_ids, cap_ids = ids.img.tolist(), ids.cap.tolist()
    img_index = {c: i for i, c in enumerate(img_ids)}
    cap_index = {c: j for j, c in enumerate(cap_ids)}
    for proto in protocols:
        if proto not in PACKAGE_METRICS:
            raise GpoLitError(f"protocol: expected eccv or cxc, found {proto!r}")
    directions = {
        "i2t": (img_ids, cap_ids, img_index, cap_index),
        "t2i": (cap_ids, img_ids, cap_index, img_index),
    }
    lists: dict[str, dict[str, dict[int, list[int]]]] = {proto: {} for proto in protocols}
    for d, (q_ids, g_ids, q_index, g_index) in directions.items():
        gts = [(m.eccv_gts if proto == "eccv" else m.cxc_gts)[d] for proto in protocols]
        pos = [_positives(g, q_index, g_index) for g in gts]
        tops = topk_lists_multi(p, d, TOP_K, pos, shard_size=shard_size)
        g_arr = np.asarray(g_ids, dtype=np.int64)
        first = g_arr[tops[0].cpu().numpy()].tolist()
        for proto, top in zip(protocols, tops, strict=True):
            # The lists differ only where ties met positives: share the rest (15M ints each).
            same = (top == tops[0]).all(dim=1).tolist()
            rows = [
                a if s else g_arr[t].tolist()
                for a, s, t in zip(first, same, top.cpu().numpy(), strict=True)
            ]
            lists[proto][d] = dict(zip(q_ids, rows, strict=True))
    out: dict[str, dict[str, float]] = {}
    for proto in protocols:
        # eccv: 0.1.0 computes R-Precision only when mAP@R is asked for too (asked here);
        # cxc: "cxc_recalls" gives cxc_r1 / _r5 / _r10 for Ks.
        names = [n for n, _ in PACKAGE_METRICS[proto]] if proto == "eccv" else ["cxc_recalls"]
        with contextlib.redirect_stderr(io.StringIO()):  # its ECCV loop shows a tqdm bar
            scores = m.compute_all_metrics(
                lists[proto]["i2t"], lists[proto]["t2i"], names, Ks=(1, 5, 10), verbose=False
            )
        out[proto] = {
            f"{d}_{key}": 100.0 * float(scores[name][d])
            for d in ("i2t", "t2i")
            for name, key in PACKAGE_METRICS[proto]
        }
    return out
