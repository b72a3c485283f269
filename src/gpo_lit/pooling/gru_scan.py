"""GPO's weight generator BiGRU on the CPU, with a hand-written backward through time.

The generator runs a 32-wide GRU over a few hundred ranks for a handful of rows: a few tiny ops per
step, where ``nn.GRU`` on the CPU records every step's ops for autograd and its backward replays
them one by one (most of GPO's cost at small batches). Here the two directions are ONE GRU of twice
the width whose weights are block-diagonal per gate, so each half of the state sees only its own
direction (the same products and additions as ``nn.GRU``: the same numbers). Its forward is one
``torch.gru`` call recording nothing; the backward recomputes every step's gates at once from the
states, then runs one loop of two ops per step (the GRU's analytic gradient as one product), and
the weight gradients are one batched product per weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.threads import one_thread


def _per_gate_block_diag(w: Tensor) -> Tensor:
    """Two GRUs' ``w [2, 3H, K]`` (gates r, z, n stacked) -> ``[3·2H, 2K]``: per gate, the first
    GRU's rows read the first K inputs and the second's the last K (zeros elsewhere); biases
    ``[2, 3H]`` -> ``[3·2H]``."""
    hid = w.shape[1] // 3
    if w.dim() == 2:
        return w.view(2, 3, hid).transpose(0, 1).reshape(6 * hid)
    k = w.shape[2]
    out = w.new_zeros(3, 2, hid, 2, k)
    out[:, 0, :, 0] = w[0].view(3, hid, k)
    out[:, 1, :, 1] = w[1].view(3, hid, k)
    return out.view(6 * hid, 2 * k)


class _GRUScan(torch.autograd.Function):
    """States of two independent GRUs run side by side: inputs ``x [T, R, 2D]`` (in step order,
    the first GRU's D features then the second's), ``w_ih [2, 3H, D]``, ``b_ih [2, 3H]``,
    ``w_hh [2, 3H, H]``, ``b_hh [2, 3H]``, zero initial state -> ``h [T, R, 2H]`` (the first
    GRU's H units, then the second's)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_ih: Tensor, b_ih: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        params = [_per_gate_block_diag(w) for w in (w_ih, w_hh, b_ih, b_hh)]
        h0 = x.new_zeros(1, x.shape[1], params[1].shape[1])
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        states = torch.gru(x, h0, params, True, 1, 0.0, False, False, False)[0]  # [T, R, 2H]
        ctx.save_for_backward(x, states, w_ih, b_ih, w_hh, b_hh, params[1])
        return states

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with one_thread(grad.device):
            return _GRUScan._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, states, w_ih, b_ih, w_hh, b_hh, w_hh_wide = ctx.saved_tensors
        steps, r, h2 = states.shape
        hid, rows = h2 // 2, steps * r
        prev = torch.cat([states.new_zeros(1, r, h2), states[:-1]])  # h_{t-1}

        def per_gru(t: Tensor) -> Tensor:  # [T, R, 2K] -> [2, T·R, K], a view
            return t.view(rows, 2, -1).transpose(0, 1)

        def gates(inp: Tensor, w: Tensor, b: Tensor) -> Tensor:  # -> [T, R, 3, 2, H], a view
            out = torch.baddbmm(b.unsqueeze(1), per_gru(inp), w.transpose(1, 2))  # [2, T·R, 3H]
            return out.view(2, steps, r, 3, hid).permute(1, 2, 3, 0, 4)

        # The gates of every step at once, as the forward computed them; [T, R, 2, H] each.
        gi, gh = gates(x, w_ih, b_ih), gates(prev, w_hh, b_hh)
        rz = torch.sigmoid(gi[:, :, :2] + gh[:, :, :2])
        rg, z = rz[:, :, 0], rz[:, :, 1]
        hn = gh[:, :, 2]
        n = torch.tanh(torch.addcmul(gi[:, :, 2], rg, hn))
        hp = prev.view(steps, r, 2, hid)
        # With dh the gradient of h_t, every pre-activation gradient is dh times a factor known
        # from the forward: da_n = dh (1 - z)(1 - n²), da_r = da_n · h_n · r(1 - r), d(h_n) =
        # da_n · r, da_z = dh (h_{t-1} - n) z(1 - z); and h_{t-1} gets dh · z directly. Per step
        # [da_r, d(h_n), da_z, dh·z, da_n] = dh · F_t, and dh_{t-1} = g_{t-1} + the first four
        # times [W_hr; W_hn; W_hz; I] (one product, in the wide layout).
        da_n = (1 - z) * (1 - n * n)
        factors = torch.stack(
            [da_n * hn * rg * (1 - rg), da_n * rg, (hp - n) * z * (1 - z), z, da_n], dim=2
        ).view(steps, r, 5, h2)
        eye = torch.eye(h2, dtype=w_hh.dtype, device=w_hh.device)
        w_rnz = (w_hh_wide[:h2], w_hh_wide[2 * h2 :], w_hh_wide[h2 : 2 * h2])
        w_back = torch.cat([*w_rnz, eye])  # [4·2H, 2H]
        buf = torch.empty_like(factors)
        first4 = buf[..., :4, :].view(steps, r, 4 * h2)  # rows of 5·2H, the first 4·2H
        grads, fs, bufs, lhs = grad.unbind(0), factors.unbind(0), buf.unbind(0), first4.unbind(0)
        dh = grad[-1]
        for t in range(steps - 1, -1, -1):
            torch.mul(dh.unsqueeze(-2), fs[t], out=bufs[t])
            if t:
                dh = torch.addmm(grads[t - 1], lhs[t], w_back)
        # Per GRU [2, T·R, 3H] in nn.GRU's gate order (r, z, n): one copy each.
        d_r, d_hn, d_z, _, d_n = (g.view(rows, 2, hid).transpose(0, 1) for g in buf.unbind(2))
        dgh = torch.stack([d_r, d_z, d_hn], dim=2).view(2, rows, 3 * hid)
        dgi = torch.stack([d_r, d_z, d_n], dim=2).view(2, rows, 3 * hid)
        d_x = d_w_ih = None
        if ctx.needs_input_grad[0]:
            d_x = torch.bmm(dgi, w_ih).transpose(0, 1).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            d_w_ih = torch.bmm(dgi.transpose(1, 2), per_gru(x))
        d_w_hh = torch.bmm(dgh.transpose(1, 2), per_gru(prev))
        return d_x, d_w_ih, dgi.sum(1), d_w_hh, dgh.sum(1)


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
    both = torch.cat([seq, seq.flip(0)], dim=-1)  # [T, R, 2·d_in]: the reverse one backwards
    states = _GRUScan.apply(both, w_ih, b_ih, w_hh, b_hh)  # [T, R, 2H]
    hid = gru.hidden_size
    return torch.cat([states[..., :hid], states[..., hid:].flip(0)], dim=-1).transpose(0, 1)
