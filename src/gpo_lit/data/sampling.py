"""Epoch-seeded shuffling: data order and augmentation are pure functions of (seed, epoch, index).

That is what makes a resumed run replay exactly what an uninterrupted one would have seen, and
what lets each rank of a DDP job take its own shard without a second sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` pairs in an order seeded by ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each training epoch. Under ``torch.distributed``
    each rank takes every ``world_size``-th index of the same permutation, after trimming the
    permutation to a multiple of ``world_size`` (the trimmed tail differs every epoch).

    Args:
        size: number of items.
        seed: base seed of the run.
        shuffle: False keeps the natural order (still yields the epoch).
        rank, world_size: this process's share; None (default) reads them from
            ``torch.distributed`` at iteration time.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0

    def skip_next(self, n_items: int) -> None:
        """Leave out the first ``n_items`` of the next pass only (a resumed, half-done epoch)."""
        self._skip = n_items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        rank, world = self._rank_world()
        usable = len(order) // world * world
        skip, self._skip = self._skip, 0
        for index in order[rank:usable:world][skip:]:
            yield index, self.epoch

    def __len__(self) -> int:
        return self.size // self._rank_world()[1]


class ResumableDataLoader(DataLoader):
    """A training loader that Lightning can put back mid-epoch (its ``_Stateful`` protocol).

    Lightning calls :meth:`load_state_dict` when it restores a checkpoint saved inside an epoch,
    right before iterating; the sampler then skips the batches that were already trained on, so a
    resumed run sees exactly the batches an uninterrupted one would have.

    Args:
        batches_done: given the loader's batches per epoch, the number of batches of the current
            epoch already trained on (read at restore time from the trainer's restored counters).
    """

    def __init__(self, *args, batches_done: Callable[[int], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        # Lightning swaps in a SequentialSampler for overfit_batches: epoch 0, nothing to skip.
        return {"epoch": getattr(self.sampler, "epoch", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochShuffleSampler):
            return
        assert self.batch_size is not None  # made with a batch size (no batch_sampler)
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip_next(self._batches_done(len(self)) * self.batch_size)
