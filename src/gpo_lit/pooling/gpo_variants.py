"""GPO ablations from the VSE∞ supplementary material (REFERENCE §1), built on :class:`GPO`.

- ``gpo_transformer``: the BiGRU weight generator replaced by a small Transformer encoder over the
  positional encodings of the ranks (key padding mask, so θ(n) still sees only ranks 0..n-1).
- ``gpo_perdim``: per-dimension weights ``θ [N, D]`` (softmax over ranks separately per dimension)
  applied to the per-dimension sorted features.

Both keep GPO's contract: θ depends only on the set size, is computed once per distinct length
(or once per size on an accelerator) and cached per length in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.errors import expect
from gpo_lit.pooling.base import SetMask, register_pooling, valid_mask
from gpo_lit.pooling.gpo import GPO


@register_pooling("gpo_transformer")
class GPOTransformer(GPO):
    """GPO whose weight generator is a Transformer encoder instead of the BiGRU.

    Ranks 0..n-1 → sinusoidal encoding (``d_pe``) → linear ``d_pe -> d_hidden`` → ``layers``
    post-norm Transformer encoder layers (``heads`` heads, feed-forward ``2·d_hidden``, ``dropout``,
    key padding mask on ranks >= n) → GPO's bias-free linear ``d_hidden -> 1`` → softmax(score /
    temperature) over the n ranks. No causal mask and no right-alignment are needed: with the
    padding masked, rank k's output depends on n and k only.
    """

    def __init__(
        self,
        *,
        dim: int,
        d_pe: int = 32,
        d_hidden: int = 32,
        temperature: float = 0.1,
        heads: int = 4,
        layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(dim=dim, d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        expect(
            isinstance(heads, int) and heads > 0 and d_hidden % heads == 0,
            "gpo_transformer heads",
            f"an int > 0 dividing d_hidden={d_hidden}",
            heads,
        )
        expect(
            isinstance(layers, int) and layers > 0, "gpo_transformer layers", "an int > 0", layers
        )
        expect(0 <= dropout < 1, "gpo_transformer dropout", "a number in [0, 1)", dropout)
        self.heads, self.layers, self.dropout = heads, layers, float(dropout)
        del self.gru  # the generator below replaces it; GPO's linear head is kept
        self.input = nn.Linear(d_pe, d_hidden)
        layer = nn.TransformerEncoderLayer(
            d_hidden, heads, dim_feedforward=2 * d_hidden, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, layers={self.layers}, dropout={self.dropout}"

    def _gru_inputs(self, sizes: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Generator inputs for set sizes ``sizes``: the encodings of ranks 0..width-1
        (``[U, width, d_pe]``, left-aligned) and the key padding mask ``[U, width]``."""
        pe = self._encoding(width)
        sizes = sizes.to(pe.device)
        return pe.expand(sizes.shape[0], width, self.d_pe), ~valid_mask(sizes, width)

    def _scores(
        self, sizes: Tensor, width: int, inputs: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Raw scores ``[U, width]`` (θ's dtype) of ranks ``0..width-1`` for set sizes ``sizes``;
        entries at ranks >= size are arbitrary (masked by the caller)."""
        pe, pad = self._gru_inputs(sizes, width) if inputs is None else inputs
        h = self.encoder(self.input(pe), src_key_padding_mask=pad)
        return self.linear(h).squeeze(-1).to(self.theta_dtype())


@register_pooling("gpo_perdim")
class GPOPerDim(GPO):
    """GPO with one weight vector per feature dimension: ``θ [N, D]`` for a set of size N.

    Same generator as GPO (PE → BiGRU, directions averaged) but the bias-free linear head maps
    ``d_hidden -> D`` (a score per rank and dimension); ``θ[:, d] = softmax_k(score[:, d] / T)``
    over the valid ranks, and ``pooled[d] = Σ_k θ[k, d] · (k-th largest of x[:, d])``.

    θ comes back ``[B, N, D]`` from ``forward(..., return_weights=True)`` and ``[n, D]`` from
    ``weights_for_length(n)``. Memory: the all-sizes table (lengths on an accelerator, and the eval
    cache) is ``[N, N, D]`` — 268 MB in fp32 for N = 256, D = 1024.
    """

    def __init__(
        self, *, dim: int, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1
    ) -> None:
        super().__init__(dim=dim, d_pe=d_pe, d_hidden=d_hidden, temperature=temperature)
        self.linear = nn.Linear(d_hidden, dim, bias=False)

    def _theta_rows(
        self, sizes: Tensor, width: int, inputs: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """θ for set sizes ``sizes``: ``[U, width, D]`` (θ's dtype), each ``[:, d]`` column
        summing to 1 over the first ``size`` ranks and zero past them."""
        sizes = sizes.to(self.linear.weight.device)
        scores = self._scores(sizes, width, inputs).reshape(sizes.shape[0], width, self.dim)
        pad = ~valid_mask(sizes, width).unsqueeze(-1)
        return torch.softmax((scores / self.temperature).masked_fill(pad, float("-inf")), dim=1)

    def _weights_shape(self, b: int, n: int) -> tuple[int, ...]:
        return (b, n, self.dim)  # θ [B, N, D]

    def _pool_theta(self, x: Tensor, mask: SetMask) -> tuple[Tensor, Tensor, int]:
        """Pooled ``[B, D]``, ``θ [B, width, D]`` and ``width``; same θ dispatch as GPO (eval
        cache, else once per distinct length with CPU lengths, else the all-sizes table)."""
        expect(x.shape[2] == self.dim, "gpo_perdim input width", f"D = {self.dim}", x.shape[2])
        theta, width = self._batch_theta(mask.lengths, mask.host, x.shape[1], x.device)
        pad = mask.pad[:, :width]
        # Padding sorts last as -inf and is then zeroed: it reaches neither output nor grads.
        xs = x[:, :width].masked_fill(pad, float("-inf"))
        xs = xs.sort(dim=1, descending=True).values.masked_fill(pad, 0.0)
        return (theta.to(x.dtype) * xs).sum(dim=1), theta, width
