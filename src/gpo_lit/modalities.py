"""The two modalities of a VSE model and which pooling each one uses (no torch: the report and
the configs read it without building a model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODALITIES = ("visual", "text")
# Set sizes θ is drawn at when neither an option nor the data says: BUTD's 36 regions per image,
# a typical caption length.
DEFAULT_THETA_SIZE = {"visual": 36, "text": 12}


def pooling_for(model: Mapping[str, Any], modality: str) -> Any:
    """The pooling node ``modality`` uses in a model config (``VSEModel`` kwargs, its
    ``hyper_parameters``): ``<modality>_pooling`` when set, else the shared ``pooling``."""
    return model.get(f"{modality}_pooling") or model.get("pooling")


def pool_attr(modality: str) -> str:
    """The model attribute (and state-dict prefix) holding ``modality``'s pooling module."""
    return f"{modality}_pool"
