"""DataLoader workers ignore the stop signals a scheduler sends every process of a job, and are
seeded exactly as Lightning seeds a loader's workers (``gpo_lit.data.workers.WorkerInit``)."""

from __future__ import annotations

import random
import signal
from functools import partial

import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset

from gpo_lit.data.workers import STOP_SIGNALS, WorkerInit


class _WhatAWorkerSees(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        handlers = tuple(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
        draws = (torch.rand(1).item(), float(np.random.rand()), random.random())
        return handlers, draws


def _seen(init, monkeypatch) -> list:
    monkeypatch.setenv("PL_SEED_WORKERS", "1")  # seed_everything(workers=True), as training
    torch.manual_seed(7)
    loader = DataLoader(_WhatAWorkerSees(), batch_size=None, num_workers=2, worker_init_fn=init)
    return [(tuple(h), tuple(d)) for h, d in loader]  # the loader hands back lists


def test_workers_ignore_the_stop_signals_and_are_seeded_as_lightning_seeds_them(monkeypatch):
    ours = _seen(WorkerInit(rank=1), monkeypatch)
    lightnings = _seen(partial(pl_worker_init_function, rank=1), monkeypatch)
    assert [h for h, _ in ours] == [(True,) * len(STOP_SIGNALS)] * 4
    assert [h for h, _ in lightnings] == [(False,) * len(STOP_SIGNALS)] * 4  # PyTorch's own
    assert [d for _, d in ours] == [d for _, d in lightnings]  # the same draws, every library
    assert len({d for _, d in ours}) == 4


HOLDS_EXIT = """
import sys
from torch.utils.data import DataLoader
from gpo_lit.cli import report_errors
from gpo_lit.data.workers import WorkerInit
from gpo_lit.errors import GpoLitError

loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True,
                    worker_init_fn=WorkerInit(0))
it = iter(loader)  # alive, as Lightning's validation loader is when a bad item stops the run
next(it)

@report_errors
def task(cfg):
    raise GpoLitError("data.npy: expected finite features, found NaN")

task(None)
"""


def test_an_error_with_persistent_workers_alive_exits_with_its_line(tmp_path) -> None:
    # The workers ignore SIGTERM, which is how multiprocessing ends daemonic children at exit:
    # without ending them first the run printed its error line and never exited.
    import subprocess
    import sys

    from helpers import ENV

    script = tmp_path / "holds_exit.py"
    script.write_text(HOLDS_EXIT)
    res = subprocess.run(
        [sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "error: data.npy: expected finite features, found NaN"
    )
