"""Visual encoder for precomputed region features (BUTD, 36 × 2048 per image)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from gpo_lit.encoders.mlp import MLP
from gpo_lit.pooling.base import valid_mask


class RegionEncoder(nn.Module):
    """``Linear(D_in → d)`` plus a residual 2-layer MLP ``D_in → hidden → d`` (REFERENCE §2).

    Returns the projected *set*; pooling and l2-normalisation happen in the model.

    Args:
        in_dim: region feature width (2048 for BUTD).
        embed_dim: joint embedding width d.
        mlp_hidden: hidden width of the residual MLP (512 in the paper).
        residual_mlp: add the MLP branch (the released ``precomp_enc_type=basic``); False = FC only.
        mask_batchnorm: exclude padded regions from the MLP's BatchNorm statistics (the released
            code includes them; off by default).
    """

    def __init__(
        self,
        in_dim: int = 2048,
        embed_dim: int = 1024,
        mlp_hidden: int = 512,
        residual_mlp: bool = True,
        mask_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.mlp = MLP(in_dim, mlp_hidden, embed_dim, 2, mask_batchnorm) if residual_mlp else None
        self.in_dim = in_dim
        # Xavier-uniform FC with zero bias, as the released code initialises it.
        r = math.sqrt(6.0) / math.sqrt(in_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """feats ``[B, N, D_in]`` (padded), lengths ``[B]`` → (``[B, N, d]``, lengths)."""
        out = self.fc(feats)
        if self.mlp is not None:
            mask = valid_mask(lengths, feats.shape[1]) if self.mlp.mask_batchnorm else None
            out = out + self.mlp(feats, mask)
        return out, lengths
