"""A bidirectional one-layer GRU over padded sequences for the CPU, equal to ``nn.GRU`` on a
packed sequence (to float rounding), with about half its CPU time for training.

Why: on the CPU a packed ``nn.GRU`` runs every time step as a handful of small autograd ops,
shrinking the batch as sequences end (a ``narrow`` per step whose backward allocates and fills
a full-size zero tensor), and computes the input and weight gradients one step at a time. Here
the input projections of all steps and both directions are two large matrix products, the
recurrence is one custom autograd function that keeps the gates and runs both directions in
one batched product per step, and the weight gradients are one product over all steps.

Exactness: the reverse direction reads each sequence reversed within its own length (a gather),
so in both directions the valid steps come first and padding steps only come after them. Their
output gradients are zero, so they add nothing to any gradient; their outputs are zeroed, as
``pad_packed_sequence`` gives. The parameters are the ``nn.GRU``'s own (same state dict).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


class _GRURecurrence(torch.autograd.Function):
    """The recurrence of stacked independent GRUs (here the two directions) over sequences laid
    out as a packed sequence: time-major, longest first, ``batch_sizes[t]`` sequences at step t.

    gi ``[K, S, 3H]``: input projections ``W_ih x + b_ih`` (gates r, z, n) of the ``S`` packed
    rows; w_hh ``[K, 3H, H]``; b_hh ``[K, 3H]``; h_0 = 0. Returns the states ``[K, S, H]``.
    PyTorch's equations: r = σ(i_r + h_r), z = σ(i_z + h_z), n = tanh(i_n + r ⊙ h_n),
    h' = (1 - z) ⊙ n + z ⊙ h with ``h_· = W_h· h + b_h·``.
    """

    @staticmethod
    def forward(ctx, gi: Tensor, w_hh: Tensor, b_hh: Tensor, batch_sizes: list[int]) -> Tensor:
        k, rows, h3 = gi.shape
        hid = h3 // 3
        hs = gi.new_empty(k, rows, hid)  # h_t of every packed row
        h_prev = gi.new_zeros(k, rows, hid)  # h_{t-1} of every packed row (h_0 = 0)
        gates = gi.new_empty(k, rows, 4 * hid)  # r, z, n, h_n (kept for backward)
        w_t, bias = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        off = 0
        for t, bt in enumerate(batch_sizes):
            sl = slice(off, off + bt)
            hp, g, i = h_prev[:, sl], gates[:, sl], gi[:, sl]
            gh = torch.baddbmm(bias, hp, w_t)  # [K, b_t, 3H]
            torch.sigmoid(torch.add(i[..., : 2 * hid], gh[..., : 2 * hid]), out=g[..., : 2 * hid])
            r, z = g[..., :hid], g[..., hid : 2 * hid]
            n, hn = g[..., 2 * hid : 3 * hid], g[..., 3 * hid :]
            hn.copy_(gh[..., 2 * hid :])
            torch.tanh(torch.addcmul(i[..., 2 * hid :], r, hn), out=n)
            h = hs[:, sl]
            torch.addcmul(n, z, hp - n, out=h)  # (1 - z) n + z h
            off += bt
            if t + 1 < len(batch_sizes):  # the longest b_{t+1} sequences go on
                nxt = batch_sizes[t + 1]
                h_prev[:, off : off + nxt] = h[:, :nxt]
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(w_hh, h_prev, gates)
        return hs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hs: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        w_hh, h_prev, gates = ctx.saved_tensors
        sizes = ctx.batch_sizes
        k, rows, hid = grad_hs.shape
        d_gi = grad_hs.new_empty(k, rows, 3 * hid)
        d_gh = grad_hs.new_empty(k, rows, 3 * hid)
        offs = [0]
        for bt in sizes[:-1]:
            offs.append(offs[-1] + bt)
        carry = None  # gradient reaching h_t from step t + 1: [K, b_{t+1}, H]
        for t in range(len(sizes) - 1, -1, -1):
            sl = slice(offs[t], offs[t] + sizes[t])
            g, hp = gates[:, sl], h_prev[:, sl]
            r, z = g[..., :hid], g[..., hid : 2 * hid]
            n, hn = g[..., 2 * hid : 3 * hid], g[..., 3 * hid :]
            dh = grad_hs[:, sl].clone()
            if carry is not None:
                dh[:, : carry.shape[1]] += carry
            dgi, dgh = d_gi[:, sl], d_gh[:, sl]
            da_n = dgi[..., 2 * hid :]
            torch.mul(dh - dh * z, 1 - n * n, out=da_n)  # dh (1 - z), through tanh
            torch.mul(da_n, r, out=dgh[..., 2 * hid :])  # into h_n
            torch.mul(da_n * hn, r - r * r, out=dgi[..., :hid])  # through r's sigmoid
            torch.mul(dh * (hp - n), z - z * z, out=dgi[..., hid : 2 * hid])  # z's sigmoid
            dgh[..., : 2 * hid] = dgi[..., : 2 * hid]
            carry = torch.baddbmm(dh * z, dgh, w_hh)  # into h_{t-1}: directly and via W_hh
        # Weight gradients: one product over all packed rows.
        d_w = torch.bmm(d_gh.transpose(1, 2), h_prev)  # [K, 3H, H]
        return d_gi, d_w, d_gh.sum(1), None


def packed_order(lengths: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """Where each packed row of the two directions reads and writes in ``[B·L']`` (L' = max
    length): forward rows at ``(b, t)``, reverse rows at ``(b, len_b - 1 - t)``, the rows of step
    t being the ``batch_sizes[t]`` longest sequences (longest first). ``lengths`` on the CPU."""
    lengths = lengths.to(torch.long)
    width = int(lengths.max())
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_len = lengths[order]
    t = torch.arange(width)
    active = t.unsqueeze(1) < sorted_len.unsqueeze(0)  # [L', B]: step t, sorted sequence j
    batch_sizes = active.sum(1).tolist()
    steps, seq = active.nonzero(as_tuple=True)  # time-major, longest first: the packed order
    b = order[seq]
    return b * width + steps, b * width + sorted_len[seq] - 1 - steps, batch_sizes


def bigru_padded(
    gru: nn.GRU, x: Tensor, lengths: Tensor, embedding: Tensor | None = None
) -> Tensor:
    """A one-layer bidirectional ``batch_first`` ``gru`` over padded ``x [B, L, D]`` with CPU
    ``lengths [B]`` (each >= 1): ``[B, L', 2H]`` (L' = max length), forward then reverse
    direction, zero past each length: what packing, running ``gru`` and padding back give.

    With ``embedding`` (a ``[V, D]`` word table), ``x`` is token ids ``[B, L]`` and the input
    projection is computed once per vocabulary word (``W_ih E + b_ih``) and looked up per token:
    the same numbers, fewer products when V is below the batch's token count.
    """
    bsz, width = x.shape[0], int(lengths.max())
    at_f, at_r, batch_sizes = packed_order(lengths.cpu())
    at_f, at_r = at_f.to(x.device), at_r.to(x.device)
    p = gru.get_parameter  # typed access (attribute access types as Tensor | Module)
    directions = (
        (at_f, p("weight_ih_l0"), p("bias_ih_l0")),
        (at_r, p("weight_ih_l0_reverse"), p("bias_ih_l0_reverse")),
    )
    if embedding is None:
        flat = x[:, :width].reshape(bsz * width, -1)
        gis = [F.linear(flat.index_select(0, at), w, b) for at, w, b in directions]
    else:
        ids = x[:, :width].reshape(-1)
        gis = [F.linear(embedding, w, b).index_select(0, ids[at]) for at, w, b in directions]
    gi = torch.stack(gis)  # [2, S, 3H]
    w_hh = torch.stack([p("weight_hh_l0"), p("weight_hh_l0_reverse")])
    b_hh = torch.stack([p("bias_hh_l0"), p("bias_hh_l0_reverse")])
    hs = _GRURecurrence.apply(gi, w_hh, b_hh, batch_sizes)  # [2, S, H]
    hid = gru.hidden_size
    out_f = hs.new_zeros(bsz * width, hid).index_copy(0, at_f, hs[0])
    out_r = hs.new_zeros(bsz * width, hid).index_copy(0, at_r, hs[1])
    return torch.cat([out_f, out_r], dim=-1).view(bsz, width, 2 * hid)


def supports_padded(gru: nn.GRU, x: Tensor) -> bool:
    """Whether :func:`bigru_padded` computes this GRU: one bidirectional, batch-first layer
    with biases, no projection, on the CPU, in a floating dtype."""
    return (
        x.device.type == "cpu"
        and gru.num_layers == 1
        and gru.bidirectional
        and gru.batch_first
        and gru.bias
        and getattr(gru, "proj_size", 0) == 0
        and x.dtype in (torch.float32, torch.float64)
    )
