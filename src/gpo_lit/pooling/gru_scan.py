"""GPO's weight generator BiGRU on the CPU, with a hand-written backward through time.

The generator runs a 32-wide GRU over a few hundred ranks for a handful of rows: a few tiny ops per
step, where ``nn.GRU`` on the CPU records every step's ops for autograd and its backward replays
them one by one (most of GPO's cost at small batches). Here both directions run in one batched
loop (``[2, R, H]`` states), the forward records nothing, and the backward is one loop of the
GRU's analytic gradients plus one matmul for the recurrent weights. Same gate equations as
``nn.GRU`` (r, z, n; ``h' = (1 - z) · n + z · h``), so the same numbers up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.threads import one_thread


class _GRUScan(torch.autograd.Function):
    """States of S independent GRUs: ``gi [T, S, R, 3H]`` (input projections ``W_ih x + b_ih`` in
    step order), ``w_hh [S, 3H, H]``, ``b_hh [S, 3H]``, zero initial state -> ``h [T, S, R, H]``."""

    @staticmethod
    def forward(ctx, gi: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        steps, s, r, h3 = gi.shape
        hid = h3 // 3
        w_t = w_hh.transpose(1, 2)  # [S, H, 3H]
        bias = b_hh.unsqueeze(1).expand(s, r, h3)
        states = gi.new_empty(steps, s, r, hid)
        gates = gi.new_empty(steps, s, r, 2 * hid)  # r, z (after the sigmoid)
        cand = gi.new_empty(steps, s, r, hid)  # n
        gh = gi.new_empty(steps, s, r, h3)  # W_hh h + b_hh
        h = gi.new_zeros(s, r, hid)
        # Every step's views made up front (one call each): per-step slicing costs as much as the
        # tiny ops themselves. Same ops on the same values as slicing inside the loop.
        gi_rz, gi_n = gi[..., : 2 * hid].unbind(0), gi[..., 2 * hid :].unbind(0)
        gh_all, gh_rz, gh_n = (
            gh.unbind(0),
            gh[..., : 2 * hid].unbind(0),
            gh[..., 2 * hid :].unbind(0),
        )
        rz_all, r_all, z_all = (
            gates.unbind(0),
            gates[..., :hid].unbind(0),
            gates[..., hid:].unbind(0),
        )
        n_all, h_all = cand.unbind(0), states.unbind(0)
        for t in range(steps):
            torch.baddbmm(bias, h, w_t, out=gh_all[t])
            torch.add(gi_rz[t], gh_rz[t], out=rz_all[t]).sigmoid_()
            torch.addcmul(gi_n[t], r_all[t], gh_n[t], out=n_all[t]).tanh_()
            h = torch.lerp(n_all[t], h, z_all[t], out=h_all[t])  # n + z · (h - n)
        ctx.save_for_backward(w_hh, states, gates, cand, gh)
        return states

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with one_thread(grad.device):
            return _GRUScan._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w_hh, states, gates, cand, gh = ctx.saved_tensors
        steps, s, r, hid = states.shape
        prev = torch.cat([states.new_zeros(1, s, r, hid), states[:-1]])  # h_{t-1}
        rg, z = gates[..., :hid], gates[..., hid:]
        hn = gh[..., 2 * hid :]
        # Factors known from the forward, paired so each step is 4 ops: with dh the gradient of
        # h_t, [da_z, da_n] = dh · [b, a] and [da_r, d(hn)] = da_n · [c, r] (a = pre-activations).
        ba = torch.stack([(prev - cand) * z * (1 - z), (1 - z) * (1 - cand * cand)], dim=-2)
        cr = torch.stack([hn * rg * (1 - rg), rg], dim=-2)  # [T, S, R, 2, H] each
        # Per step [da_r, d(hn), da_z, da_n]: the first three are d(W_hh h + b_hh) with W_hh's
        # rows taken in the order r, n, z.
        buf = states.new_empty(steps, s, r, 4, hid)
        w_rnz = torch.cat([w_hh[:, :hid], w_hh[:, 2 * hid :], w_hh[:, hid : 2 * hid]], dim=1)
        dh = grad[-1]
        grads, zs, bas, crs = grad.unbind(0), z.unbind(0), ba.unbind(0), cr.unbind(0)
        zn_all, n_all = buf[:, :, :, 2:].unbind(0), buf[:, :, :, 3:].unbind(0)
        rh_all = buf[:, :, :, :2].unbind(0)
        gh_all = buf[:, :, :, :3].view(steps, s, r, 3 * hid).unbind(0)  # views: written below
        for t in range(steps - 1, -1, -1):
            torch.mul(dh.unsqueeze(-2), bas[t], out=zn_all[t])
            torch.mul(n_all[t], crs[t], out=rh_all[t])
            if t:
                dh = torch.baddbmm(torch.addcmul(grads[t - 1], dh, zs[t]), gh_all[t], w_rnz)
        d_r, d_hn, d_z, d_n = buf.unbind(dim=3)
        dgh = torch.cat([d_r, d_z, d_hn], dim=-1)  # [T, S, R, 3H] in nn.GRU's gate order
        dgi = torch.cat([d_r, d_z, d_n], dim=-1)
        flat = dgh.permute(1, 3, 0, 2).reshape(s, 3 * hid, steps * r)  # [S, 3H, T·R]
        d_w = torch.bmm(flat, prev.permute(1, 0, 2, 3).reshape(s, steps * r, hid))
        return dgi, d_w, dgh.sum(dim=(0, 2))


@torch.compiler.disable  # a Python loop of tiny ops: run eagerly under model.compile=true
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
    gi = torch.einsum("tsrd,sgd->tsrg", both, w_ih) + b_ih.unsqueeze(1)  # [T, 2, R, 3H]
    states = _GRUScan.apply(gi.contiguous(), w_hh, b_hh)  # [T, 2, R, H]
    return torch.cat([states[:, 0], states[:, 1].flip(0)], dim=-1).transpose(0, 1)
