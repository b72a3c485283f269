"""A small transformer text tower built from a config (no download): CLIP's text-tower layout at
any size, over the word vocabulary (``kind: vocab`` tokenizer), for demos and tests.

Token + learned position embeddings → pre-LN transformer blocks (causal attention like CLIP's
text tower, or bidirectional) → final LayerNorm → ``Linear(width → d)`` per token. Every position
from the start to the end token is kept as the set (REFERENCE §12, text side); padding is masked
out of attention and out of the set by ``lengths``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpo_lit.errors import expect


class TransformerTextEncoder(nn.Module):
    """ids ``[B, L]`` → per-token features ``[B, L, d]``, lengths unchanged.

    Args:
        vocab_size: number of word ids (filled in from the vocabulary by the model).
        embed_dim: joint embedding width d.
        width: transformer width.
        layers: number of transformer blocks.
        heads: attention heads (``width`` must be a multiple).
        max_length: longest caption in tokens (the position table's size).
        causal: CLIP's causal attention (a token sees itself and the tokens before it).
        mlp_ratio: hidden width of each block's MLP over ``width``.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 1024,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 77,
        causal: bool = True,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        expect(width % heads == 0, "model.text.encoder.heads", f"a divisor of width {width}", heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(max_length, width))
        block = nn.TransformerEncoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, embed_dim)
        self.max_length = max_length
        self.causal = causal
        # CLIP's initialisation scales (token 0.02, position 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """ids ``[B, L]`` (padded), lengths ``[B]`` → (``[B, L, d]``, lengths)."""
        n = ids.shape[1]
        expect(
            n <= self.max_length,
            "model.text.encoder.max_length",
            f"at least the longest caption in the batch ({n} tokens)",
            self.max_length,
        )
        lengths = lengths.to(ids.device)
        x = self.token_embedding(ids) + self.position_embedding[:n]
        pad = torch.arange(n, device=ids.device)[None, :] >= lengths[:, None]  # True = padding
        mask = (
            torch.triu(torch.ones(n, n, dtype=torch.bool, device=ids.device), diagonal=1)
            if self.causal
            else None
        )
        x = self.blocks(x, mask=mask, src_key_padding_mask=pad, is_causal=self.causal)
        return self.linear(self.final_norm(x)), lengths


__all__ = ["TransformerTextEncoder"]
