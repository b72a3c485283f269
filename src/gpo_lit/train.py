"""``gpo-train``: fit with per-epoch validation, keep the best checkpoint by val rsum, test it."""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from gpo_lit import random_state
from gpo_lit.callbacks import output_callbacks
from gpo_lit.callbacks.outputs import METRICS_FILE
from gpo_lit.checkpoint_io import check_state_dict, load_torch_file, read_checkpoint
from gpo_lit.cli import entry_point, finish_wandb, instantiate_group
from gpo_lit.config_check import check_config
from gpo_lit.config_dict import config_dict
from gpo_lit.console import quiet_known_noise
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError, first_line, user_error
from gpo_lit.eval_checks import check_evaluation
from gpo_lit.losses import check_loss_node
from gpo_lit.metrics.table import results_block
from gpo_lit.resume import (
    ResumableCSVLogger,
    StopOnSignal,
    TrainingInterrupted,
    check_checkpoint_config,
    logged_step,
)
from gpo_lit.run_dir import requeued_job, resume_command
from gpo_lit.wandb_utils import instantiate_loggers, log_final_summary

log = logging.getLogger("gpo_lit.train")
# What resuming needs besides the weights: the optimiser and loop state gpo-train saves.
RESUME_ENTRIES = ("state_dict", "optimizer_states", "loops")


def build_vocab(cfg: DictConfig, datamodule) -> list[str] | None:
    """The BiGRU vocabulary as an id-ordered word list, or None for other tokenizers: SCAN's
    vocabulary JSON ``model.text.tokenizer.vocab_file`` as it is, else counted over the
    train+dev captions."""
    tok = cfg.model.text.tokenizer
    if tok.kind != "vocab":
        return None
    if tok.get("vocab_file"):
        return Vocabulary.load(tok.vocab_file).idx2word
    return Vocabulary.build(datamodule.vocabulary_captions, min_count=tok.min_count).idx2word


def check_data(cfg: DictConfig, datamodule) -> None:
    """Every split this job reads (train, dev, and test if tested after fitting), checked against
    each other, the model and the protocols before the first step (one line if not)."""
    ev = cfg.evaluation
    datamodule.check_splits(
        ["train", "val", *(["test"] if cfg.test_after_fit else [])],
        in_dim=cfg.model.visual.get("in_dim"),
        protocols={"val": [ev.val_protocol], "test": list(ev.test_protocols)},
    )


def last_checkpoint(out_dir: Path) -> Path:
    """A run's ``last.ckpt`` (where ``callbacks.last_checkpoint`` and SIGTERM save it)."""
    return out_dir / "checkpoints" / "last.ckpt"


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, with ``last`` = this run's last.ckpt; in a
    requeued SLURM job without ``ckpt_path`` (:func:`gpo_lit.run_dir.requeued_job`: a job that
    the requeue signal stopped, run again by SLURM with the same command) also last.ckpt.

    The entry point has already refused a ``ckpt_path=last`` whose run folder does not exist
    (:mod:`gpo_lit.run_dir`); a folder without a checkpoint yet (a job requeued before its first
    save) starts afresh.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last" or (ckpt is None and requeued_job()):
        last = last_checkpoint(out_dir)
        return str(last) if last.is_file() else None  # nothing saved yet: start afresh
    if ckpt is not None and not Path(ckpt).is_file():
        raise GpoLitError(f"ckpt_path: expected a checkpoint file, found no file at {ckpt}")
    return ckpt


def choose_seed(cfg: DictConfig, stored: dict | None = None, resume: str | None = None) -> int:
    """``cfg.seed``; for ``seed=null`` the seed of the checkpoint resumed from, else a fresh one.

    A drawn seed is logged and written into ``cfg`` (so into the checkpoints' run config and the
    W&B config) and into the job's ``.hydra/config.yaml``: ``seed=<it>`` repeats the run.
    """
    if cfg.seed is not None:
        return int(cfg.seed)
    seed, source = None, "drawn"
    if stored is not None:  # the checkpoint resumed from (read_checkpoint)
        seed, source = (stored.get("gpo_lit_config") or {}).get("seed"), f"from {resume}"
    if seed is None:
        seed, source = secrets.randbelow(2**31), "drawn"
    cfg.seed = int(seed)
    log.info("seed=null: seed %d (%s); repeat this run with seed=%d", seed, source, seed)
    _store_in_hydra_config(cfg)
    return int(seed)


def _store_in_hydra_config(cfg: DictConfig) -> None:
    """Rewrite this job's ``.hydra/config.yaml`` with ``cfg`` (nothing outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not HydraConfig.get().output_subdir:
        return
    hc = HydraConfig.get()
    path = Path(hc.runtime.output_dir) / str(hc.output_subdir) / "config.yaml"
    if path.is_file():
        from gpo_lit.files import write_atomic

        write_atomic(path, OmegaConf.to_yaml(cfg).encode())


def best_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The callback keeping the best checkpoint by ``val/rsum`` (None without one)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/rsum":
            return cb
    return None


def best_in_run_folder(cb: ModelCheckpoint) -> str:
    """``cb.best_model_path``, in this run's checkpoint folder. A run folder moved or copied, then
    resumed, restores the best path its last.ckpt stored (Lightning keeps it when the folder
    changed): the old folder's file, gone after a move, another run's after a copy; the same file
    here is the one this run tests."""
    best = cb.best_model_path
    if best and cb.dirpath and Path(best).parent != Path(cb.dirpath):
        here = Path(cb.dirpath) / Path(best).name
        if here.is_file():
            log.info("best checkpoint %s: this run folder's copy of %s", here, best)
            return str(here)
    return best


class TrainResult(NamedTuple):
    """What a training job gives back: the test metrics per protocol (empty if not tested) and
    the best validation rsum over its epochs (None without validation), what sweeps optimise."""

    test: dict[str, dict[str, float]]
    best_val_rsum: float | None


def hpc_resume_path(out_dir: Path) -> str | None:
    """The checkpoint Lightning resumes a requeued SLURM job from when ``ckpt_path`` is null
    (``hpc_ckpt_<n>.ckpt`` with the largest n in the trainer's root folder, the run folder)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    found = [(int(n), p) for p in out_dir.glob("hpc_ckpt_*.ckpt") if (n := p.stem[9:]).isdigit()]
    return str(max(found)[1]) if found else None


def fit_and_test(
    cfg: DictConfig, trainer: pl.Trainer, model, datamodule, resume: str | None
) -> TrainResult:
    """Fit (from ``resume`` if given), then test the best checkpoint into metrics.json."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    best_tensor = trainer.callback_metrics.get("val/rsum_best")
    best_val = None if best_tensor is None else float(best_tensor)
    if best_val is not None:
        log.info("best val/rsum: %.4f (the value a sweep optimises)", best_val)
    results: dict[str, dict[str, float]] = {}
    if cfg.test_after_fit:
        results_path = Path(cfg.paths.output_dir) / METRICS_FILE  # callbacks.WriteEvaluation
        best_cb = best_checkpoint_callback(trainer)
        best = best_in_run_folder(best_cb) if best_cb is not None else ""
        if not best:  # fast_dev_run, or no val/rsum checkpoint configured
            log.warning("no best checkpoint by val/rsum: testing the weights at the end of fit")
        trainer.test(
            model,
            datamodule=datamodule,
            ckpt_path=best or None,
            verbose=False,
            weights_only=True,
        )
        if trainer.is_global_zero:
            results = json.loads(results_path.read_text())
            log_final_summary(trainer, results)
            which = best or "the weights at the end of fit"
            print(results_block(f"Test metrics of {which}", results), flush=True)
            log.info("test metrics of %s: %s", which, json.dumps(results, sort_keys=True))
    return TrainResult(results, best_val)


def train(cfg: DictConfig) -> TrainResult:
    """Run one training job: fit, then test the best checkpoint by validation rsum."""
    check_config(cfg)
    quiet_known_noise()
    out_dir = Path(cfg.paths.output_dir)
    resume = resume_path(cfg, out_dir)
    # A checkpoint to resume is checked before any work; its weights once the model exists.
    stored = read_checkpoint(resume, RESUME_ENTRIES, mmap=True) if resume else None
    if resume and stored is not None:
        random_state.check(resume, stored.get(random_state.KEY))
    pl.seed_everything(choose_seed(cfg, stored, resume), workers=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    if cfg.get("tags"):
        log.info("tags: %s", ", ".join(str(t) for t in cfg.tags))
    check_loss_node(config_dict(cfg.model.loss))  # before data work
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    check_data(cfg, datamodule)
    vocab = build_vocab(cfg, datamodule)
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab)
    model.run_config = config_dict(cfg)
    if stored is not None:
        expected = "the weights of the model this run's config builds"
        check_state_dict(resume, expected, model.state_dict(), stored["state_dict"])
        del stored
    datamodule.set_tokenizer(model.tokenizer)
    # A checkpoint file: the config stored in it (last: .hydra/, compared before Hydra ran).
    if resume and cfg.ckpt_path != "last":
        check_checkpoint_config(cfg, resume)
    # Protocol sizes and COCO ids now, not after training.
    model.coco_ids = check_evaluation(
        model.eval_cfg, datamodule, ("val", "test") if cfg.test_after_fit else ("val",)
    )
    loggers = instantiate_loggers(cfg)
    resumed_from = resume or hpc_resume_path(out_dir)
    for logger in loggers:  # a resumed run appends to its CSV; a fresh one replaces it
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_at(logged_step(resumed_from) if resumed_from else None)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.test_after_fit:
        callbacks += output_callbacks(
            out_dir, cfg.get("figures"), cfg.get("save_ranks"), cfg.get("save_embeddings", False)
        )
    if not loggers:  # nothing to report learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(StopOnSignal(last_checkpoint(out_dir)))
    try:
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    except Exception as err:  # noqa: BLE001 - a value Lightning refuses (devices=0, precision=13)
        if user_error(err) is not None:
            raise
        cause = err.__cause__ or err
        raise GpoLitError(
            f"trainer: expected settings Lightning's Trainer accepts, found {first_line(cause)}"
        ) from None
    try:
        try:
            return fit_and_test(cfg, trainer, model, datamodule, resume)
        except TrainingInterrupted as stop:
            if trainer.is_global_zero:
                saved = f"saved at step {stop.step}" if stop.step >= 0 else "kept"
                requeue = "" if stop.signum == signal.SIGTERM else " (SLURM's requeue signal)"
                print(
                    f"stopped by {stop.signum.name}{requeue}: {stop.checkpoint} {saved}; "
                    f"resume with: {resume_command(out_dir)}",
                    file=sys.stderr,
                    flush=True,
                )
            raise
        except SystemExit:  # Lightning's graceful Ctrl-C shutdown ends with exit status 1
            if trainer.interrupted and trainer.is_global_zero:
                print(interrupted_message(out_dir), file=sys.stderr, flush=True)
            raise
    finally:
        finish_wandb()


def interrupted_message(out_dir: Path) -> str:
    """What a run stopped by Ctrl-C prints last: the checkpoint it can resume from (the last
    periodic ``last.ckpt``: Ctrl-C stops at once, not at the step's end as SIGTERM does) and how."""
    last = last_checkpoint(out_dir)
    if not last.is_file():
        return "interrupted (Ctrl-C) before the first checkpoint: nothing to resume"
    step = int(load_torch_file(last, "a gpo_lit checkpoint", mmap=True)["global_step"])
    return f"interrupted (Ctrl-C): {last} holds step {step}; resume with: {resume_command(out_dir)}"


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    # The value a Hydra sweeper (hparams_search=…) optimises: the best VALIDATION rsum, never a
    # test metric (tuning on the test split would flatter every number reported from it).
    return train(cfg).best_val_rsum


if __name__ == "__main__":
    main()
