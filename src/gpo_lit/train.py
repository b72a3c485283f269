"""``gpo-train``: fit with per-epoch validation, keep the best checkpoint by val rsum, test it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor

from gpo_lit.cli import (
    entry_point,
    finish_wandb,
    format_table,
    instantiate_group,
)
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError
from gpo_lit.resume import (
    ResumableCSVLogger,
    StopOnSigterm,
    TrainingInterrupted,
    check_checkpoint_config,
    logged_step,
)
from gpo_lit.run_dir import resume_command
from gpo_lit.wandb_utils import instantiate_loggers, log_final_summary

log = logging.getLogger("gpo_lit.train")


def build_vocab(cfg: DictConfig, datamodule) -> list[str] | None:
    """The BiGRU vocabulary (from a JSON file or counted over train+dev captions), or None."""
    tok = cfg.model.text.tokenizer
    if tok.kind != "vocab":
        return None
    if tok.get("path"):
        return Vocabulary.load(tok.path).idx2word
    return Vocabulary.build(datamodule.vocabulary_captions, min_count=tok.min_count).idx2word


def check_feature_width(cfg: DictConfig, datamodule) -> None:
    """The visual encoder's input width must match the feature files (one line if not)."""
    in_dim = cfg.model.visual.get("in_dim")
    split = datamodule.split(datamodule.splits["train"])
    if in_dim is not None and split.feat_dim != in_dim:
        raise GpoLitError(
            f"model.visual.in_dim: expected {split.feat_dim} (the feature width of {split.path}), "
            f"found {in_dim}"
        )


def resume_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, with ``last`` = this run's last.ckpt.

    The entry point has already refused a ``ckpt_path=last`` whose run folder does not exist
    (:mod:`gpo_lit.run_dir`); a folder without a checkpoint yet (a job requeued before its first
    save) starts afresh.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None  # nothing saved yet: start afresh
    if ckpt is not None and not Path(ckpt).is_file():
        raise GpoLitError(f"ckpt_path: expected a checkpoint file, found no file at {ckpt}")
    return ckpt


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
) -> dict[str, dict[str, float]]:
    """Fit (from ``resume`` if given), then test the best checkpoint into metrics.json."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    results: dict[str, dict[str, float]] = {}
    if cfg.test_after_fit:
        results_path = Path(cfg.paths.output_dir) / "metrics.json"
        model.eval_cfg = {**model.eval_cfg, "results_to": str(results_path)}
        trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
        if trainer.is_global_zero:
            results = json.loads(results_path.read_text())
            best = trainer.checkpoint_callback.best_model_path
            log_final_summary(trainer, results)
            print(f"\nTest metrics of {best}:\n{format_table(results)}\n", flush=True)
    return results


def train(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run one training job; returns the test metrics per protocol (empty if not tested)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    check_feature_width(cfg, datamodule)
    vocab = build_vocab(cfg, datamodule)
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    datamodule.set_tokenizer(model.tokenizer)
    resume = resume_path(cfg, out_dir)
    # A checkpoint file: the config stored in it (last: .hydra/, compared before Hydra ran).
    if resume and cfg.ckpt_path != "last":
        check_checkpoint_config(cfg, resume)
    loggers = instantiate_loggers(cfg)
    resumed_from = resume or hpc_resume_path(out_dir)
    for logger in loggers:  # a resumed run appends to its CSV; a fresh one replaces it
        if isinstance(logger, ResumableCSVLogger):
            logger.resume_at(logged_step(resumed_from) if resumed_from else None)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # nothing to report learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(StopOnSigterm(out_dir / "checkpoints" / "last.ckpt"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    try:
        try:
            return fit_and_test(cfg, trainer, model, datamodule, resume)
        except TrainingInterrupted as stop:
            if trainer.is_global_zero:
                saved = f"saved at step {stop.step}" if stop.step >= 0 else "kept"
                print(
                    f"stopped by SIGTERM: {stop.checkpoint} {saved}; "
                    f"resume with: {resume_command(out_dir)}",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    finally:
        finish_wandb()


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    # The value a Hydra sweeper optimises: the first test protocol's rsum.
    return next(iter(results.values()))["rsum"] if results else None


if __name__ == "__main__":
    main()
