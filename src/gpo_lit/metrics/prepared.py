"""Validated retrieval inputs: embeddings (one model or an ensemble), the caption→image map, and
the tie rule, checked once and put in the one-matmul form the ranker and the top-K lists share.

An ensemble (lists of embeddings) averages the models' similarity matrices: it ranks their sum,
one matmul of the concatenated embeddings (the mean's order without an inexact 1/M, which could
split a tie of the mean one rounding step apart, in the query's favour as often as not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError, expect

EmbeddingsLike = Tensor | np.ndarray | Sequence[Tensor | np.ndarray]

TIES = ("pessimistic", "optimistic")  # ties count against the query / in its favour


def check_ties(ties: object) -> str:
    """``ties`` itself if it names a tie rule of :data:`TIES`, else a one-line GpoLitError."""
    expect(ties in TIES, "ties", " or ".join(TIES), repr(ties))
    return str(ties)


@dataclass(frozen=True)
class PreparedEmbeddings:
    """Validated inputs of one (ensemble) evaluation, on one device in one float dtype.

    img: [n_img, K] and cap: [n_cap, K] are the models' embeddings concatenated along the width,
    so ``img @ cap.T`` is the sum of the M models' similarity matrices (ranked as their mean).
    cap2img: int64 [n_cap], every image has ≥ 1 caption.
    """

    img: Tensor
    cap: Tensor
    cap2img: Tensor
    n_models: int

    @property
    def n_img(self) -> int:
        return self.img.shape[0]

    @property
    def n_cap(self) -> int:
        return self.cap.shape[0]

    def fold(self, start: int, stop: int) -> PreparedEmbeddings:
        """Images [start, stop) with their captions (any order), captions re-indexed to the fold."""
        sel = ((self.cap2img >= start) & (self.cap2img < stop)).nonzero().squeeze(1)
        return PreparedEmbeddings(
            self.img[start:stop], self.cap[sel], self.cap2img[sel] - start, self.n_models
        )


def _as_tensor_list(x: Any, name: str) -> list[Tensor]:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    expect(len(items) > 0, name, "a tensor or a non-empty list of tensors", "an empty list")
    out = []
    for m, t in enumerate(items):
        where = name if len(items) == 1 else f"{name}[{m}]"
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(t)
        expect(isinstance(t, Tensor), where, "a tensor or numpy array", type(t).__name__)
        expect(
            t.dim() == 2 and t.shape[1] >= 1,
            where,
            f"a 2-D array [n_{name}, d] with d >= 1",
            f"shape {tuple(t.shape)}",
        )
        expect(
            t.is_floating_point() and not t.is_complex(),
            where,
            "a floating-point array",
            f"dtype {t.dtype}",
        )
        out.append(t.detach())
    return out


def _check_finite(t: Tensor, where: str) -> None:
    # A row sum is NaN/inf whenever an entry is (or, rarely, on overflow): one cheap pass, then
    # the exact per-entry test only to name the rows.
    if bool(torch.isfinite(t.sum(dim=1)).all()):
        return
    bad = (~torch.isfinite(t)).any(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        raise GpoLitError(
            f"{where}: expected finite values, found NaN/inf in {rows.numel()} rows "
            f"(first: row {int(rows[0])})"
        )


def prepare_embeddings(
    img: EmbeddingsLike, cap: EmbeddingsLike, cap2img: Any
) -> PreparedEmbeddings:
    """Validate shapes, dtypes, the caption→image map and finiteness; build the ensemble matmul form.

    img: [n_img, d_m] per model (Tensor, ndarray or a list = ensemble); cap: [n_cap, d_m] likewise;
    cap2img: integer [n_cap]. Half precision is promoted to float32; float64 is kept. Everything
    goes to the device of the first image tensor.
    """
    imgs, caps = _as_tensor_list(img, "img"), _as_tensor_list(cap, "cap")
    expect(
        len(imgs) == len(caps),
        "img/cap",
        "the same number of ensemble members",
        f"{len(imgs)} and {len(caps)}",
    )
    n_img, n_cap = imgs[0].shape[0], caps[0].shape[0]
    expect(n_img > 0, "img", "at least one image", "0 rows")
    expect(n_cap > 0, "cap", "at least one caption", "0 rows")
    many = len(imgs) > 1
    for m, (im, ca) in enumerate(zip(imgs, caps, strict=True)):
        sfx = f"[{m}]" if many else ""
        expect(im.shape[0] == n_img, f"img{sfx}", f"{n_img} rows as img[0]", im.shape[0])
        expect(ca.shape[0] == n_cap, f"cap{sfx}", f"{n_cap} rows as cap[0]", ca.shape[0])
        expect(
            ca.shape[1] == im.shape[1],
            f"cap{sfx}",
            f"embedding width {im.shape[1]} (as img{sfx})",
            ca.shape[1],
        )

    dtype = torch.float64 if any(t.dtype == torch.float64 for t in imgs + caps) else torch.float32
    device = imgs[0].device

    if isinstance(cap2img, np.ndarray):
        cap2img = torch.from_numpy(cap2img)
    elif not isinstance(cap2img, Tensor):
        cap2img = torch.as_tensor(cap2img)
    expect(
        not cap2img.is_floating_point()
        and not cap2img.is_complex()
        and cap2img.dtype != torch.bool,
        "cap2img",
        "an integer array",
        f"dtype {cap2img.dtype}",
    )
    expect(
        tuple(cap2img.shape) == (n_cap,),
        "cap2img",
        f"shape ({n_cap},) (one image index per caption)",
        f"shape {tuple(cap2img.shape)}",
    )
    cap2img = cap2img.to(device=device, dtype=torch.int64)
    lo, hi = int(cap2img.min()), int(cap2img.max())
    expect(lo >= 0, "cap2img", f"indices in [0, {n_img})", f"min {lo}")
    expect(hi < n_img, "cap2img", f"indices in [0, {n_img})", f"max {hi}")
    missing = (torch.bincount(cap2img, minlength=n_img) == 0).nonzero().squeeze(1)
    if missing.numel():
        raise GpoLitError(
            f"cap2img: expected at least one caption per image, found {missing.numel()} images "
            f"without (first: image {int(missing[0])})"
        )

    imgs = [t.to(device=device, dtype=dtype) for t in imgs]
    caps = [t.to(device=device, dtype=dtype) for t in caps]
    for m, (im, ca) in enumerate(zip(imgs, caps, strict=True)):
        sfx = f"[{m}]" if many else ""
        _check_finite(im, f"img{sfx}")
        _check_finite(ca, f"cap{sfx}")
    if many:
        img_cat = torch.cat(imgs, dim=1)
        cap_cat = torch.cat(caps, dim=1)
    else:
        img_cat, cap_cat = imgs[0], caps[0]
    _check_no_overflow(img_cat, cap_cat)
    return PreparedEmbeddings(img_cat, cap_cat, cap2img, len(imgs))


def _check_no_overflow(img: Tensor, cap: Tensor) -> None:
    """Refuse embeddings whose inner products could overflow: an overflowing product of finite
    embeddings is inf or NaN (inf - inf), and a NaN similarity would never count against a query.
    Every partial sum of ⟨a, b⟩ is at most d·max|a|·max|b| (no copy: max and min only)."""

    def top(t: Tensor) -> float:
        return max(float(t.amax()), -float(t.amin()))

    a, b, d = top(img), top(cap), img.shape[1]
    limit = torch.finfo(img.dtype).max / 4  # room for the matmul's rounding
    if a * b * d > limit:
        raise GpoLitError(
            f"img/cap: expected embeddings whose inner products cannot overflow {img.dtype} "
            f"(d·max|img|·max|cap| <= {limit:.3g}), found max|img| = {a:.3g}, max|cap| = "
            f"{b:.3g} at d = {d} (normalise them)"
        )
