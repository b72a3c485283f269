"""Intra-op thread control for stretches of small CPU ops (GPO's generator, the ranker's shards),
and the machine's load that decides it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages, or None where this platform has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):  # not on this platform
        return None


def machine_busy() -> bool:
    """Whether other processes compete for this machine's cores: the 1-minute load average is
    above its cores + 1 (this process's own threads count in the load). False where the load is
    unreadable."""
    load = _loadavg()
    return load is not None and load[0] > (os.cpu_count() or 1) + 1


def load_average() -> str:
    """This machine's load as every benchmark prints it: ``load average 1.02 0.80 0.45 (1, 5,
    15 min) on 2 CPUs``, or ``load average unknown on 2 CPUs``."""
    load = _loadavg()
    figures = "unknown" if load is None else " ".join(f"{v:.2f}" for v in load) + " (1, 5, 15 min)"
    return f"load average {figures} on {os.cpu_count() or 1} CPUs"


@contextmanager
def one_thread(device: torch.device, when_busy: bool = False) -> Iterator[None]:
    """Run a stretch of small CPU ops on one intra-op thread. Each multi-threaded call (even a
    32x96 matmul goes to the BLAS's threads) is a parallel region whose threads must all be
    scheduled; on a busy machine that costs milliseconds per call, often more than the work
    (GPO's generator makes hundreds of tiny calls; the ranker's per-shard counting dozens of
    memory-bound ones beside one big matmul). A no-op off the CPU or at one thread already.

    ``when_busy``: only while :func:`machine_busy`, for big memory-bound passes: on idle cores
    they run faster on every thread, on a busy machine slower (each region waits for its slowest,
    descheduled thread)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or (when_busy and not machine_busy()):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
