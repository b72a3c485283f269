"""The pooling interface, its input checks and the name registry.

Every operator reduces a padded set ``x [B, N, D]`` with ``lengths [B]`` (valid elements are
``x[i, :lengths[i]]``) to ``[B, D]``. Padding content is arbitrary and must never reach the output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gpo_lit.errors import GpoLitError, expect

_REGISTRY: dict[str, type[Pooling]] = {}


class Pooling(nn.Module):
    """Base class: ``forward(x [B, N, D], lengths [B]) -> [B, D]``.

    Subclasses take ``dim`` (feature width D, even when unused) as a keyword plus their own options.
    """

    name: str = ""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        expect(isinstance(dim, int) and dim > 0, f"pooling {self.name!r} dim", "an int > 0", dim)
        self.dim = dim

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def valid_mask(lengths: Tensor, n: int) -> Tensor:
    """``mask[i, j] = j < lengths[i]``: bool ``[B, n]`` on ``lengths.device``."""
    return torch.arange(n, device=lengths.device) < lengths.unsqueeze(1)


def check_inputs(x: Tensor, lengths: Tensor, where: str) -> Tensor:
    """Check shapes (always) and values (only when ``lengths`` is on the CPU, where it costs no
    device sync); return ``lengths`` as int64 on ``x.device``."""
    expect(x.dim() == 3, f"{where} input", "features [B, N, D]", f"shape {tuple(x.shape)}")
    b, n = x.shape[0], x.shape[1]
    expect(
        lengths.dim() == 1 and lengths.shape[0] == b,
        f"{where} lengths",
        f"shape ({b},)",
        f"shape {tuple(lengths.shape)}",
    )
    expect(
        not lengths.is_floating_point() and not lengths.is_complex(),
        f"{where} lengths",
        "an integer tensor",
        lengths.dtype,
    )
    if lengths.device.type == "cpu" and b > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        expect(lo >= 1 and hi <= n, f"{where} lengths", f"values in [1, {n}]", f"[{lo}, {hi}]")
    return lengths.to(device=x.device, dtype=torch.long, non_blocking=True)


def register_pooling(name: str) -> Callable[[type[Pooling]], type[Pooling]]:
    """Class decorator: make ``create_pooling(name, ...)`` build this class."""

    def deco(cls: type[Pooling]) -> type[Pooling]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise GpoLitError(
                f"pooling name: expected a new name, found {name!r} already registered"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_poolings() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def create_pooling(name: str, dim: int, **kwargs: object) -> Pooling:
    """Build the operator registered as ``name`` with feature width ``dim`` and its options."""
    expect(name in _REGISTRY, "pooling name", f"one of {available_poolings()}", repr(name))
    cls = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    options = sorted(p for p in params if p not in ("self", "dim"))
    unknown = sorted(set(kwargs) - set(options))
    expect(not unknown, f"pooling {name!r} options", f"a subset of {options}", unknown)
    return cls(dim=dim, **kwargs)
