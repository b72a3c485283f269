"""Stopping and resuming a training run without losing or repeating anything.

- :class:`StopOnSignal`: ``kill -TERM`` finishes the training step in progress, saves
  ``last.ckpt`` (atomically, through the trainer's checkpoint IO) and exits with status 143;
  :func:`gpo_lit.run_dir.resume_command` is the line that resumes it. SLURM's requeue signal
  (``cluster=slurm``) does the same, then requeues the job, which resumes from ``last.ckpt``.
- :class:`ResumableCSVLogger`: a resumed run appends to ``csv/metrics.csv``; rows the
  interrupted run logged after its checkpoint are dropped first (they are logged again).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from gpo_lit.checkpoint_io import load_torch_file
from gpo_lit.config_dict import config_dict
from gpo_lit.files import write_atomic
from gpo_lit.run_dir import config_changes, refuse_changes

log = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving its state; the process exits with status
    128 + the signal's number (143 for SIGTERM, as a shell reports a process it ended)."""

    def __init__(self, checkpoint: Path, step: int, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + signum)
        self.checkpoint, self.step, self.signum = checkpoint, step, signal.Signals(signum)


def slurm_requeues(trainer: pl.Trainer) -> bool:
    """Whether Lightning's SLURM environment owns the signals (``auto_requeue=true``: its own
    SIGUSR handler saves an hpc checkpoint wherever the signal lands and requeues the job; left
    exactly as Lightning has it)."""
    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and env.auto_requeue


def requeue_signal(trainer: pl.Trainer) -> signal.Signals | None:
    """The signal SLURM sends before the time limit or on preemption, where this run handles
    it (``cluster=slurm``: Lightning's SLURM environment with ``auto_requeue=false`` and its
    ``requeue_signal``); None elsewhere."""
    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment) and not env.auto_requeue:
        return env.requeue_signal
    return None


def requeue_job() -> None:
    """Put this SLURM job back in the queue (``scontrol requeue <job id>``, an array task as
    ``<array job>_<task>``); a failure is one warning line (the checkpoint is saved whatever)."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID", "")
    if not job.replace("_", "").isdigit():
        log.warning("not requeued: expected a SLURM job id in SLURM_JOB_ID, found %r", job)
        return
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("not requeued: scontrol requeue %s could not run (%s)", job, err)
        return
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        log.warning("not requeued: scontrol requeue %s failed: %s", job, why)
    else:
        log.info("requeued SLURM job %s", job)


def resumable_batch_end(trainer: pl.Trainer) -> bool:
    """Whether the end of this training batch may hold a checkpoint to resume from: not at an
    epoch's last batch, which Lightning 2.6 resumes without that epoch's validation and then
    stops as if ``max_epochs`` were reached. The same on every rank (a collective that follows
    the answer is never skipped by one rank alone)."""
    return not trainer.is_last_batch


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for ``last.ckpt``, saving only at a
    :func:`resumable_batch_end`: a save the time interval makes due at an epoch's last batch
    comes at the next batch; a step count's multiple falling there is skipped (the next one
    saves)."""

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if resumable_batch_end(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StopOnSignal(pl.Callback):
    """On SIGTERM, or on SLURM's requeue signal (:func:`requeue_signal`): save ``last_path`` at
    the end of the current training step, then stop; after the requeue signal, requeue the job
    first, and the requeued job resumes from ``last_path``
    (:func:`gpo_lit.run_dir.requeued_job`).

    The checkpoint is taken where Lightning's own step checkpoints are (the end of a training
    batch); the process stops at the next hook, once that step's metrics are logged. A signal
    during validation, or at an epoch's last batch, stops after the next training step
    (validation finishes first: a checkpoint taken inside it or just before it would resume
    without it); after the last step it stops before testing. ``last_path`` is also saved when
    training ends, so a run stopped while testing resumes straight to the test. Under DDP every
    rank stops at the same step (any rank's signal counts). DataLoader workers ignore these
    signals (:mod:`gpo_lit.data.workers`): a scheduler signals every process of the job.

    The requeue goes through the handler the signal had before (submitit's, under its launcher:
    it requeues from rank 0 within its own limit of requeues), else ``scontrol requeue`` from
    rank 0 (:func:`requeue_job`). Lightning's own SLURM handler, which saves wherever the signal
    lands (mid-step, inside a collective), is never the one used: ``cluster=slurm`` turns it off.

    Every checkpoint save also flushes the loggers, then again once the step's own metrics
    are logged, so the CSV rows up to a checkpoint are on disk whatever happens next.
    """

    def __init__(self, last_path: str | Path) -> None:
        self.last_path = Path(last_path)
        self.received = {signal.SIGTERM: False}  # per signal handled: whether it came
        self.previous: Any = None  # the requeue signal's handler before this one (submitit's)
        self.stopping: signal.Signals | None = None  # last_path holds the state; the signal
        self.saved_step = -1  # the global step last_path was saved at
        self.flush_pending = False

    def _listen(self, trainer: pl.Trainer) -> None:
        # Lightning installs its own handlers right before the stage runs; these replace them.
        if slurm_requeues(trainer) or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        requeue = requeue_signal(trainer)
        if requeue is not None and requeue != signal.SIGTERM:
            before = signal.getsignal(requeue)
            if before != self._on_signal:  # a second stage (test) keeps the first one's
                self.previous = before
            self.received.setdefault(requeue, False)
            signal.signal(requeue, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received[signal.Signals(signum)] = True

    def _agreed(self, trainer: pl.Trainer) -> signal.Signals | None:
        """The signal to act on, the same on every rank: the requeue signal before SIGTERM."""
        names = [s for s in self.received if s != signal.SIGTERM] + [signal.SIGTERM]
        came = [self.received[s] for s in names]
        if trainer.world_size > 1:  # one collective for all of them
            flags = torch.tensor(came, dtype=torch.int32, device=trainer.strategy.root_device)
            came = [bool(v) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist()]
        return next((s for s, c in zip(names, came, strict=True) if c), None)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)  # a whole state to resume
        self.saved_step = trainer.global_step

    def _requeue(self, trainer: pl.Trainer) -> None:
        """Requeue the job: through the signal's previous handler, else scontrol on rank 0."""
        assert self.stopping is not None
        if not callable(self.previous):
            if trainer.is_global_zero:
                requeue_job()
            return
        try:
            self.previous(int(self.stopping), None)
        except SystemExit:  # submitit exits once it has requeued; this stops below instead
            pass
        except Exception as err:  # noqa: BLE001 - e.g. submitit's "timed-out too many times"
            log.warning("not requeued: %s", " ".join(str(err).split()))

    def _stop(self, trainer: pl.Trainer) -> None:
        assert self.stopping is not None
        if self.stopping != signal.SIGTERM:
            self._requeue(trainer)
        raise TrainingInterrupted(self.last_path, self.saved_step, self.stopping)

    def _after_step(self, trainer: pl.Trainer) -> None:
        """The first hook after a training step's metrics are logged."""
        if self.flush_pending:
            self.flush_pending = False
            for logger in trainer.loggers:
                logger.save()
        if self.stopping is not None:
            self._stop(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._listen(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._listen(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # At an epoch's last batch, after the next training step instead.
        if self.stopping is None and resumable_batch_end(trainer):
            came = self._agreed(trainer)
            if came is not None:
                self._save(trainer)
                self.stopping = came

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._after_step(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._after_step(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_step(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopping is None:
            self._save(trainer)
            self.stopping = self._agreed(trainer)
        self._after_step(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        came = self._agreed(trainer)
        if came is not None:
            self.stopping = came
            self._stop(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            logger.save()
        self.flush_pending = True


def check_checkpoint_config(cfg: DictConfig, ckpt_path: str | Path) -> None:
    """A run continued from a checkpoint file must have the configuration stored in it
    (``gpo_lit_config``; the output folder and what derives from it aside), unless
    ``resume_changes=allow``: one line naming the changed keys otherwise."""
    ckpt = load_torch_file(ckpt_path, "a gpo_lit checkpoint", mmap=True)
    stored = ckpt.get("gpo_lit_config")
    if not isinstance(stored, dict):
        return
    new = config_dict(cfg)
    old_out = str((stored.get("paths") or {}).get("output_dir") or "\0")
    new_out = str(new["paths"]["output_dir"])

    def rebase(x: Any) -> Any:  # the old run's folder in its paths is this run's
        if isinstance(x, dict):
            return {k: rebase(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rebase(v) for v in x]
        return x.replace(old_out, new_out) if isinstance(x, str) else x

    changes = config_changes(rebase(stored), new)
    where = f"ckpt_path={ckpt_path}"
    refuse_changes(where, "the configuration it was saved with", changes, cfg.get("resume_changes"))


def logged_step(ckpt_path: str | Path) -> int:
    """The logging step of the last training batch a checkpoint holds: rows the run logged after
    it are logged again by the resumed run (Lightning counts that batch on restoring)."""
    ckpt = load_torch_file(ckpt_path, "a gpo_lit checkpoint", mmap=True)
    return int(ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows of ``metrics.csv`` logged up to ``keep_until``."""

    def __init__(self, log_dir: str, keep_until: int) -> None:
        self.keep_until = keep_until
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(float(r["step"])) <= self.keep_until]
            header = list(reader.fieldnames or [])
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, out.getvalue().encode())
        self.metrics_keys = sorted(header)


class ResumableCSVLogger(CSVLogger):
    """:class:`~pytorch_lightning.loggers.CSVLogger` that appends when the run resumes.

    Call :meth:`resume_at` before training starts: with a step, the existing ``metrics.csv``
    keeps its rows logged up to that step and new rows are appended; with None (a run that
    starts from scratch, e.g. requeued before its first checkpoint) it is replaced, as
    Lightning's logger does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_until: int | None = None

    def resume_at(self, step: int | None) -> None:
        self._keep_until = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self._keep_until is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._keep_until)
        return super().experiment
