"""An ensemble's members: saved embeddings of one split, checked to share it. Ranking them is
:func:`gpo_lit.metrics.protocols.evaluate_protocols` on the lists (similarity matrices averaged
before ranking, REFERENCE §6); ``gpo-eval ckpt=[a,b]`` and ``python -m gpo_lit.metrics a.npz
b.npz`` both load through :func:`load_members`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.embeddings_io import load_embeddings


def load_members(paths: Sequence[str | os.PathLike]) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Every member's ``img`` ``[n_img, d_i]`` and ``cap`` ``[n_cap, d_i]`` and their shared
    ``cap2img`` ``[n_cap]``; one line naming the first member of another split (an ensemble
    ranks one split)."""
    loaded = [load_embeddings(p) for p in paths]
    img0, cap0, cap2img = loaded[0]
    for path, (img, cap, c2i) in zip(paths[1:], loaded[1:], strict=True):
        if img.shape[0] != img0.shape[0] or not torch.equal(c2i, cap2img):
            raise GpoLitError(
                f"{path}: expected the same split as {paths[0]} ({img0.shape[0]} images, "
                f"{cap0.shape[0]} captions, the same caption → image map), found "
                f"{img.shape[0]} images, {cap.shape[0]} captions or another caption → image map"
            )
    return [img for img, _, _ in loaded], [cap for _, cap, _ in loaded], cap2img
