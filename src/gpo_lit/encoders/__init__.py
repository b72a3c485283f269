"""Encoders: each returns a *set* of features ``[B, N, d]`` plus lengths, never a pooled vector."""

from gpo_lit.encoders.grid import GridCellEncoder, GridEncoder
from gpo_lit.encoders.region import RegionEncoder
from gpo_lit.encoders.text_gru import BiGRUTextEncoder
from gpo_lit.encoders.text_hf import HFTextEncoder
from gpo_lit.encoders.text_transformer import TransformerTextEncoder
from gpo_lit.encoders.vit import ViTEncoder

__all__ = [
    "BiGRUTextEncoder",
    "GridCellEncoder",
    "GridEncoder",
    "HFTextEncoder",
    "RegionEncoder",
    "TransformerTextEncoder",
    "ViTEncoder",
]
