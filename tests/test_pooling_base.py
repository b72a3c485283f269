"""The pooling contract lives in ``Pooling.forward`` once; operators implement only ``pool``."""

from __future__ import annotations

import pytest
import torch

from gpo_lit.errors import GpoLitError
from gpo_lit.pooling import Pooling, available_poolings, create_pooling
from gpo_lit.pooling.base import _REGISTRY, SetMask


class Probe(Pooling):
    """Records what ``pool`` is handed; returns the masked sum (unregistered: a test double)."""

    name = "probe"

    def __init__(self, *, dim: int) -> None:
        super().__init__(dim=dim)
        self.seen: list[tuple[torch.dtype, bool, SetMask]] = []

    def pool(self, x: torch.Tensor, mask: SetMask) -> torch.Tensor:
        self.seen.append((x.dtype, torch.is_autocast_enabled("cpu"), mask))
        return x.masked_fill(mask.pad, 0.0).sum(dim=1)


def test_every_operator_only_implements_its_arithmetic():
    for name in available_poolings():
        cls = _REGISTRY[name]
        assert cls.forward is Pooling.forward, name  # the checks, mask and casts are shared
        assert cls.pool is not Pooling.pool, name


def test_forward_checks_masks_and_casts_once():
    probe = Probe(dim=3)
    x = torch.randn(2, 4, 3).to(torch.bfloat16)
    lengths = torch.tensor([1, 4], dtype=torch.int32)
    x[0, 1:] = float("nan")  # padding garbage: the mask must hide it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probe(x, lengths)
    dtype, autocast_on, mask = probe.seen[-1]
    assert dtype == torch.float32 and not autocast_on  # fp32 arithmetic, autocast off
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()  # cast back
    assert mask.lengths.dtype == torch.int64 and mask.lengths.tolist() == [1, 4]
    assert mask.valid.tolist() == [[True, False, False, False], [True] * 4]
    assert torch.equal(mask.pad, ~mask.valid.unsqueeze(-1))
    assert mask.host is lengths  # CPU lengths are handed on for sync-free host reads
    torch.testing.assert_close(out.float(), torch.stack([x[0, 0], x[1].sum(0)]).float())
    probe(x.double(), lengths)
    assert probe.seen[-1][0] == torch.float64  # fp64 stays fp64
    for bad in ([0, 2], [1, 5]):
        with pytest.raises(GpoLitError, match="^probe pooling lengths: expected values in"):
            probe(x, torch.tensor(bad))
    with pytest.raises(GpoLitError, match="^probe pooling input: expected features"):
        probe(x[0], lengths)
    with pytest.raises(GpoLitError, match="return_weights: expected an operator with weights"):
        probe(x, lengths, return_weights=True)


def test_weights_come_back_in_their_own_dtype():
    for name in ("gpo", "attention"):
        pool = create_pooling(name, dim=3)
        out, weights = pool(torch.randn(2, 4, 3).to(torch.bfloat16), torch.tensor([2, 4]), True)
        assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32, name
        assert weights.shape == (2, 4) and (weights[0, 2:] == 0).all(), name
