"""GPO's weight generator BiGRU on the CPU, with a hand-written backward through time.

The generator runs a 32-wide GRU over a few hundred ranks for a handful of rows: a few tiny ops per
step, where ``nn.GRU`` on the CPU records every step's ops for autograd and its backward replays
them one by one (most of GPO's cost at small batches). Here the forward is ONE ``torch.gru`` call
recording nothing: the two directions become one GRU of twice the width whose weights are
block-diagonal per gate (so each half sees only its own direction; the same products and
additions as ``nn.GRU``, so the same numbers). The backward recomputes the gates of every step
from the states at once, then runs one loop of two ops per step (the GRU's analytic gradient as
one product), and the weight gradients as single products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.threads import one_thread


def _per_gate_block_diag(a: Tensor, b: Tensor) -> Tensor:
    """``a, b [3H, K]`` (gates r, z, n stacked) -> ``[3·2H, 2K]``: per gate, ``a``'s rows read
    the first K inputs and ``b``'s the last K (zeros elsewhere); also ``[3H]`` -> ``[3·2H]``."""
    hid = a.shape[0] // 3
    if a.dim() == 1:
        return torch.stack([a.view(3, hid), b.view(3, hid)], dim=1).reshape(6 * hid)
    k = a.shape[1]
    out = a.new_zeros(3, 2, hid, 2, k)
    out[:, 0, :, 0] = a.view(3, hid, k)
    out[:, 1, :, 1] = b.view(3, hid, k)
    return out.view(6 * hid, 2 * k)


class _GRUScan(torch.autograd.Function):
    """States of S = 2 independent GRUs: inputs ``x [T, S, R, D]`` (in step order), ``w_ih
    [S, 3H, D]``, ``b_ih [S, 3H]``, ``w_hh [S, 3H, H]``, ``b_hh [S, 3H]``, zero initial state ->
    ``h [T, S, R, H]``."""

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, b_ih: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        steps, _, r, _ = x.shape
        hid = w_hh.shape[2]
        params = [
            _per_gate_block_diag(w_ih[0], w_ih[1]),
            _per_gate_block_diag(w_hh[0], w_hh[1]),
            _per_gate_block_diag(b_ih[0], b_ih[1]),
            _per_gate_block_diag(b_hh[0], b_hh[1]),
        ]
        both = x.permute(0, 2, 1, 3).reshape(steps, r, -1)  # [T, R, S·D]
        h0 = x.new_zeros(1, r, 2 * hid)
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        out = torch.gru(both, h0, params, True, 1, 0.0, False, False, False)[0]  # [T, R, 2H]
        states = out.view(steps, r, 2, hid).transpose(1, 2).contiguous()  # [T, S, R, H]
        ctx.save_for_backward(x, w_ih, b_ih, w_hh, b_hh, states)
        return states

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with one_thread(grad.device):
            return _GRUScan._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w_ih, b_ih, w_hh, b_hh, states = ctx.saved_tensors
        steps, s, r, hid = states.shape
        prev = torch.cat([states.new_zeros(1, s, r, hid), states[:-1]])  # h_{t-1}
        # The gates of every step at once, as the forward computed them.
        gi = torch.einsum("tsrd,sgd->tsrg", x, w_ih) + b_ih.unsqueeze(1)  # [T, S, R, 3H]
        gh = torch.einsum("tsrh,sgh->tsrg", prev, w_hh) + b_hh.unsqueeze(1)
        rz = torch.sigmoid(gi[..., : 2 * hid] + gh[..., : 2 * hid])
        rg, z = rz[..., :hid], rz[..., hid:]
        hn = gh[..., 2 * hid :]
        n = torch.tanh(torch.addcmul(gi[..., 2 * hid :], rg, hn))
        # With dh the gradient of h_t, every pre-activation gradient is dh times a factor known
        # from the forward: da_n = dh (1 - z)(1 - n²), da_r = da_n · h_n · r(1 - r), d(h_n) =
        # da_n · r, da_z = dh (h_{t-1} - n) z(1 - z); and h_{t-1} gets dh · z directly. Per step
        # [da_r, d(h_n), da_z, dh·z, da_n] = dh · F_t, and dh_{t-1} = g_{t-1} + the first four
        # times [W_hr; W_hn; W_hz; I] (one product).
        da_n = (1 - z) * (1 - n * n)
        factors = torch.stack(
            [da_n * hn * rg * (1 - rg), da_n * rg, (prev - n) * z * (1 - z), z, da_n], dim=-2
        )  # [T, S, R, 5, H]
        eye = torch.eye(hid, dtype=w_hh.dtype).expand(s, hid, hid)
        w_back = torch.cat([w_hh[:, :hid], w_hh[:, 2 * hid :], w_hh[:, hid : 2 * hid], eye], 1)
        buf = torch.empty_like(factors)
        first4 = buf[..., :4, :].view(steps, s, r, 4 * hid)  # rows of 5H, the first 4H
        grads, fs, bufs, lhs = grad.unbind(0), factors.unbind(0), buf.unbind(0), first4.unbind(0)
        dh = grad[-1]
        for t in range(steps - 1, -1, -1):
            torch.mul(dh.unsqueeze(-2), fs[t], out=bufs[t])
            if t:
                dh = torch.baddbmm(grads[t - 1], lhs[t], w_back)
        d_r, d_hn, d_z, _, d_n = buf.unbind(dim=3)
        dgh = torch.cat([d_r, d_z, d_hn], dim=-1)  # [T, S, R, 3H] in nn.GRU's gate order
        dgi = torch.cat([d_r, d_z, d_n], dim=-1)
        d_w_hh = torch.einsum("tsrg,tsrh->sgh", dgh, prev)
        d_w_ih = torch.einsum("tsrg,tsrd->sgd", dgi, x) if ctx.needs_input_grad[1] else None
        d_x = torch.einsum("tsrg,sgd->tsrd", dgi, w_ih) if ctx.needs_input_grad[0] else None
        return d_x, d_w_ih, dgi.sum(dim=(0, 2)), d_w_hh, dgh.sum(dim=(0, 2))


@torch.compiler.disable  # a C++ time loop and a Python one: run eagerly under model.compile=true
def bigru_states(gru: nn.GRU, inp: Tensor) -> Tensor:
    """``gru(inp)[0]`` for a 1-layer bidirectional batch-first ``nn.GRU``: ``inp [R, T, d_in]``
    -> ``[R, T, 2H]`` (forward states, then reverse states), differentiable in the GRU's weights
    (and ``inp``)."""
    w_ih, b_ih, w_hh, b_hh = (
        torch.stack([gru.get_parameter(f"{name}_l0"), gru.get_parameter(f"{name}_l0_reverse")])
        for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")
    )  # [2, 3H, d_in], [2, 3H], [2, 3H, H], [2, 3H]: the two directions stacked
    seq = inp.transpose(0, 1)  # [T, R, d_in], step order of the forward direction
    both = torch.stack([seq, seq.flip(0)], dim=1)  # [T, 2, R, d_in]: the reverse one backwards
    states = _GRUScan.apply(both, w_ih, b_ih, w_hh, b_hh)  # [T, 2, R, H]
    return torch.cat([states[:, 0], states[:, 1].flip(0)], dim=-1).transpose(0, 1)
