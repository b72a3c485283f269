"""Hinge triplet ranking loss of VSE++ / VSE∞ (REFERENCE.md §3), ``loss=triplet``.

Scores ``S = img · capᵀ`` over a batch of matching (image, caption) pairs; the diagonal holds the
positives. Both retrieval directions use the hinge ``[α + S_neg − S_pos]₊``:

- caption retrieval (image i queries captions): ``[α + S[i, j] − S[i, i]]₊``;
- image retrieval (caption j queries images):   ``[α + S[i, j] − S[j, j]]₊``.

Hardest negatives (VSE++) keep only the largest violation per query; all negatives ("VSE0") sum
every term. The reduction is a **sum** over the batch, as in the released code: its learning rates
assume it, so a mean would silently change the effective step size by the batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpo_lit.dist import gather_no_grad, gather_with_grad
from gpo_lit.losses.base import LossOutput, PairEmbeddings, RetrievalLoss, StepInfo


class TripletLoss(RetrievalLoss):
    """Bidirectional hinge triplet loss with margin, summed over the batch.

    Args:
        margin: α, the hinge margin (0.2 in the paper).
        all_negatives_epochs: epochs ``0 .. all_negatives_epochs-1`` use all negatives (warm-up);
            later epochs use the hardest negative. ``hardest_for_epoch`` answers which.
        mask_same_image: also exclude off-diagonal pairs whose images are the same (two captions
            of one image in a batch) — they are positives, not negatives. Off by default because
            the released code does not do it; needs ``img_ids`` in ``forward``.
        gather: under DDP, gather embeddings (with gradients) and image ids from every rank so
            negatives come from the *global* batch, as the paper's single-process DataParallel
            training does; every rank then computes the same loss over the global batch (see
            :func:`gpo_lit.dist.gather_with_grad` for why the gradients come out exact). False:
            each rank's negatives are its local batch only.
    """

    def __init__(
        self,
        margin: float = 0.2,
        all_negatives_epochs: int = 1,
        mask_same_image: bool = False,
        gather: bool = False,
    ) -> None:
        super().__init__(gather=gather)
        self.margin = float(margin)
        self.all_negatives_epochs = int(all_negatives_epochs)
        self.mask_same_image = bool(mask_same_image)

    def training_loss(self, batch: PairEmbeddings, step: StepInfo) -> LossOutput:
        """All negatives before ``all_negatives_epochs``, then the hardest (logged as
        ``hardest_negatives``)."""
        hardest = self.hardest_for_epoch(step.epoch)
        value = self(batch.img, batch.cap, batch.img_ids, hardest=hardest)
        return LossOutput(
            value,
            {
                "hardest_negatives": float(hardest),
                "negative_pool": float(self.negative_pool(batch.batch_size)),
            },
        )

    def hardest_for_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) uses hardest negatives; earlier epochs use all negatives."""
        return epoch >= self.all_negatives_epochs

    def forward(
        self,
        img: Tensor,
        cap: Tensor,
        img_ids: Tensor | None = None,
        hardest: bool = True,
    ) -> Tensor:
        """Loss for a batch of matching pairs.

        Args:
            img: ``[B, d]`` image embeddings (l2-normalised upstream).
            cap: ``[B, d]`` caption embeddings; row i matches ``img[i]``.
            img_ids: ``[B]`` image identity per pair; used only when ``mask_same_image``.
            hardest: hardest negative per query (VSE++) if True, else the sum over all negatives.

        Returns:
            scalar tensor (sum over the batch of both directions).
        """
        if img.dim() != 2 or img.shape != cap.shape:
            raise ValueError(
                f"TripletLoss: expected img and cap of equal shape [B, d], got {tuple(img.shape)} and {tuple(cap.shape)}"
            )
        if self.gather:
            img, cap = gather_with_grad(img), gather_with_grad(cap)
            if img_ids is not None:
                img_ids = gather_no_grad(img_ids.to(img.device))
        scores = img @ cap.t()  # [B, B] (B global when gathering)
        pos = scores.diagonal()
        cost_cap = (self.margin + scores - pos.unsqueeze(1)).clamp(min=0)  # row i: image i's query
        cost_img = (self.margin + scores - pos.unsqueeze(0)).clamp(
            min=0
        )  # column j: caption j's query

        mask = self._positive_mask(scores.shape[0], img_ids, scores.device)
        cost_cap = cost_cap.masked_fill(mask, 0)
        cost_img = cost_img.masked_fill(mask, 0)

        if hardest:
            # Masked entries are 0 and every hinge is >= 0, so a row with no valid negative gives 0.
            return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
        return cost_cap.sum() + cost_img.sum()

    def _positive_mask(self, b: int, img_ids: Tensor | None, device: torch.device) -> Tensor:
        """``[B, B]`` bool, True where a pair is not a negative (diagonal, optionally same image)."""
        mask = torch.eye(b, dtype=torch.bool, device=device)
        if self.mask_same_image:
            if img_ids is None:
                # Silently skipping would train on false negatives while claiming to mask them.
                raise ValueError("TripletLoss(mask_same_image=True) needs img_ids in forward()")
            if img_ids.shape != (b,):
                raise ValueError(
                    f"TripletLoss: expected img_ids of shape [{b}], got {tuple(img_ids.shape)}"
                )
            img_ids = img_ids.to(device)
            mask |= img_ids.unsqueeze(0) == img_ids.unsqueeze(1)
        return mask
