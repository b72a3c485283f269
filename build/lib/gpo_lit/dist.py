"""Collective helpers for DDP: gathering with gradients (training) and by index (evaluation)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x [b, ...]`` concatenated in rank order: ``[world·b, ...]``, differentiable.

    The backward pass *sums* the incoming gradients of every rank into each rank's slice. With
    every rank computing the same loss over the gathered batch, that sum is ``world ×`` the
    single-process gradient, which DDP's gradient averaging then divides back: parameters get
    exactly the gradient of one process holding the whole batch. (Gathering without gradients
    and re-inserting the local slice would give ``1/world`` of it.)
    """
    if world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still supported
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' ``x [b, ...]`` concatenated in rank order, without gradients (ids, masks)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
