"""The uncertainty (log σ²) head of probabilistic embeddings (PCME++, REFERENCE.md §12).

PCME++ runs one extra transformer block in parallel to the last block of its CLIP towers, then its
own Linear and its own GPO, giving ``log σ²`` (no l2-normalisation). gpo_lit's encoders return a
*set* ``[B, N, d]`` for every modality (regions, grid cells, frames, tokens), so the head here sits
on that set output: its own ``Linear(d → d)`` (Xavier-uniform, zero bias, as PCME++ initialises its
σ Linear) and its own pooling operator (GPO by default), on the same set and lengths as the mean's
pooling — size augmentation included. The parallel transformer block of the CLIP towers is not
part of it.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gpo_lit.pooling import create_pooling


class UncertaintyHead(nn.Module):
    """Set ``[B, N, d]`` + lengths → ``log σ² [B, d]``.

    Args:
        dim: the set's width d (the joint embedding width).
        pooling: ``{"name": ..., **options}`` of its own pooling operator.
        bias_init: initial bias of the Linear, i.e. log σ² at initialisation (PCME++'s
            ``bias_init``, 0 in its released configs; negative values start with small σ²).
    """

    def __init__(self, dim: int, pooling: dict, bias_init: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        r = math.sqrt(6.0) / math.sqrt(2 * dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.constant_(self.fc.bias, float(bias_init))
        self.pool = create_pooling(dim=dim, **pooling)

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        return self.pool(self.fc(feats), lengths)
