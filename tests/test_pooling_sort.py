"""GPO's packed-key sort (``gpo_lit.pooling.gpo.sort_packed``) against a brute-force stable sort
and ``torch.sort``."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gpo_lit.errors import GpoLitError
from gpo_lit.pooling.gpo import _block_rows, sort_packed, sorted_weighted_sum


def _stable_reference(xt: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: each row's valid prefix sorted by (value, -0.0 before +0.0, position), the
    padding after it as 0 at its own positions."""
    values, positions = np.zeros_like(xt), np.zeros(xt.shape, dtype=np.int64)
    n = xt.shape[2]
    for b, m in enumerate(lengths):
        for d in range(xt.shape[1]):
            row = xt[b, d, :m]
            order = sorted(range(m), key=lambda j: (row[j], not np.signbit(row[j]), j))
            positions[b, d] = order + list(range(m, n))
            values[b, d, :m] = row[order]
    return values, positions


@pytest.mark.parametrize("n", [1, 2, 36, 257])
def test_sort_packed_values_positions_and_padding(n):
    # Ties (±0 and repeated values), denormals, infinities and values near float32's limits
    # come back exactly, ties by position (a stable sort); padding (any garbage) stays after
    # each set's prefix, as +0.0, at its own positions.
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 70, generator=g)
    lengths = [max(1, n - 1), n, (n + 1) // 2]
    x[1, :, :5], x[1, :, 5:9] = 0.0, -0.0
    x[1, ::2, 9:12] = 1.25  # repeated values
    x[2, 0] = 1e-40
    if n > 1:
        x[2, 1], x[1, 1, :3], x[0, 0, :3] = -1e-40, 3e38, -3e38
        x[1, 0, 20], x[1, 1, 21] = float("inf"), -float("inf")
        x[0, -1] = float("nan")  # padding of set 0
    values, idx = sort_packed(x, lengths)
    assert values.dtype == torch.float32 and idx.dtype == torch.int16
    want_values, want_idx = _stable_reference(x.transpose(1, 2).numpy(), lengths)
    np.testing.assert_array_equal(values.numpy(), want_values)
    np.testing.assert_array_equal(np.signbit(values.numpy()), np.signbit(want_values))
    np.testing.assert_array_equal(idx.numpy(), want_idx)


def test_sort_packed_of_a_strided_view_over_several_blocks():
    # A view of wider sets (how GPO passes x past theta's width), D = 1024 (rows a power of two
    # apart, the case the staged copy is for), enough sets for several blocks: the same values
    # and positions as a stable sort of the transposed view (no zeros to order by sign here).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 39, 1024, generator=g)[:, :36]
    x[::3, :, ::7] = 0.5  # ties
    lengths = torch.randint(1, 37, (40,), generator=g).tolist()
    assert _block_rows(40, 36 * 1024) < 40  # more than one block at any thread count here
    values, idx = sort_packed(x, lengths)
    pad = torch.arange(36)[None, None, :] >= torch.tensor(lengths)[:, None, None]
    xt = x.transpose(1, 2).masked_fill(pad, float("inf"))
    expected = xt.sort(dim=-1, stable=True)
    assert torch.equal(values, expected.values.masked_fill(pad, 0.0))
    assert torch.equal(idx.long(), expected.indices)


def test_sort_prefixes_sorts_each_set_over_its_own_prefix():
    # Lengths 0, 1 and the full width among them: numpy's sort of each prefix; the rest of every
    # row untouched, or set to the tail's entries.
    from gpo_lit.pooling.gpo import sort_prefixes_

    rng = np.random.default_rng(3)
    keys = rng.standard_normal((9, 111, 37))
    lengths = [37, 0, 1, 20, 5, 37, 36, 2, 30]
    want = keys.copy()
    for i, m in enumerate(lengths):
        want[i, :, :m] = np.sort(want[i, :, :m], axis=-1)
    got = keys.copy()
    sort_prefixes_(got, lengths)
    np.testing.assert_array_equal(got, want)
    tail = -np.arange(37.0) - 1
    for i, m in enumerate(lengths):
        want[i, :, m:] = tail[m:]
    sort_prefixes_(keys, lengths, tail)
    np.testing.assert_array_equal(keys, want)


def test_sort_packed_positions_past_int16():
    # Sets wider than 32768: int32 positions, from the key's low half, untouched by the value in
    # its high half.
    g = torch.Generator().manual_seed(5)
    n = 40_000
    x = (torch.randperm(2 * n * 3, generator=g).float() / 7 - n).view(2, n, 3)  # no ties
    lengths = [n, n - 7]
    values, idx = sort_packed(x, lengths)
    assert idx.dtype == torch.int32
    pad = torch.arange(n)[None, None, :] >= torch.tensor(lengths)[:, None, None]
    expected = x.transpose(1, 2).masked_fill(pad, float("inf")).sort(dim=-1)
    assert torch.equal(values, expected.values.masked_fill(pad, 0.0))
    assert torch.equal(idx.long(), expected.indices)
    # Through GPO's pooling step: the packed sort's gradient equals the argsort path's.
    valid = (~pad).transpose(1, 2)  # [B, N, 1]
    theta = torch.rand(2, n, generator=g).masked_fill(pad[:, 0], 0.0)
    grads = []
    for packed in (True, False):
        xg = x.clone().requires_grad_(True)
        sorted_weighted_sum(xg, theta, valid, packed).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])


def test_sort_packed_refuses_what_it_cannot_pack(monkeypatch):
    with pytest.raises(GpoLitError, match="sort_packed features"):
        sort_packed(torch.zeros(1, 2, 3, dtype=torch.float64), [2])
    with pytest.raises(GpoLitError, match="sort_packed set width"):
        sort_packed(torch.zeros(1, 1, 1).expand(1, 2**31 + 1, 1), [1])  # a view: no memory
    # Its keys are read back through int32 / int16 views (little-endian halves): on a big-endian
    # CPU it refuses, and GPO's pooling step takes the argsort path, with the same result.
    g = torch.Generator().manual_seed(2)
    x, theta = torch.randn(3, 5, 4, generator=g), torch.rand(3, 5, generator=g)
    valid = torch.ones(3, 5, 1, dtype=torch.bool)
    want = sorted_weighted_sum(x, theta, valid, False)
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(GpoLitError, match="sort_packed byte order"):
        sort_packed(x, [5, 5, 5])
    assert torch.equal(sorted_weighted_sum(x, theta, valid, True), want)


def test_packed_step_equals_the_argsort_step_and_keeps_padding_out():
    # The packed sort against the argsort path (no ties): the same x gradient bit for bit, the
    # output and θ's gradient to float32 rounding, against a float64 reference. θ that is NOT
    # zero on the padding, garbage padding and a gradient of 1e30: the padding reaches nothing.
    g = torch.Generator().manual_seed(7)
    b, n, d = 6, 11, 300
    lengths = torch.tensor([11, 1, 4, 7, 11, 2])
    valid = (torch.arange(n)[None] < lengths[:, None]).unsqueeze(-1)  # [B, N, 1]
    x = torch.randn(b, n, d, generator=g).masked_fill(~valid, 3e38)
    theta = torch.rand(b, n, generator=g)  # nonzero everywhere, padding included
    gout = torch.randn(b, d, generator=g) * 1e30
    runs = []
    for packed in (True, False):
        xg, tg = x.clone().requires_grad_(True), theta.clone().requires_grad_(True)
        out = sorted_weighted_sum(xg, tg, valid, packed)
        out.backward(gout)
        runs.append((out, xg.grad, tg.grad))
    (o1, gx1, gt1), (o2, gx2, gt2) = runs
    assert torch.equal(gx1, gx2) and (gx1[~valid.expand(-1, -1, d)] == 0).all()
    ref = torch.zeros(b, d, dtype=torch.float64)
    ref_gt = torch.zeros(b, n, dtype=torch.float64)
    for i, m in enumerate(lengths.tolist()):
        desc = x[i, :m].double().sort(dim=0, descending=True).values  # [m, D]
        ref[i] = theta[i, :m].double() @ desc
        ref_gt[i, :m] = desc @ gout[i].double()
    torch.testing.assert_close(o1.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(gt1).all() and (gt1[~valid[..., 0]] == 0).all()
    scale = 1e-5 * gout.abs().sum(dim=1, keepdim=True).double()  # fp32 sums over D = 300
    assert ((gt1.double() - ref_gt).abs() <= scale).all()
    assert ((gt2.double() - ref_gt).abs() <= scale).all()
