"""Padding variable-size sets (regions, frames) and token sequences into batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_sets(sets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack sets ``[n_i, D]`` into (``[B, max n_i, D]`` zero-padded, ``lengths [B]`` int64)."""
    lengths = torch.tensor([s.shape[0] for s in sets], dtype=torch.long)
    out = sets[0].new_zeros(len(sets), int(lengths.max()), *sets[0].shape[1:])
    for i, s in enumerate(sets):
        out[i, : s.shape[0]] = s
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
