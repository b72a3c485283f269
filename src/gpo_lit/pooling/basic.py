"""Fixed pooling operators: max, mean and K-max over the valid part of a padded set."""

from __future__ import annotations

from torch import Tensor

from gpo_lit.errors import expect
from gpo_lit.pooling.base import Pooling, SetMask, register_pooling, valid_mask


@register_pooling("max")
class MaxPooling(Pooling):
    """Per-dimension maximum over valid elements: ``[B, N, D] -> [B, D]``."""

    def __init__(self, *, dim: int) -> None:
        super().__init__(dim=dim)

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        # masked_fill (not arithmetic) so inf/NaN garbage in the padding cannot leak.
        return x.masked_fill(mask.pad, float("-inf")).amax(dim=1)


@register_pooling("mean")
class MeanPooling(Pooling):
    """Mean over valid elements (accumulated in fp32): ``[B, N, D] -> [B, D]``."""

    def __init__(self, *, dim: int) -> None:
        super().__init__(dim=dim)

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        return x.masked_fill(mask.pad, 0.0).sum(dim=1) / mask.counts(x.dtype)


@register_pooling("kmax")
class KMaxPooling(Pooling):
    """Mean of the ``k`` largest values per dimension: ``[B, N, D] -> [B, D]``.

    A set shorter than ``k`` averages all its elements (``k_i = min(k, length_i)``).
    """

    def __init__(self, *, dim: int, k: int = 2) -> None:
        super().__init__(dim=dim)
        expect(isinstance(k, int) and k >= 1, "kmax pooling k", "an int >= 1", k)
        self.k = k

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}"

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        kk = min(self.k, x.shape[1])
        # Padding is -inf so it ranks last; the first k_i ranks are then all valid.
        top = x.masked_fill(mask.pad, float("-inf")).topk(kk, dim=1).values  # [B, kk, D]
        k_i = mask.lengths.clamp(max=kk)  # [B]
        top = top.masked_fill(~valid_mask(k_i, kk).unsqueeze(-1), 0.0)
        return top.sum(dim=1) / k_i.unsqueeze(1).to(x.dtype)
