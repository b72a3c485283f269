"""Collate padding and the epoch-seeded sampler."""

from __future__ import annotations

import torch

from gpo_lit.data.collate import Collate, pad_ids, pad_sets
from gpo_lit.data.sampling import EpochShuffleSampler


def test_pad_sets_and_ids() -> None:
    sets = [torch.ones(3, 2), 2 * torch.ones(1, 2)]
    x, lengths = pad_sets(sets)
    assert x.shape == (2, 3, 2) and lengths.tolist() == [3, 1]
    assert torch.all(x[1, 1:] == 0) and torch.all(x[1, 0] == 2)
    ids, lengths = pad_ids([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]


def test_collate_mixed_items() -> None:
    batch = Collate(pad_id=9)(
        [
            {"img": torch.zeros(2, 3), "cap": [1, 2], "img_idx": 4, "cap_idx": 20},
            {"img": torch.zeros(1, 3), "cap": [5], "img_idx": 0, "cap_idx": 1},
        ]
    )
    assert batch["cap"].tolist() == [[1, 2], [5, 9]]
    assert batch["img_len"].tolist() == [2, 1] and batch["img_idx"].tolist() == [4, 0]


def test_sampler_is_a_function_of_seed_and_epoch() -> None:
    s = EpochShuffleSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(50)) and {e for _, e in first} == {2}
    again = EpochShuffleSampler(50, seed=3)
    again.set_epoch(2)
    assert list(again) == first  # a resumed run replays the same order
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in first]
    assert [i for i, _ in EpochShuffleSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_loader_settings_follow_workers_and_device() -> None:
    """Workers persist, prefetch as configured and start with WorkerInit (the trainer's rank);
    memory is pinned only for a CUDA trainer."""
    from types import SimpleNamespace

    import torch

    from gpo_lit.data.datamodule import RetrievalDataModule
    from gpo_lit.data.workers import WorkerInit

    def kwargs(workers: int, device: str, prefetch: int | None = None) -> dict:
        dm = RetrievalDataModule("unused", num_workers=workers, prefetch_factor=prefetch)
        strategy = SimpleNamespace(root_device=torch.device(device))
        dm.trainer = SimpleNamespace(strategy=strategy, global_rank=3)
        got = dm._loader_kwargs()
        init = got.pop("worker_init_fn", None)
        assert (init is None) == (workers == 0)
        assert init is None or (isinstance(init, WorkerInit) and init.rank == 3)  # seeds by rank
        return got

    assert kwargs(0, "cpu") == {"num_workers": 0, "pin_memory": False}
    assert kwargs(0, "cuda") == {"num_workers": 0, "pin_memory": True}
    assert kwargs(2, "cuda", 4) == {
        "num_workers": 2,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    assert kwargs(2, "cpu") == {"num_workers": 2, "pin_memory": False, "persistent_workers": True}
