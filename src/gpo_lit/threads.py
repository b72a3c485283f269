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


def _runnable_now() -> int | None:
    """Tasks (threads) runnable on this machine at this instant, this one included, from
    ``/proc/loadavg``'s ``running/total`` field; None where there is no such file."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_busy() -> bool:
    """Whether other processes compete for this machine's cores now: more tasks runnable at this
    instant than there are cores (this process's own threads count: right after a parallel region
    its workers are still spinning). Without ``/proc``, the 1-minute load average above the cores
    + 1; False where neither is readable. The instant count, not the load average: the average
    takes a minute to rise when other jobs start and minutes to fall after they end."""
    cores = os.cpu_count() or 1
    runnable = _runnable_now()
    if runnable is not None:
        return runnable > cores
    load = _loadavg()
    return load is not None and load[0] > cores + 1


def load_average() -> str:
    """This machine's load as every benchmark prints it: ``load average 1.02 0.80 0.45 (1, 5,
    15 min) on 2 CPUs``, or ``load average unknown on 2 CPUs``."""
    load = _loadavg()
    figures = "unknown" if load is None else " ".join(f"{v:.2f}" for v in load) + " (1, 5, 15 min)"
    return f"load average {figures} on {os.cpu_count() or 1} CPUs"


@contextmanager
def one_thread(device: torch.device, when: bool = True) -> Iterator[None]:
    """Run a stretch of small CPU ops on one intra-op thread. Each multi-threaded call (even a
    32x96 matmul goes to the BLAS's threads) is a parallel region whose threads must all be
    scheduled; on a busy machine that costs milliseconds per call, often more than the work
    (GPO's generator makes hundreds of tiny calls; the ranker's per-shard counting dozens of
    memory-bound ones beside one big matmul). A no-op off the CPU or at one thread already.

    ``when``: False leaves the threads as they are (the ranker's memory-bound passes run on every
    thread on idle cores and on one only while :func:`machine_busy`)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not when:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
