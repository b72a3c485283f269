"""What every DataLoader worker of a run does first: ignore the stop signals, seed itself.

A scheduler signals every process of a job, not only the training process: ``scancel`` and a
preemption send SIGTERM, and SLURM's ``--signal`` the requeue signal, to the DataLoader workers
too. A worker left as PyTorch sets it up exits on SIGTERM (and SIGUSR1/2 end any process that
keeps their default), the next batch then fails with "DataLoader worker … exited unexpectedly",
and the run dies before :class:`gpo_lit.resume.StopOnSignal` can save it. The workers ignore
them; the training process stops at its next step and shuts its workers down as usual (through
their queues; an orphaned worker notices its parent is gone and exits).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal

from lightning_fabric.utilities.seed import pl_worker_init_function

# The signals StopOnSignal acts on (SIGTERM; SIGUSR2 is cluster=slurm's requeue signal, SIGUSR1
# Lightning's default one), whose default action in a worker is to end it. SIGINT stays: a
# Ctrl-C ends the workers and the run as PyTorch and Lightning handle it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class WorkerInit:
    """A DataLoader ``worker_init_fn``: ignore :data:`STOP_SIGNALS`, then seed the worker as
    Lightning does for a loader without one (``seed_everything(workers=True)``: the same seeds
    as before this existed). Picklable (a spawned worker gets a copy)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning's own init would do
            pl_worker_init_function(worker_id, rank=self.rank)


def end_workers() -> None:
    """Kill this process's daemonic children (DataLoader workers) before it exits on an error.

    At exit, multiprocessing ends daemonic children with SIGTERM and waits for them; these
    ignore it, so a run that fails while persistent workers are alive (a bad validation item
    read in a worker) would print its error and never exit. A worker holds nothing to save.
    PyTorch's SIGCHLD handler (which raises when a worker dies) is reset first: the process is
    on its way out."""
    workers = [c for c in multiprocessing.active_children() if c.daemon]
    if not workers:
        return
    with contextlib.suppress(ValueError):  # signal handlers are the main thread's to set
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=10)
