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
    img0, _, cap2img = loaded[0]
    for path, (img, _, c2i) in zip(paths[1:], loaded[1:], strict=True):
        check_same_split(path, paths[0], (img0.shape[0], cap2img), (img.shape[0], c2i))
    return [img for img, _, _ in loaded], [cap for _, cap, _ in loaded], cap2img


def check_same_split(
    where: object, first: object, split0: tuple[int, Tensor], split: tuple[int, Tensor]
) -> None:
    """One line naming ``where`` unless its split ``(n_images, cap2img [n_cap])`` is that of the
    ensemble's first member ``first``: the same images, captions and caption → image map."""
    (n0, c0), (n, c) = split0, split
    if n != n0 or not torch.equal(c, c0):
        raise GpoLitError(
            f"{where}: expected the same split as {first} ({n0} images, {len(c0)} captions, "
            f"the same caption → image map), found {n} images, {len(c)} captions"
            + (" and another caption → image map" if n == n0 and len(c) == len(c0) else "")
        )
