"""Temporal sequence poolers over frames (video baselines, REFERENCE §9), as in CLIP4Clip.

Both run a sequence model over the valid frames, add its output to the input (residual), then
average over the valid frames. They see frame *order* — unlike mean / max / K-max / GPO, they are
**not permutation-invariant** by design — and padding never reaches the output: padded inputs are
zeroed and masked out of attention (transformer) or never fed (packed LSTM), and the final mean
counts valid frames only.

- ``temporal_transformer`` (CLIP4Clip ``seqTransf``): learned position embeddings up to
  ``max_len`` frames, a small pre-norm ``TransformerEncoder`` with a key-padding mask,
  ``out = encoder(x + pos) + x``, masked mean.
- ``lstm`` (CLIP4Clip ``seqLSTM``): a packed LSTM over the valid frames (hidden = D; with
  ``bidirectional`` the two directions are averaged), ``out = lstm(x) + x``, masked mean.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gpo_lit.errors import expect
from gpo_lit.pooling.base import Pooling, SetMask, register_pooling, work_dtype


def masked_mean(x: Tensor, mask: SetMask) -> Tensor:
    """Mean of ``x [B, N, D]`` over each set's valid positions, accumulated in fp32 (fp64)."""
    work = work_dtype(x.dtype)
    total = x.to(work).masked_fill(mask.pad, 0.0).sum(dim=1)
    return (total / mask.counts(work)).to(x.dtype)


@register_pooling("temporal_transformer")
class TemporalTransformerPooling(Pooling):
    """Position embeddings + Transformer encoder over frames, residual, masked mean.

    ``[B, N, D], lengths [B] -> [B, D]``. Sequences longer than ``max_len`` are an error.

    Args:
        max_len: number of learned position embeddings (the most frames a video may have).
        n_layers: encoder layers (CLIP4Clip: 4).
        n_heads: attention heads; None = D // 64 (at least 1; must divide D).
        ff_mult: feed-forward width = ff_mult · D.
        dropout: dropout inside the encoder layers.
    """

    fp32 = False  # the encoder runs in the input's dtype (autocast welcome); the mean in fp32

    def __init__(
        self,
        *,
        dim: int,
        max_len: int = 64,
        n_layers: int = 1,
        n_heads: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(dim=dim)
        name = "temporal_transformer pooling"
        expect(isinstance(max_len, int) and max_len >= 1, f"{name} max_len", "an int >= 1", max_len)
        expect(
            isinstance(n_layers, int) and n_layers >= 1, f"{name} n_layers", "an int >= 1", n_layers
        )
        heads = max(1, dim // 64) if n_heads is None else n_heads
        expect(
            isinstance(heads, int) and heads >= 1 and dim % heads == 0,
            f"{name} n_heads",
            f"a positive divisor of dim {dim}",
            heads,
        )
        expect(isinstance(ff_mult, int) and ff_mult >= 1, f"{name} ff_mult", "an int >= 1", ff_mult)
        expect(0.0 <= dropout < 1.0, f"{name} dropout", "a value in [0, 1)", dropout)
        self.max_len, self.n_layers, self.n_heads = max_len, n_layers, heads
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=ff_mult * dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, n_layers, enable_nested_tensor=False, norm=nn.LayerNorm(dim)
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.max_len}, n_layers={self.n_layers}, n_heads={self.n_heads}"

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        n = x.shape[1]
        expect(
            n <= self.max_len,
            "temporal_transformer pooling input",
            f"at most max_len={self.max_len} frames (raise model.pooling.max_len)",
            n,
        )
        # Zero the padding: attention gives padded keys weight 0, but 0 · NaN garbage is NaN.
        x = x.masked_fill(mask.pad, 0.0)
        h = x + self.pos.weight[:n].to(x.dtype).unsqueeze(0)
        h = self.encoder(h, src_key_padding_mask=~mask.valid)
        return masked_mean(h + x, mask)


@register_pooling("lstm")
class LSTMPooling(Pooling):
    """Packed LSTM over the valid frames, residual, masked mean: ``[B, N, D] -> [B, D]``.

    ``lengths`` are moved to the CPU for packing (one device sync per call on accelerators).

    Args:
        n_layers: stacked LSTM layers (CLIP4Clip: 1).
        bidirectional: also run backwards; the two directions are averaged (width stays D).
        dropout: between stacked layers (only with n_layers > 1).
    """

    fp32 = False  # the LSTM runs in the input's dtype; the mean in fp32

    def __init__(
        self, *, dim: int, n_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__(dim=dim)
        expect(
            isinstance(n_layers, int) and n_layers >= 1,
            "lstm pooling n_layers",
            "an int >= 1",
            n_layers,
        )
        expect(0.0 <= dropout < 1.0, "lstm pooling dropout", "a value in [0, 1)", dropout)
        self.bidirectional = bool(bidirectional)
        self.lstm = nn.LSTM(
            dim,
            dim,
            num_layers=n_layers,
            batch_first=True,
            bidirectional=self.bidirectional,
            dropout=dropout if n_layers > 1 else 0.0,
        )

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:
        n = x.shape[1]
        self.lstm.flatten_parameters()
        lengths = mask.host if mask.host is not None else mask.lengths.cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=n)  # zeros past lengths
        if self.bidirectional:
            h = h.view(h.shape[0], n, 2, self.dim).mean(dim=2)
        return masked_mean(h.to(x.dtype) + x, mask)
