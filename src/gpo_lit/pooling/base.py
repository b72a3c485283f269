"""The pooling interface, its input checks and the name registry.

Every operator reduces a padded set ``x [B, N, D]`` with ``lengths [B]`` (valid elements are
``x[i, :lengths[i]]``) to ``[B, D]``. Padding content is arbitrary and must never reach the output.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpo_lit.errors import GpoLitError, expect

_REGISTRY: dict[str, type[Pooling]] = {}


@dataclass(frozen=True)
class SetMask:
    """Where a padded batch is valid, built once by :meth:`Pooling.forward` for the operator.

    lengths: int64 ``[B]`` on the features' device; valid: bool ``[B, N]``; pad: bool
    ``[B, N, 1]`` (``~valid``, broadcasts over D); host: the caller's lengths when they were on the
    CPU (read without a device sync), else None.
    """

    lengths: Tensor
    valid: Tensor
    pad: Tensor
    host: Tensor | None

    def counts(self, dtype: torch.dtype) -> Tensor:
        """Set sizes ``[B, 1]`` in ``dtype`` (to divide sums by)."""
        return self.lengths.unsqueeze(1).to(dtype)


class Pooling(nn.Module):
    """Base class: ``forward(x [B, N, D], lengths [B]) -> [B, D]``.

    The contract lives here, once: ``forward`` checks the inputs, builds the padding mask
    (:class:`SetMask`), runs the operator's arithmetic (:meth:`pool`) with autocast off on
    ``x`` in fp32 (fp64 if given; masks, powers and exponentials overflow fp16), and casts the
    result back to x's dtype. An operator only implements :meth:`pool` (and, if it has weights
    to inspect, :meth:`pool_weights`); it overwrites the padding (``masked_fill``, never
    arithmetic) before using it, so no padding value — huge, inf or NaN — reaches the output or
    the gradients. Sequence models that run in the input's dtype set ``fp32 = False``.
    Subclasses take ``dim`` (feature width D, even when unused) as a keyword plus their options.
    """

    name: str = ""
    fp32: bool = True  # run pool() on fp32 (fp64) features with autocast off

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        expect(isinstance(dim, int) and dim > 0, f"pooling {self.name!r} dim", "an int > 0", dim)
        self.dim = dim

    def forward(
        self, x: Tensor, lengths: Tensor, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x [B, N, D]``, ``lengths [B]`` -> pooled ``[B, D]`` in x's dtype; with
        ``return_weights`` (operators that have them) also their weights (fp32 or fp64)."""
        host = self._host_lengths(lengths)
        lengths = check_inputs(x, lengths, f"{self.name} pooling")
        valid = valid_mask(lengths, x.shape[1])
        mask = SetMask(lengths, valid, ~valid.unsqueeze(-1), host)
        # fp32 = False: autocast left as the caller set it.
        off = torch.autocast(device_type=x.device.type, enabled=False)
        with off if self.fp32 else contextlib.nullcontext():
            xw = x.to(work_dtype(x.dtype)) if self.fp32 else x
            if return_weights:
                pooled, weights = self.pool_weights(xw, mask)
                return pooled.to(x.dtype), weights
            return self.pool(xw, mask).to(x.dtype)

    @staticmethod
    def _host_lengths(lengths: Tensor) -> Tensor | None:
        """``lengths`` if reading them costs no device sync (they are on the CPU), else None."""
        return lengths if lengths.device.type == "cpu" else None

    def pool(self, x: Tensor, mask: SetMask) -> Tensor:  # pragma: no cover - interface
        """The operator's arithmetic: ``x [B, N, D]`` (fp32/fp64 unless ``fp32 = False``;
        padding arbitrary) -> ``[B, D]``."""
        raise NotImplementedError

    def pool_weights(self, x: Tensor, mask: SetMask) -> tuple[Tensor, Tensor]:
        """``pool`` and the operator's weights, for ``forward(..., return_weights=True)``."""
        raise GpoLitError(
            f"pooling {self.name!r} return_weights: expected an operator with weights to "
            f"inspect, found {self.name!r} without"
        )


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The pooling arithmetic's dtype for features in ``dtype``: fp32, or fp64 if given."""
    return torch.promote_types(dtype, torch.float32)


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
