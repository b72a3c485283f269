"""Symmetric InfoNCE with a learnable logit scale (REFERENCE.md §12).

``logits = s · img · capᵀ`` (cosines: the embeddings are l2-normalised upstream); the loss is the
cross-entropy of each image over the captions and of each caption over the images, each a mean
over its queries, averaged over the two directions. Two parameterisations of the scale s:

- ``scale: linear`` (PCME++'s release): s itself is the parameter, initialised to 1, unclamped;
- ``scale: log`` (CLIP's): the parameter is log s, initialised to log(1/0.07), and s is kept at
  most 100 by clamping the parameter to [0, log 100] (before each use, which is the same as
  clamping it after each optimiser step, as CLIP and open_clip do).

The scale trains without weight decay (it lives under ``loss_fn.``; ``optim.no_weight_decay``).
Under DDP, ``gather`` brings every rank's embeddings (with exact gradients); then either every rank
computes the full global loss (``local_loss: false``), or only its own queries against the global
gallery (``local_loss: true``, open_clip's option and PCME++'s distributed InfoNCE: less compute;
DDP's gradient averaging gives the same gradients, the logged loss is the rank's share).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpo_lit.errors import expect
from gpo_lit.losses.base import (
    LossOutput,
    PairEmbeddings,
    RetrievalLoss,
    StepInfo,
    local_rows,
)


class InfoNCELoss(RetrievalLoss):
    """Bidirectional InfoNCE over a batch of matching pairs.

    Args:
        scale: ``linear`` (s is the parameter; PCME++) or ``log`` (log s is; CLIP).
        init_scale: initial s (PCME++: 1; CLIP: 1/0.07).
        max_scale: s is clamped to at most this (CLIP: 100; None: unclamped). With ``log`` the
            parameter is also kept ≥ 0 (s ≥ 1), as CLIP does.
        learnable: train s (False: a constant).
        mask_same_image: exclude other captions of a query's image (same id) from its negatives
            (not in the released code; off by default).
        gather: negatives from the global batch under DDP (see :class:`RetrievalLoss`).
        local_loss: with ``gather``, each rank's loss covers its own queries only.
    """

    def __init__(
        self,
        scale: Literal["linear", "log"] = "linear",
        init_scale: float = 1.0,
        max_scale: float | None = None,
        learnable: bool = True,
        mask_same_image: bool = False,
        gather: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__(gather=gather)
        expect(scale in ("linear", "log"), "loss.scale", "'linear' or 'log'", repr(scale))
        expect(init_scale > 0, "loss.init_scale", "a number > 0", init_scale)
        expect(
            max_scale is None or max_scale >= init_scale,
            "loss.max_scale",
            f"null or a number >= init_scale ({init_scale})",
            max_scale,
        )
        self.kind = scale
        self.max_scale = None if max_scale is None else float(max_scale)
        init = math.log(init_scale) if scale == "log" else float(init_scale)
        param = torch.tensor([init], dtype=torch.float32)
        if learnable:
            self.scale_param = nn.Parameter(param)
        else:
            self.register_buffer("scale_param", param)
        self.mask_same_image = bool(mask_same_image)
        self.local_loss = bool(local_loss)

    def logit_scale(self) -> Tensor:
        """s, a 1-element tensor (clamping the parameter in place first, if bounded)."""
        if self.kind == "log":
            if self.max_scale is not None:
                with torch.no_grad():
                    self.scale_param.clamp_(0.0, math.log(self.max_scale))
            return self.scale_param.exp()
        if self.max_scale is not None:
            with torch.no_grad():
                self.scale_param.clamp_(max=self.max_scale)
        return self.scale_param

    def forward(self, batch: PairEmbeddings) -> Tensor:
        """Scalar loss of a batch (gathered across ranks first when ``gather``)."""
        b = batch.batch_size
        full = batch.gathered() if self.gather else batch
        scale = self.logit_scale().to(full.img.dtype)
        n = full.batch_size
        rows = local_rows(b, n) if self.local_loss else slice(0, n)
        labels = torch.arange(n, device=full.img.device)[rows]
        img_logits = scale * (full.img[rows] @ full.cap.t())  # image queries × all captions
        cap_logits = scale * (full.cap[rows] @ full.img.t())  # caption queries × all images
        if self.mask_same_image:
            ids = full.img_ids.to(full.img.device)
            other = (ids[rows, None] == ids[None, :]) & (
                labels[:, None] != torch.arange(n, device=ids.device)[None, :]
            )
            img_logits = img_logits.masked_fill(other, float("-inf"))
            cap_logits = cap_logits.masked_fill(other, float("-inf"))
        return (F.cross_entropy(img_logits, labels) + F.cross_entropy(cap_logits, labels)) / 2

    def training_loss(self, batch: PairEmbeddings, step: StepInfo) -> LossOutput:
        value = self(batch)
        return LossOutput(
            value,
            {
                "logit_scale": self.logit_scale().detach()[0],  # a tensor: no device sync
                "negative_pool": float(self.negative_pool(batch.batch_size)),
            },
        )
