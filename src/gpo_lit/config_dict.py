"""A config node as a plain ``dict``, typed: ``OmegaConf.to_container`` may return a list, a
string or None, so every caller that wants a mapping goes through :func:`config_dict`."""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, OmegaConf


def config_dict(node: Any, *, resolve: bool = True) -> dict[str, Any]:
    """``node`` (a :class:`DictConfig`) as nested plain containers; a ``TypeError`` for anything
    else (a list node, a scalar), which no caller expects."""
    if not isinstance(node, DictConfig):
        raise TypeError(f"expected a DictConfig, found {type(node).__name__}")
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve))
