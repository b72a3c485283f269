"""Mixed-sample augmentation of raw images for PCME++ (REFERENCE.md §12).

Each image i of a training batch is, with probability ``p`` (0.25), mixed with image ``B − 1 − i``
(the batch reversed): by Mixup (``λ·x_i + (1 − λ)·x_{B−1−i}``) or, with probability
``cutmix_prob`` (0.5), by CutMix (a box of image ``B − 1 − i`` pasted into image i), with
``λ ~ Beta(α, α)``, α = 2. CutMix's box follows the usual recipe: side ratio ``√(1 − λ)``, centre
uniform over the image, clipped at the borders, and λ is then corrected to the fraction of image i
left visible. Captions are unchanged; the loss turns ``(λ_i, id of image B − 1 − i)`` into soft
targets (``gpo_lit.losses.base.match_targets``).

The model applies it (``loss.mixing``) to the batch's raw images before the visual encoder, in
training only; under DDP each rank mixes within its local batch (as the released code does, one
mixing per GPU), while the soft targets reach the gathered loss through the partners' image ids. It needs raw images: precomputed feature sets (regions, grid cells, frames) cannot
be mixed this way and get a one-line error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.errors import GpoLitError, expect


class MixedSampleAugment(nn.Module):
    """Per-image Mixup / CutMix with the reversed batch.

    Args:
        p: probability that an image is mixed at all.
        cutmix_prob: probability that a mixed image uses CutMix (else Mixup).
        alpha: λ ~ Beta(alpha, alpha), for both.
    """

    def __init__(self, p: float = 0.25, cutmix_prob: float = 0.5, alpha: float = 2.0) -> None:
        super().__init__()
        expect(0 <= p <= 1, "loss.mixing.p", "a probability in [0, 1]", p)
        expect(
            0 <= cutmix_prob <= 1, "loss.mixing.cutmix_prob", "a probability in [0, 1]", cutmix_prob
        )
        expect(alpha > 0, "loss.mixing.alpha", "a number > 0", alpha)
        self.p = float(p)
        self.cutmix_prob = float(cutmix_prob)
        self.alpha = float(alpha)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images ``[B, C, H, W]`` → (mixed images, ``λ [B]`` (1 = unmixed), ``partner [B]``).

        ``partner[i] = B − 1 − i``: the batch position of the image mixed into image i. Random
        numbers come from the global torch RNG on ``images.device`` (seeded by the trainer).
        """
        if images.dim() != 4:
            raise GpoLitError(
                f"loss.mixing: expected raw images [B, C, H, W] to mix (an image data set, e.g. "
                f"data=f30k_images), found features of shape {tuple(images.shape)}; precomputed "
                f"sets cannot be mixed: set loss.mixing=null"
            )
        b, _, h, w = images.shape
        dev = images.device
        mixed = torch.rand(b, device=dev) < self.p
        cut = torch.rand(b, device=dev) < self.cutmix_prob
        a = torch.tensor(self.alpha, device=dev)
        lam = torch.distributions.Beta(a, a).sample((b,))
        partner = torch.arange(b - 1, -1, -1, device=dev)
        other = images[partner]

        # CutMix box: side ratio √(1 − λ), centre uniform, clipped to the image.
        ratio = (1 - lam).sqrt()
        half_h = (h * ratio).floor().long() // 2
        half_w = (w * ratio).floor().long() // 2
        cy = torch.randint(0, h, (b,), device=dev)
        cx = torch.randint(0, w, (b,), device=dev)
        y0, y1 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
        x0, x1 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
        rows = torch.arange(h, device=dev)[None, :]
        cols = torch.arange(w, device=dev)[None, :]
        in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])  # [B, H]
        in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # [B, W]
        box = in_rows[:, :, None] & in_cols[:, None, :]  # [B, H, W]
        lam_cut = 1 - ((y1 - y0) * (x1 - x0)).to(lam.dtype) / (h * w)

        use_cut = mixed & cut
        use_mixup = mixed & ~cut
        lam_x = lam.to(images.dtype)[:, None, None, None]
        out = torch.where(
            use_mixup[:, None, None, None], lam_x * images + (1 - lam_x) * other, images
        )
        out = torch.where((use_cut[:, None, None] & box)[:, None], other, out)
        final = torch.where(use_cut, lam_cut, torch.where(use_mixup, lam, torch.ones_like(lam)))
        return out, final, partner

    def extra_repr(self) -> str:
        return f"p={self.p}, cutmix_prob={self.cutmix_prob}, alpha={self.alpha}"
