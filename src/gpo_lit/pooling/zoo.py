"""The pooling operators VSE∞ is compared against (REFERENCE §9), behind the common interface.

``gem`` (generalised mean), ``lse`` (log-sum-exp), ``attention`` (learned query),
``dim_attention`` (per-dimension attention), ``fspool`` (featurewise sort pooling), ``netvlad``;
plus the GPO ablations ``gpo_transformer`` and ``gpo_perdim`` (in :mod:`gpo_lit.pooling.gpo_variants`,
registered by importing this module).

All of them: ``x [B, N, D]``, ``lengths [B]`` -> ``[B, D]`` in x's dtype, through
:meth:`Pooling.forward` (input check, padding mask, fp32 with autocast off, the cast back); each
``pool`` here is only the arithmetic, parameters cast to the features' working dtype, padding
overwritten (``masked_fill``) before anything touches it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpo_lit.errors import expect
from gpo_lit.pooling.base import Pooling, SetMask, register_pooling
from gpo_lit.pooling.gpo_variants import GPOPerDim, GPOTransformer

__all__ = [
    "AttentionPooling",
    "DimAttentionPooling",
    "FSPool",
    "GPOPerDim",
    "GPOTransformer",
    "GeMPooling",
    "LSEPooling",
    "NetVLADPooling",
]


def _p(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if param is None else param.to(dtype)


# ---- smooth maxima ------------------------------------------------------------------------------
@register_pooling("gem")
class GeMPooling(Pooling):
    """Generalised mean ``(mean_i x_i^p)^(1/p)`` per dimension over the valid elements.

    GeM needs non-negative input: features are clamped to ``>= eps`` first, so negative features
    act as ``eps`` (and get no gradient). ``p`` is one scalar for all dimensions; learnable, it is
    ``1 + (p_max - 1)·sigmoid(raw_p)`` (so always in ``(1, p_max)``, initialised at ``p``); fixed
    (``learnable=False``) it may be anything in ``[1, p_max]`` (p = 1 is the mean).

    Stable for any input scale and any p: with ``m`` the per-dimension maximum (detached; the
    result does not depend on it), ``GeM = m · (mean_i (x_i/m)^p)^(1/p)`` where every ratio is in
    ``(0, 1]`` and the mean is ``>= 1/n`` — no overflow, no log of 0, finite gradients for x and p.
    """

    def __init__(
        self,
        *,
        dim: int,
        p: float = 3.0,
        p_max: float = 10.0,
        learnable: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim=dim)
        expect(eps > 0, "gem pooling eps", "a number > 0", eps)
        expect(p_max > 1, "gem pooling p_max", "a number > 1", p_max)
        self.p_max = float(p_max)
        self.learnable = bool(learnable)
        self.eps = float(eps)
        if self.learnable:
            expect(1 < p < p_max, "gem pooling p", f"a number in (1, p_max={p_max})", p)
            s = (p - 1) / (p_max - 1)
            self.raw_p = nn.Parameter(torch.tensor(math.log(s / (1 - s))))
        else:
            expect(1 <= p <= p_max, "gem pooling p", f"a number in [1, p_max={p_max}]", p)
            self.register_buffer("fixed_p", torch.tensor(float(p)))

    @property
    def p(self) -> Tensor:
        """The current exponent (a 0-d tensor)."""
        if self.learnable:
            return 1 + (self.p_max - 1) * torch.sigmoid(self.raw_p)
        return self.get_buffer("fixed_p")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, p={float(self.p):.4g}, p_max={self.p_max}, "
            f"learnable={self.learnable}, eps={self.eps}"
        )

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        xc = x.masked_fill(mask.pad, self.eps).clamp(min=self.eps)
        m = xc.amax(dim=1, keepdim=True).detach()  # [B, 1, D], >= eps
        p = self.p.to(x.dtype)
        powered = (xc / m).pow(p).masked_fill(mask.pad, 0.0)
        mean = powered.sum(dim=1) / mask.counts(x.dtype)  # >= 1/n
        return m.squeeze(1) * mean.pow(1 / p)


@register_pooling("lse")
class LSEPooling(Pooling):
    """Log-sum-exp smooth maximum per dimension: ``(1/r)·log(mean_i exp(r·x_i))``.

    Normalised by the set size (the mean, i.e. ``LSE_sum - log(n)/r``), so a constant set maps to
    its constant and the result lies between the mean (r -> 0) and the max (r -> inf). ``r > 0``
    is one scalar, learnable as ``exp(log_r)`` (``learnable=True``) or fixed. Computed as
    ``m + (1/r)·log(mean_i exp(r·(x_i - m)))`` with ``m`` the (detached) maximum: never overflows.
    """

    def __init__(self, *, dim: int, r: float = 10.0, learnable: bool = True) -> None:
        super().__init__(dim=dim)
        expect(r > 0, "lse pooling r", "a number > 0", r)
        self.learnable = bool(learnable)
        log_r = torch.tensor(math.log(r))
        if self.learnable:
            self.log_r = nn.Parameter(log_r)
        else:
            self.register_buffer("log_r", log_r)

    @property
    def r(self) -> Tensor:
        """The current temperature (a 0-d tensor)."""
        return self.log_r.exp()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, r={float(self.r):.4g}, learnable={self.learnable}"

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        pad = mask.pad
        x0 = x.masked_fill(pad, 0.0)
        m = x0.masked_fill(pad, float("-inf")).amax(dim=1, keepdim=True).detach()
        r = self.r.to(x.dtype)
        # No -inf in the graph: d(r·u)/dr = u would turn a zero gradient into NaN.
        e = torch.exp(r * (x0 - m).masked_fill(pad, 0.0)).masked_fill(pad, 0.0)
        mean = e.sum(dim=1) / mask.counts(x.dtype)  # >= 1/n
        return m.squeeze(1) + mean.log() / r


# ---- attention ----------------------------------------------------------------------------------
@register_pooling("attention")
class AttentionPooling(Pooling):
    """Attention pooling with one learned query: ``Σ_i softmax_i(s_i) · v_i`` over valid elements.

    Score: ``s_i = ⟨q, x_i⟩/√D`` (``hidden=0``; a key projection ``⟨q, W_k x_i⟩ = ⟨W_kᵀq, x_i⟩``
    would be redundant with a single query, so q is learned directly), or an MLP score
    ``s_i = ⟨q, tanh(W x_i + b)⟩/√hidden`` (``hidden > 0``). Values are the features themselves
    (output stays in the input space, like mean/max/GPO), or ``W_v x_i + b_v`` with
    ``value_proj=True`` (D -> D). ``q`` starts at zero, so the operator starts as mean pooling.
    """

    def __init__(self, *, dim: int, hidden: int = 0, value_proj: bool = False) -> None:
        super().__init__(dim=dim)
        expect(isinstance(hidden, int) and hidden >= 0, "attention hidden", "an int >= 0", hidden)
        self.hidden = hidden
        self.key = nn.Linear(dim, hidden) if hidden else None
        self.query = nn.Parameter(torch.zeros(hidden or dim))
        self.value = nn.Linear(dim, dim) if value_proj else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, value_proj={self.value is not None}"

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        return self.pool_weights(x, mask)[0]

    def pool_weights(self, x: Tensor, mask: SetMask) -> tuple[Tensor, Tensor]:
        """Pooled ``[B, D]`` and the attention ``[B, N]`` (fp32, fp64 for fp64 features)."""
        work = x.dtype
        x0 = x.masked_fill(mask.pad, 0.0)
        keys = x0
        if self.key is not None:
            keys = torch.tanh(F.linear(x0, self.key.weight.to(work), _p(self.key.bias, work)))
        scores = keys @ self.query.to(work) / math.sqrt(self.query.shape[0])  # [B, N]
        attn = torch.softmax(scores.masked_fill(~mask.valid, float("-inf")), dim=1)
        values = x0
        if self.value is not None:
            values = F.linear(x0, self.value.weight.to(work), _p(self.value.bias, work))
        return torch.bmm(attn.unsqueeze(1), values).squeeze(1), attn


@register_pooling("dim_attention")
class DimAttentionPooling(Pooling):
    """Per-dimension attention (ESA-style): scores ``S = W x_i + b`` (``[B, N, D]``, D -> D
    linear), softmax over the valid elements separately for each dimension,
    ``out[d] = Σ_i softmax_i(S[:, d]) · x_i[d]``. W and b start at zero (= mean pooling)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__(dim=dim)
        self.score = nn.Linear(dim, dim)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        x0 = x.masked_fill(mask.pad, 0.0)
        scores = F.linear(x0, self.score.weight.to(x.dtype), self.score.bias.to(x.dtype))
        attn = torch.softmax(scores.masked_fill(mask.pad, float("-inf")), dim=1)  # [B, N, D]
        return (attn * x0).sum(dim=1)


# ---- set functions ------------------------------------------------------------------------------
@register_pooling("fspool")
class FSPool(Pooling):
    """FSPool (Zhang, Hare & Prügel-Bennett, 2019): featurewise sort, then a learned weighted sum.

    Each dimension d is sorted descending over the valid elements; the element at rank j of a set
    of size n has relative position ``r = j/(n-1)`` (``r = 0`` when n = 1) and weight
    ``w_d(r) = Σ_i max(0, 1 - |r·k - i|) · W[d, i]``: the piecewise-linear function through
    ``k + 1`` learned knots ``W[d, 0..k]`` at ``0, 1/k, ..., 1`` (``k = n_pieces``; W ~ N(0, 1) as
    in the paper). ``out[d] = Σ_j w_d(r_j) · sorted_j[d]`` — a weighted *sum*, as in the paper;
    ``normalize=True`` divides by n (a weighted mean, scale independent of the set size).
    """

    def __init__(self, *, dim: int, n_pieces: int = 20, normalize: bool = False) -> None:
        super().__init__(dim=dim)
        expect(
            isinstance(n_pieces, int) and n_pieces >= 1, "fspool n_pieces", "an int >= 1", n_pieces
        )
        self.n_pieces = n_pieces
        self.normalize = bool(normalize)
        self.weight = nn.Parameter(torch.randn(dim, n_pieces + 1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_pieces={self.n_pieces}, normalize={self.normalize}"

    def rank_weights(self, lengths: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``w[b, j, d]``: weight of rank j of dimension d for a set of size ``lengths[b]``
        (``[B, n, D]``; ranks past the size get the weight at r = 1 and are masked later)."""
        ranks = torch.arange(n, device=lengths.device, dtype=dtype)
        denom = (lengths - 1).clamp(min=1).unsqueeze(1).to(dtype)
        pos = (ranks / denom).clamp(max=1.0) * self.n_pieces  # [B, n] in [0, k]
        knots = torch.arange(self.n_pieces + 1, device=lengths.device, dtype=dtype)
        hat = (1 - (pos.unsqueeze(-1) - knots).abs()).clamp(min=0)  # [B, n, k+1]
        return hat @ self.weight.to(dtype).t()

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        # Padding sorts last as -inf, then becomes 0 (no -inf reaches any product).
        xs = x.masked_fill(mask.pad, float("-inf")).sort(dim=1, descending=True).values
        xs = xs.masked_fill(mask.pad, 0.0)
        out = (self.rank_weights(mask.lengths, x.shape[1], x.dtype) * xs).sum(dim=1)
        return out / mask.counts(x.dtype) if self.normalize else out


@register_pooling("netvlad")
class NetVLADPooling(Pooling):
    """NetVLAD (Arandjelović et al., 2016) with ``clusters`` = K centroids, projected back to D.

    ``x_i`` l2-normalised first (``normalize_input``, as in the usual implementations);
    soft assignment ``a_ik = softmax_k(W x_i + b)``; ``V_k = Σ_i a_ik (x_i - c_k)`` over the valid
    elements; each ``V_k`` l2-normalised (intra-normalisation), the K·D vector l2-normalised, then
    a linear layer ``K·D -> D`` (with bias; K·D·D parameters, 8.4M for K = 8, D = 1024).
    Centroids start as N(0, 1/D) (about unit norm).
    """

    def __init__(self, *, dim: int, clusters: int = 8, normalize_input: bool = True) -> None:
        super().__init__(dim=dim)
        expect(
            isinstance(clusters, int) and clusters >= 1, "netvlad clusters", "an int >= 1", clusters
        )
        self.clusters = clusters
        self.normalize_input = bool(normalize_input)
        self.assign = nn.Linear(dim, clusters)
        self.centroids = nn.Parameter(torch.randn(clusters, dim) / math.sqrt(dim))
        self.proj = nn.Linear(clusters * dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clusters={self.clusters}, normalize_input={self.normalize_input}"

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        work = x.dtype
        x0 = x.masked_fill(mask.pad, 0.0)
        if self.normalize_input:
            x0 = F.normalize(x0, dim=-1)
        logits = F.linear(x0, self.assign.weight.to(work), self.assign.bias.to(work))
        a = torch.softmax(logits, dim=-1).masked_fill(mask.pad, 0.0)  # [B, N, K]
        vlad = a.transpose(1, 2) @ x0 - a.sum(dim=1).unsqueeze(-1) * self.centroids.to(work)
        vlad = F.normalize(vlad, dim=-1).flatten(1)  # intra-normalised, [B, K·D]
        vlad = F.normalize(vlad, dim=-1)
        return F.linear(vlad, self.proj.weight.to(work), self.proj.bias.to(work))
