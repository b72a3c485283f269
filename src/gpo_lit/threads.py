"""Intra-op thread control for stretches of small CPU ops (GPO's generator, the ranker's shards)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run a stretch of small CPU ops on one intra-op thread. Each multi-threaded call (even a
    32x96 matmul goes to the BLAS's threads) is a parallel region whose threads must all be
    scheduled; on a busy machine that costs milliseconds per call, often more than the work
    (GPO's generator makes hundreds of tiny calls; the ranker's per-shard counting dozens of
    memory-bound ones beside one big matmul). A no-op off the CPU or at one thread already."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
