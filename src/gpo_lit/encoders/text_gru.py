"""BiGRU text encoder over a word vocabulary (the VSE∞ BiGRU branch)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gpo_lit.encoders.gru_cpu import bigru_padded, supports_padded


class BiGRUTextEncoder(nn.Module):
    """Word embedding → bidirectional GRU, the two directions averaged (REFERENCE §2).

    Args:
        vocab_size: number of word ids (filled in from the vocabulary by the model).
        word_dim: word embedding width (300; random init U(−0.1, 0.1), no GloVe).
        embed_dim: GRU hidden width = joint embedding width d.
        num_layers: GRU layers (1).
        cpu_recurrence: on the CPU, run the one-layer GRU with :mod:`gpo_lit.encoders.gru_cpu`
            (same numbers as packing, to float rounding; fewer, larger products) instead of
            ``nn.GRU`` on a packed sequence; when the vocabulary has fewer words than the batch
            has tokens (the demo), the input projection is computed per word. Same parameters.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_dim: int = 1024,
        num_layers: int = 1,
        cpu_recurrence: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.embed_dim = embed_dim
        self.cpu_recurrence = cpu_recurrence

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """ids ``[B, L]`` (padded), lengths ``[B]`` → (``[B, L', d]`` with L' = max length, lengths)."""
        d = self.embed_dim
        if self.cpu_recurrence and supports_padded(self.rnn, self.embed.weight):
            # a vocabulary smaller than the batch's tokens: project each word once, not each token
            words = self.embed.weight if self.embed.num_embeddings <= int(lengths.sum()) else None
            out = bigru_padded(self.rnn, self.embed(ids) if words is None else ids, lengths, words)
            return (out[..., :d] + out[..., d:]) / 2, lengths.to(ids.device)
        x = self.embed(ids)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)
        return (out[..., :d] + out[..., d:]) / 2, lengths.to(ids.device)


__all__ = ["BiGRUTextEncoder"]
