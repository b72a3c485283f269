"""Pooling operators behind one interface, ``forward(x [B, N, D], lengths [B]) -> [B, D]``, built by
name: ``create_pooling(name, dim=..., **options)`` (configs in ``conf/model/pooling/``)."""

from gpo_lit.pooling.base import (
    Pooling,
    SetMask,
    available_poolings,
    check_inputs,
    create_pooling,
    register_pooling,
    valid_mask,
)
from gpo_lit.pooling.basic import KMaxPooling, MaxPooling, MeanPooling
from gpo_lit.pooling.gpo import GPO, positional_encoding, sorted_weighted_sum

# Importing these registers them: the pooling zoo, GPO's ablation variants, sequence models.
from gpo_lit.pooling import gpo_variants, sequence, zoo  # noqa: E402,F401  isort: skip

__all__ = [
    "GPO",
    "KMaxPooling",
    "MaxPooling",
    "MeanPooling",
    "Pooling",
    "SetMask",
    "available_poolings",
    "check_inputs",
    "create_pooling",
    "positional_encoding",
    "register_pooling",
    "sorted_weighted_sum",
    "valid_mask",
]
