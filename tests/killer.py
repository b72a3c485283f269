"""Callbacks for the resume tests: a signal to this process at a given step of a fresh run
(SIGKILL: no cleanup, no save; SIGTERM: what a scheduler or ``kill`` sends). A resumed run
(``trainer.ckpt_path`` set) is left alone, so the resume command can repeat the overrides."""

from __future__ import annotations

import os
import signal

from pytorch_lightning import Callback


class SignalAtStep(Callback):
    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step = step
        self.signum = getattr(signal, signum)

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), self.signum)


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
