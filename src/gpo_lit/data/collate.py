"""Padding variable-size sets (regions, frames) and token sequences into batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info


class SetRead(Protocol):
    """A set not read yet (e.g. :class:`gpo_lit.data.formats.precomp.RegionRead`): its ``shape``
    ``(n, D)``, numpy ``dtype``, and ``read_into(out)`` writing it into an ``[n, D]`` array."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read_into(self, out: np.ndarray) -> None: ...


class BatchBuffers:
    """Reused batch arrays for the main process (0 loader workers).

    A fresh batch of 128 x 36 x 2048 float32 (38 MB) costs more in page faults than in copying
    (glibc maps allocations that large anew each time, and the kernel zero-fills every page). A
    buffer is handed out again only once nothing else holds its memory: its storage's reference
    count shows no tensor or view besides the pool's own (a batch still in the model, held by
    autograd, or prefetched keeps its buffer). At most ``size`` buffers are kept.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._flat: list[Tensor] = []

    @staticmethod
    def _free(flat: Tensor) -> bool:
        # the pool's tensor and the temporary storage object itself: 2 references
        return torch._C._storage_Use_Count(flat.untyped_storage()._cdata) <= 2

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``shape`` (a view of a pooled buffer when one is free).

        Always a normal tensor, also when called under ``torch.inference_mode`` (Lightning's
        evaluation loops): an inference tensor in the pool could not be written after them."""
        with torch.inference_mode(False):
            return self._empty(shape, dtype)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = int(np.prod(shape))
        if not hasattr(torch._C, "_storage_Use_Count"):  # a torch without it: no reuse
            return torch.empty(shape, dtype=dtype)
        for k, flat in enumerate(self._flat):
            if flat.dtype == dtype and self._free(flat):
                if flat.numel() < numel:  # grow (a longer set, or a larger batch)
                    flat = self._flat[k] = torch.empty(numel, dtype=dtype)
                return flat[:numel].view(shape)
        flat = torch.empty(numel, dtype=dtype)
        if len(self._flat) < self.size:
            self._flat.append(flat)
        return flat.view(shape)

    def __getstate__(self) -> dict:  # a worker process starts with its own (empty) pool
        return {"size": self.size, "_flat": []}


_MAIN_BUFFERS = BatchBuffers()


def _batch_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, buffers: BatchBuffers | None
) -> Tensor:
    """Uninitialised ``shape``: in shared memory inside a DataLoader worker (what sending the
    batch to the main process needs anyway: no second copy there), else from ``buffers``."""
    if get_worker_info() is not None:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    if buffers is None:
        return torch.empty(shape, dtype=dtype)
    return buffers.empty(shape, dtype)


def pad_sets(
    sets: Sequence[Tensor | SetRead], buffers: BatchBuffers | None = _MAIN_BUFFERS
) -> tuple[Tensor, Tensor]:
    """Stack sets ``[n_i, D]`` into (``[B, max n_i, D]`` zero-padded, ``lengths [B]`` int64).

    Each set (a tensor, or a :class:`SetRead` read straight into its slot) is written once into
    an uninitialised batch and only the padding is zeroed. ``buffers`` (main process only) reuses
    batch memory that nothing holds any more; None allocates every batch.
    """
    lengths = torch.tensor([s.shape[0] for s in sets], dtype=torch.long)
    first = sets[0]
    dtype = (
        first.dtype
        if isinstance(first, Tensor)
        else torch.from_numpy(np.empty(0, first.dtype)).dtype
    )
    n = int(lengths.max())
    out = _batch_tensor((len(sets), n, *first.shape[1:]), dtype, buffers)
    out_np = None
    for i, s in enumerate(sets):
        m = s.shape[0]
        if isinstance(s, Tensor):
            out[i, :m] = s
        else:
            out_np = out.numpy() if out_np is None else out_np
            s.read_into(out_np[i, :m])
        if m < n:
            out[i, m:] = 0
    return out, lengths


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists → (``[B, max L]`` padded with ``pad_id``, ``lengths [B]`` int64)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


class Collate:
    """Collates dict items: ``img`` sets, ``cap`` token ids, and integer fields (indices).

    Any subset of the keys may be present: training items carry both modalities, evaluation
    items one of them plus their dataset index.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        keys = items[0].keys()
        if "img" in keys:
            batch["img"], batch["img_len"] = pad_sets([it["img"] for it in items])
        if "cap" in keys:
            batch["cap"], batch["cap_len"] = pad_ids([it["cap"] for it in items], self.pad_id)
        for key in keys - {"img", "cap"}:
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
        return batch
