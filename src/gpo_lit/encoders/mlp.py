"""The 2-layer MLP of the region encoder, laid out like the released code (``layers``/``bns``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear → BatchNorm1d → ReLU → … → Linear`` applied to every element of a set.

    Like the released code it owns one BatchNorm per layer, the last of which is never applied
    (kept so the authors' ``mlp.bns.1.*`` checkpoint keys load).

    Args:
        in_dim, hidden_dim, out_dim: widths; ``num_layers`` ≥ 2.
        mask_batchnorm: compute BatchNorm statistics over valid elements only. The released code
            includes zero padding in the statistics; off by default to reproduce it.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        mask_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(i, o) for i, o in zip([in_dim] + hidden, hidden + [out_dim], strict=True)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(o) for o in hidden + [out_dim])
        # The last BatchNorm is never applied: freeze it so DDP finds no unused parameters.
        self.bns[-1].requires_grad_(False)
        self.out_dim = out_dim
        self.mask_batchnorm = mask_batchnorm

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x ``[B, N, in_dim]``, mask ``[B, N]`` (True = valid) → ``[B, N, out_dim]``."""
        b, n, _ = x.shape
        h = x.reshape(b * n, -1)
        flat_mask = mask.reshape(-1) if (mask is not None and self.mask_batchnorm) else None
        last = len(self.layers) - 1
        for i, (layer, bn) in enumerate(zip(self.layers, self.bns, strict=True)):
            h = layer(h)
            if i < last:
                h = torch.relu(self._bn(bn, h, flat_mask))
        return h.reshape(b, n, self.out_dim)

    @staticmethod
    def _bn(bn: nn.Module, h: Tensor, flat_mask: Tensor | None) -> Tensor:
        if flat_mask is None:
            return bn(h)
        out = torch.zeros_like(h)
        out[flat_mask] = bn(h[flat_mask])
        return out
