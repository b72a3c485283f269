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
    the trainer's global step is ``step`` (any step for test); to this process, or with
    ``group`` to its whole process group (run it in a session of its own); with ``rank``, in
    that rank's process only."""

    def __init__(
        self,
        step: int,
        signum: str = "SIGTERM",
        stage: str = "train",
        group: bool = False,
        rank: int | None = None,
    ) -> None:
        self.step, self.stage, self.group, self.rank = step, stage, group, rank
        self.signum = getattr(signal, signum)

    def _fire(self, trainer, stage: str) -> None:
        marker = Path(trainer.default_root_dir) / f".{self.signum.name}-sent"
        due = stage == self.stage and (stage == "test" or trainer.global_step == self.step)
        due = due and self.rank in (None, trainer.global_rank)
        if due and not marker.exists():
            marker.touch()
            if self.group:  # every process of the run, DataLoader workers too (as SLURM does)
                os.killpg(os.getpgrp(), self.signum)
            else:
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


class Resubmittable:
    """A submitit job function that can be requeued (like Hydra's submitit launcher, whose
    ``checkpoint`` resubmits the same call)."""

    def __call__(self) -> None:  # never run here
        raise AssertionError("not a real submitit job")

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


class SubmititSignals(Callback):
    """Install submitit's own signal handlers (SIGUSR2: checkpoint the job function, requeue it
    with ``scontrol requeue``, exit; SIGTERM: ignored), as submitit's job runner does before the
    job function starts; its files go to ``folder``."""

    def __init__(self, folder: str) -> None:
        from submitit.core.utils import DelayedSubmission, JobPaths
        from submitit.slurm.slurm import SlurmJobEnvironment

        delayed = DelayedSubmission(Resubmittable())
        delayed.set_timeout(60, 3)  # minutes, requeues left: as a submitted job has
        paths = JobPaths(folder, job_id=os.environ["SLURM_JOB_ID"])
        paths.folder.mkdir(parents=True, exist_ok=True)  # submitit's, made when it submitted
        SlurmJobEnvironment()._handle_signals(paths, delayed)
