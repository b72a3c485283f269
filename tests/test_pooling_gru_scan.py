"""GPO's CPU BiGRU (``gpo_lit.pooling.gru_scan``) against ``nn.GRU`` and finite differences."""

from __future__ import annotations

import pytest
import torch

from gpo_lit.pooling.gru_scan import _GRUScan, bigru_states


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_bigru_states_and_gradients_equal_nn_gru(dtype, steps):
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 4, batch_first=True, bidirectional=True).to(dtype)
    inp = torch.randn(3, steps, 6, dtype=dtype, requires_grad=True)
    tol = {"rtol": 0, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    want, got = gru(inp)[0], bigru_states(gru, inp)
    torch.testing.assert_close(got, want, **tol)
    gout = torch.randn_like(want)
    wrt = [inp, *gru.parameters()]
    for a, b in zip(
        torch.autograd.grad(got, wrt, gout), torch.autograd.grad(want, wrt, gout), strict=True
    ):
        torch.testing.assert_close(a, b, **tol)


def test_scan_gradcheck():
    g = torch.Generator().manual_seed(1)
    for steps in (1, 5):
        x = torch.randn(steps, 3, 2 * 4, generator=g, dtype=torch.float64, requires_grad=True)
        w_ih, w_hh = (
            torch.randn(2, 9, k, generator=g, dtype=torch.float64, requires_grad=True)
            for k in (4, 3)
        )
        b_ih, b_hh = (
            torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2)
        )
        assert torch.autograd.gradcheck(_GRUScan.apply, (x, w_ih, b_ih, w_hh, b_hh))
