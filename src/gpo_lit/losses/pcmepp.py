"""PCME++: probabilistic embeddings matched by a closed-form sampled distance (REFERENCE.md §12).

Each item is a Gaussian ``N(μ, diag σ²)``: the model's l2-normalised embedding is μ, its
uncertainty head gives ``log σ²`` (``uses_uncertainty``). For image i and caption j

    d(i, j) = ‖μ_i − μ_j‖² + Σ_k (σ²_{i,k} + σ²_{j,k})          (closed-form sampled distance)
    logit(i, j) = −a · d(i, j) + b                              (a = b = 5 at init, learnable)

and the loss over all B × B pairs of the (global) batch is

    2 · BCE(logits, T)                       (mean over pairs; both directions are the same)
    + α · (BCE(logits, T⁺ᵢ₂ₜ) + BCE(logitsᵀ, T⁺ₜ₂ᵢ))   (pseudo-positives, α = 0.1)
    + β · (KL_img + KL_cap)                  (KL(N(μ, σ²) ‖ N(0, I)), mean over batch and dims)

with targets T from :func:`gpo_lit.losses.base.match_targets` (the identity, pairs sharing an image
id, soft λ / 1 − λ for mixed images), smoothed as the released config does (``label_smoothing``:
``ε + (1 − 2ε)·T``). Pseudo-positives (per query, in each direction): every pair whose logit is at
least the logit of the query's labelled positive (the first column with the row's largest
target) is relabelled with that positive's target and the BCE recomputed; the released code does
so from the first step, with α constant (no schedule of its own). A KL term above
``kl_max`` is dropped for that step, as the released code does against blow-ups. Test similarity is
−d (``test_similarity: csd``) or the dot product of the means (``mean``).

``pseudo_positive_start_epoch: k`` (0 = released) leaves the pseudo-positive term out for the
first k epochs: a named deviation for towers trained from scratch. The release starts from
pretrained CLIP towers, where the labelled positive mostly outranks the rest of the batch; at
random init it outranks about half of it, so the term relabels ~B/2 unrelated pairs per query
and, with α·B/2 ≫ 1, outweighs the labelled positive (README, "CLIP-era demo").

``uncertainty: false`` is PCME++ μ-only: ``d = ‖μ_i − μ_j‖²``, no σ head and no KL term.

Differences from the released code, both deliberate: pairs sharing an image id stay positives when
images are mixed (the released code replaces its target matrix by the mixing one), and gathering
across ranks gives exactly the single-process loss over the global batch (the released code
matches local queries against the global gallery, and fills the other ranks' block of the target
matrix with the smoothing value, losing their same-id positives); ``local_loss: true`` keeps the
local-queries layout with exact targets.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpo_lit.errors import expect
from gpo_lit.losses.base import (
    LossOutput,
    PairEmbeddings,
    RetrievalLoss,
    Side,
    StepInfo,
    local_rows,
    match_targets,
)


def csd(mu_a: Tensor, var_a: Tensor | None, mu_b: Tensor, var_b: Tensor | None) -> Tensor:
    """``[A, B]`` closed-form sampled distance ``‖μ_a − μ_b‖² + Σσ²_a + Σσ²_b`` (σ² optional)."""
    sq = (
        mu_a.pow(2).sum(1, keepdim=True) + mu_b.pow(2).sum(1)[None, :] - 2 * (mu_a @ mu_b.t())
    ).clamp(min=0)
    if var_a is not None and var_b is not None:
        sq = sq + var_a.sum(1, keepdim=True) + var_b.sum(1)[None, :]
    return sq


def pseudo_positive_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """Relabel, per row, every pair scoring at least the row's labelled positive.

    The labelled positive of row i is the first column with the row's largest target; pairs
    whose logit is ≥ its logit get its target (a selection: no gradient flows through it).
    """
    best, first = targets.max(dim=1)
    pos_logit = logits.gather(1, first[:, None])
    return torch.where(logits >= pos_logit, best[:, None].expand_as(targets), targets)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(μ, σ²) ‖ N(0, I))`` per dimension, averaged over batch and dimensions."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()


class PCMEppLoss(RetrievalLoss):
    """The PCME++ objective (see the module docstring).

    Args:
        uncertainty: use σ (the model builds log σ² heads); False = PCME++ μ-only.
        init_negative_scale: a at init (5).
        init_shift: b at init (5).
        pseudo_positive: α, weight of the pseudo-positive term (0.1; 0 = off).
        pseudo_positive_start_epoch: the term is off in epochs before this one (0 = released:
            from the first step; a deviation for towers trained from scratch).
        kl_weight: β, weight of the KL regulariser (1e-4; only with ``uncertainty``).
        kl_max: a modality's KL above this is dropped for the step (released code: 1e4; None: off).
        label_smoothing: ε of the targets (released config: 1e-4).
        mixing: image mixing applied by the model before the visual encoder
            (:class:`gpo_lit.data.mixing.MixedSampleAugment`; None: off).
        test_similarity: ``csd`` (−d, REFERENCE) or ``mean`` (dot product of the means).
        mask_same_image: pairs sharing an image id are positives, never negatives (always, as
            REFERENCE §12 says; the option exists so experiments setting it work with any loss).
        gather: all pairs of the global batch under DDP (see :class:`RetrievalLoss`).
        local_loss: with ``gather``, each rank's loss covers its own queries only (same gradients).
    """

    def __init__(
        self,
        uncertainty: bool = True,
        init_negative_scale: float = 5.0,
        init_shift: float = 5.0,
        pseudo_positive: float = 0.1,
        pseudo_positive_start_epoch: int = 0,
        kl_weight: float = 1e-4,
        kl_max: float | None = 1e4,
        label_smoothing: float = 1e-4,
        mixing: nn.Module | None = None,
        test_similarity: Literal["csd", "mean"] = "csd",
        mask_same_image: bool = True,
        gather: bool = True,
        local_loss: bool = False,
    ) -> None:
        super().__init__(gather=gather)
        expect(
            mask_same_image is True,
            "loss.mask_same_image",
            "true (PCME++ treats pairs sharing an image id as positives)",
            mask_same_image,
        )
        expect(
            0 <= label_smoothing < 0.5,
            "loss.label_smoothing",
            "a number in [0, 0.5)",
            label_smoothing,
        )
        expect(
            test_similarity in ("csd", "mean"),
            "loss.test_similarity",
            "'csd' or 'mean'",
            repr(test_similarity),
        )
        expect(
            isinstance(pseudo_positive_start_epoch, int)
            and not isinstance(pseudo_positive_start_epoch, bool)
            and pseudo_positive_start_epoch >= 0,
            "loss.pseudo_positive_start_epoch",
            "an integer ≥ 0",
            repr(pseudo_positive_start_epoch),
        )
        self.uses_uncertainty = bool(uncertainty)
        self.negative_scale = nn.Parameter(torch.tensor([float(init_negative_scale)]))
        self.shift = nn.Parameter(torch.tensor([float(init_shift)]))
        self.pseudo_positive = float(pseudo_positive)
        self.pseudo_positive_start_epoch = pseudo_positive_start_epoch
        self.kl_weight = float(kl_weight)
        self.kl_max = None if kl_max is None else float(kl_max)
        self.label_smoothing = float(label_smoothing)
        self.mixing = mixing
        self.test_similarity = test_similarity
        self.local_loss = bool(local_loss)

    def logits(
        self, mu_a: Tensor, var_a: Tensor | None, mu_b: Tensor, var_b: Tensor | None
    ) -> Tensor:
        """``[A, B]`` match logits ``−a·d + b``."""
        d = csd(mu_a, var_a, mu_b, var_b)
        return -self.negative_scale.to(d.dtype) * d + self.shift.to(d.dtype)

    def forward(
        self, batch: PairEmbeddings, pseudo_positives: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss, its parts) for a batch, gathered across ranks first when ``gather``;
        ``pseudo_positives=False`` leaves that term out (its epochs before the start epoch)."""
        if self.uses_uncertainty:
            expect(
                batch.img_logvar is not None and batch.cap_logvar is not None,
                "loss",
                "log σ² of both modalities (the model's uncertainty heads) for PCME++",
                "none",
            )
        b = batch.batch_size
        full = batch.gathered() if self.gather else batch
        n = full.batch_size
        rows = local_rows(b, n) if self.local_loss else slice(0, n)
        lv_i, lv_c = (full.img_logvar, full.cap_logvar) if self.uses_uncertainty else (None, None)
        var_i = lv_i.exp() if lv_i is not None else None
        var_c = lv_c.exp() if lv_c is not None else None
        eps = self.label_smoothing
        targets = eps + (1 - 2 * eps) * match_targets(full)  # [n, n] image × caption
        # image queries (local rows) × every caption, caption queries × every image
        i2t = self.logits(full.img[rows], _rows(var_i, rows), full.cap, var_c)
        if self.local_loss:
            t2i = self.logits(full.cap[rows], _rows(var_c, rows), full.img, var_i)
        else:  # d is symmetric: the caption queries' logits are the transpose
            t2i = i2t.t()
        t_i2t, t_t2i = targets[rows], targets.t()[rows]
        bce = F.binary_cross_entropy_with_logits
        match = bce(i2t, t_i2t) + bce(t2i, t_t2i)  # = 2·BCE over all pairs when not local
        value = match
        parts = {"match": match.detach()}
        if self.pseudo_positive and pseudo_positives:
            pp_i2t = pseudo_positive_targets(i2t.detach(), t_i2t)
            pp_t2i = pseudo_positive_targets(t2i.detach(), t_t2i)
            pp = bce(i2t, pp_i2t) + bce(t2i, pp_t2i)
            value = value + self.pseudo_positive * pp
            parts["pseudo_positive"] = pp.detach()
            # pairs whose target the term changed, per query (both directions)
            relabelled = (pp_i2t != t_i2t).sum() + (pp_t2i != t_t2i).sum()
            parts["relabelled_per_query"] = relabelled / (2 * i2t.shape[0])
        if lv_i is not None and lv_c is not None and self.kl_weight:
            kl = self._kl(full.img[rows], lv_i[rows]) + self._kl(full.cap[rows], lv_c[rows])
            value = value + self.kl_weight * kl
            parts["kl"] = kl.detach()
        return value, parts

    def _kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        kl = kl_to_standard_normal(mu, logvar)
        if self.kl_max is None:
            return kl
        return torch.where(kl.detach() > self.kl_max, torch.zeros_like(kl), kl)  # no device sync

    def training_loss(self, batch: PairEmbeddings, step: StepInfo) -> LossOutput:
        value, parts = self(batch, step.epoch >= self.pseudo_positive_start_epoch)
        relabelled = parts.pop("relabelled_per_query", None)
        logs: dict[str, float | Tensor] = {f"loss_{k}": v for k, v in parts.items()}
        if relabelled is not None:  # not a loss part: logged beside them
            logs["pseudo_positives_per_query"] = relabelled
        logs["negative_scale"] = self.negative_scale.detach()[0]  # tensors: no device sync
        logs["shift"] = self.shift.detach()[0]
        if self.uses_uncertainty and batch.img_logvar is not None and batch.cap_logvar is not None:
            logs["img_logvar_mean"] = batch.img_logvar.detach().mean()
            logs["cap_logvar_mean"] = batch.cap_logvar.detach().mean()
        logs["negative_pool"] = float(self.negative_pool(batch.batch_size))
        return LossOutput(value, logs)

    def retrieval_vectors(self, mean: Tensor, logvar: Tensor | None, side: Side) -> Tensor:
        """Vectors whose inner product is −d (``csd``) or μ·μ (``mean``).

        ``−d(i, j) = 2 μ_i·μ_j − (‖μ_i‖² + s_i) − (‖μ_j‖² + s_j)`` with ``s = Σ_k σ²_k``, i.e. the
        inner product of image ``[μ, −(‖μ‖² + s), 1]`` and caption ``[2μ, 1, −(‖μ‖² + s)]``.
        μ-only models (no σ) use ``s = 0``.
        """
        if self.test_similarity == "mean":
            return mean
        s = logvar.exp().sum(1) if logvar is not None else mean.new_zeros(mean.shape[0])
        offset = -(mean.pow(2).sum(1) + s)[:, None]
        one = torch.ones_like(offset)
        if side == "img":
            return torch.cat([mean, offset, one], dim=1)
        return torch.cat([2 * mean, one, offset], dim=1)


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    return None if t is None else t[rows]
