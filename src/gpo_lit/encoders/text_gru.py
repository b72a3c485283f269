"""BiGRU text encoder over a word vocabulary (the VSE∞ BiGRU branch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gpo_lit.encoders.gru_cpu import bigru_padded, supports_padded


def bigru_unpacked(gru: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    """A bidirectional batch-first ``gru`` over padded ``x [B, L, D]`` with ``lengths [B]`` on
    x's device, reading nothing on the host: ``[B, L, 2H]`` (forward, then reverse direction),
    zero past each length; what packing, running ``gru`` and padding back to L give.

    Why: on an accelerator ``pack_padded_sequence`` / ``pad_packed_sequence`` need the lengths
    on the host and move the sort order between host and device (a sync every step). Here each
    direction of each layer is one GRU call over the padded batch (``torch.gru``, what ``nn.GRU``
    runs; cuDNN on a GPU): the forward direction reads each sequence from its start, so its
    valid steps never see the padding after them; the reverse direction reads each sequence
    reversed within its own length (a gather with device-side indices; the map is its own
    inverse, so the same gather puts its outputs back). Outputs past a length are zeroed, so no
    gradient reaches what the padding steps computed. Dropout between layers (``gru.dropout``,
    training only) is ``F.dropout``: the same distribution as ``nn.GRU``'s, other random draws.
    """
    b, width = x.shape[0], x.shape[1]
    steps = torch.arange(width, device=x.device)
    lengths = lengths.to(device=x.device, dtype=torch.long, non_blocking=True)
    valid = steps < lengths.unsqueeze(1)  # [B, L]
    rev = torch.where(valid, lengths.unsqueeze(1) - 1 - steps, steps)  # [B, L], an involution
    names = (
        ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if gru.bias else ("weight_ih", "weight_hh")
    )
    h0 = x.new_zeros(1, b, gru.hidden_size)
    out = x
    for layer in range(gru.num_layers):
        if layer and gru.dropout:
            out = F.dropout(out, gru.dropout, gru.training)
        fwd, bwd = (
            tuple(gru.get_parameter(f"{n}_l{layer}{suffix}") for n in names)
            for suffix in ("", "_reverse")
        )
        at = rev.unsqueeze(-1).expand(-1, -1, out.shape[-1])
        # one layer, one direction: (has_biases, num_layers, dropout, train, bidirectional,
        # batch_first), the arguments nn.GRU passes
        args = (gru.bias, 1, 0.0, gru.training, False, True)
        out_f = torch.gru(out, h0, fwd, *args)[0]
        out_r = torch.gru(out.gather(1, at), h0, bwd, *args)[0]
        out_r = out_r.gather(1, rev.unsqueeze(-1).expand(-1, -1, out_r.shape[-1]))
        out = torch.cat([out_f, out_r], dim=-1)
    return out.masked_fill(~valid.unsqueeze(-1), 0.0)


class BiGRUTextEncoder(nn.Module):
    """Word embedding → bidirectional GRU, the two directions averaged (REFERENCE §2).

    Args:
        vocab_size: number of word ids (filled in from the vocabulary by the model).
        word_dim: word embedding width (300; random init U(−0.1, 0.1), no GloVe).
        embed_dim: GRU hidden width = joint embedding width d.
        num_layers: GRU layers (1).
        cpu_recurrence: on the CPU, run the one-layer GRU with :mod:`gpo_lit.encoders.gru_cpu`
            (same numbers as packing, to float rounding; fewer, larger products; the default, as
            in the config) instead of ``nn.GRU`` on a packed sequence (False, as the authors'
            code); when the vocabulary has fewer words than the batch has tokens (the demo), the
            input projection is computed per word. Same parameters.

    On an accelerator the GRU runs unpacked (:func:`bigru_unpacked`: no host sync for the
    lengths) and the output keeps the padded width L (the collate pads to the longest caption,
    so L is the batch's max length).
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_dim: int = 1024,
        num_layers: int = 1,
        cpu_recurrence: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.embed_dim = embed_dim
        self.cpu_recurrence = cpu_recurrence

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """ids ``[B, L]`` (padded), lengths ``[B]`` → (``[B, L', d]`` with L' = max length (L on
        an accelerator), lengths on ids' device)."""
        d = self.embed_dim
        if self.cpu_recurrence and supports_padded(self.rnn, self.embed.weight):
            # a vocabulary smaller than the batch's tokens: project each word once, not each token
            words = self.embed.weight if self.embed.num_embeddings <= int(lengths.sum()) else None
            out = bigru_padded(self.rnn, self.embed(ids) if words is None else ids, lengths, words)
            return (out[..., :d] + out[..., d:]) / 2, lengths.to(ids.device)
        x = self.embed(ids)
        if ids.device.type != "cpu":  # packing would read the lengths on the host every step
            out = bigru_unpacked(self.rnn, x, lengths)
            return (out[..., :d] + out[..., d:]) / 2, lengths.to(ids.device, non_blocking=True)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        return (out[..., :d] + out[..., d:]) / 2, lengths.to(ids.device)


__all__ = ["BiGRUTextEncoder", "bigru_unpacked"]
