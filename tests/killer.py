"""Callbacks for the resume tests: a signal to this process at a given point of a run (SIGKILL:
no cleanup, no save; SIGTERM: what a scheduler or ``kill`` sends), once per run folder (a marker
file there), so the resume command can repeat the overrides; and a disk that fills up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pytorch_lightning import Callback


class SignalAtStep(Callback):
    """Send ``signum`` at the end of the batch of ``stage`` (train, validation, test) at which
    the trainer's global step is ``step`` (any step for test)."""

    def __init__(self, step: int, signum: str = "SIGTERM", stage: str = "train") -> None:
        self.step, self.stage = step, stage
        self.signum = getattr(signal, signum)

    def _fire(self, trainer, stage: str) -> None:
        marker = Path(trainer.default_root_dir) / f".{self.signum.name}-sent"
        due = stage == self.stage and (stage == "test" or trainer.global_step == self.step)
        if due and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        self._fire(trainer, "train")

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.state.fn == "fit":
            self._fire(trainer, "validation")

    def on_test_batch_end(self, trainer, *args, **kwargs) -> None:
        self._fire(trainer, "test")


class KillAtStep(SignalAtStep):
    def __init__(self, step: int) -> None:
        super().__init__(step, "SIGKILL")


class DiskFullAtStep(Callback):
    """From ``step`` on, the disk reports 1 KiB free (as ``shutil.disk_usage`` sees it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            import shutil

            usage = shutil.disk_usage("/")
            shutil.disk_usage = lambda path: usage._replace(free=1024)
