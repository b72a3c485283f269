"""The CPU GRU (gpo_lit.encoders.gru_cpu) against torch's packed nn.GRU: outputs and every
gradient, in float64, over random lengths (1 and the maximum included)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gpo_lit.encoders.gru_cpu import bigru_padded, packed_order, supports_padded
from gpo_lit.encoders.text_gru import BiGRUTextEncoder
from gpo_lit.pooling import create_pooling


def _packed_reference(gru: torch.nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(gru(packed)[0], batch_first=True)[0]


def _outputs_and_grads(fn, params: list[torch.Tensor], seed: int = 1):
    for p in params:
        p.grad = None
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("batch,width", [(1, 1), (7, 5), (16, 13)])
def test_bigru_padded_equals_packed_gru(batch: int, width: int) -> None:
    torch.manual_seed(batch)
    gru = torch.nn.GRU(6, 4, 1, batch_first=True, bidirectional=True).double()
    x = torch.randn(batch, width + 2, 6, dtype=torch.float64, requires_grad=True)  # extra padding
    lengths = torch.randint(1, width + 1, (batch,))
    lengths[0] = width
    lengths[-1] = 1 if batch > 1 else width
    params = [x, *gru.parameters()]
    assert supports_padded(gru, x)
    want, want_g = _outputs_and_grads(lambda: _packed_reference(gru, x, lengths), params)
    got, got_g = _outputs_and_grads(lambda: bigru_padded(gru, x, lengths), params)
    assert got.shape == want.shape == (batch, width, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # padding is zero, and padded inputs get no gradient
    valid = torch.arange(width)[None] < lengths[:, None]
    assert (got[~valid] == 0).all()
    assert (got_g[0][:, width:] == 0).all()


def test_packed_order_is_torchs_packing() -> None:
    lengths = torch.tensor([3, 5, 1, 5, 2])
    at_f, at_r, sizes = packed_order(lengths)
    ref = pack_padded_sequence(
        torch.arange(5 * 5).view(5, 5, 1).float(), lengths, batch_first=True, enforce_sorted=False
    )
    assert sizes == ref.batch_sizes.tolist() == [5, 4, 3, 2, 2]
    assert sorted(at_f.tolist()) == sorted(ref.data.view(-1).long().tolist())
    # reverse rows read each sequence from its last element: step 0 holds every last element
    last = {b * 5 + int(n) - 1 for b, n in enumerate(lengths)}
    assert set(at_r[: sizes[0]].tolist()) == last


@pytest.mark.parametrize("vocab", [20, 4000])  # word table (V < tokens) and per-token projection
def test_text_encoder_same_with_and_without_cpu_recurrence(vocab: int) -> None:
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=vocab, word_dim=10, embed_dim=6).double()
    ids = torch.randint(0, vocab, (12, 9))
    lengths = torch.randint(1, 10, (12,))
    lengths[2] = 9
    runs = []
    for fast in (True, False):
        enc.cpu_recurrence = fast
        runs.append(_outputs_and_grads(lambda: enc(ids, lengths)[0], list(enc.parameters())))
    (a, ga), (b, gb) = runs
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gpo_cpu_kernels_equal_the_default_path() -> None:
    """GPO with ``cpu_kernels`` (generator through pooling.gru_scan; the default) equals the
    authors' nn.GRU path (``cpu_kernels=False``): pooled output and every gradient (a float64
    module, tie-free input)."""
    torch.manual_seed(0)
    slow_gpo = create_pooling(name="gpo", dim=5, cpu_kernels=False).double()
    fast_gpo = create_pooling(name="gpo", dim=5, cpu_kernels=True).double()
    fast_gpo.load_state_dict(slow_gpo.state_dict())
    x = torch.randn(6, 8, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([8, 1, 3, 8, 5, 2])
    fast = _outputs_and_grads(lambda: fast_gpo(x, lengths), [x, *fast_gpo.parameters()])
    slow = _outputs_and_grads(lambda: slow_gpo(x, lengths), [x, *slow_gpo.parameters()])
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(fast[1], slow[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_bigru_unpacked_equals_packed_gru(layers: int) -> None:
    """The accelerator path (no host lengths: each direction one GRU call over the padded batch,
    the reverse one within each length) gives packing's outputs and every gradient, on the CPU
    in float64; past each length zeros, and the padding's inputs get no gradient."""
    from gpo_lit.encoders.text_gru import bigru_unpacked

    torch.manual_seed(layers)
    gru = torch.nn.GRU(6, 4, layers, batch_first=True, bidirectional=True).double()
    x = torch.randn(9, 7, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([7, 1, 3, 7, 5, 2, 6, 4, 1])
    params = [x, *gru.parameters()]
    want, want_g = _outputs_and_grads(lambda: _packed_reference(gru, x, lengths), params)
    got, got_g = _outputs_and_grads(lambda: bigru_unpacked(gru, x, lengths), params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    valid = torch.arange(7)[None] < lengths[:, None]
    assert (got[~valid] == 0).all() and (got_g[0][~valid] == 0).all()
