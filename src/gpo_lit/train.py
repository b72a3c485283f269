"""``gpo-train``: fit with per-epoch validation, keep the best checkpoint by val rsum, test it."""

from __future__ import annotations

import json
import logging
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
from gpo_lit.wandb_utils import instantiate_loggers, log_final_summary

log = logging.getLogger("gpo_lit.train")


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
    """The checkpoint to resume from: ``ckpt_path``, with ``last`` = this run's last.ckpt."""
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None  # nothing saved yet: start afresh
    if ckpt is not None and not Path(ckpt).is_file():
        raise GpoLitError(f"ckpt_path: expected a checkpoint file, found no file at {ckpt}")
    return ckpt


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
    loggers = instantiate_loggers(cfg)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # nothing to report learning rates to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg, out_dir))
        results: dict[str, dict[str, float]] = {}
        if cfg.test_after_fit:
            results_path = out_dir / "metrics.json"
            model.eval_cfg = {**model.eval_cfg, "results_to": str(results_path)}
            trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)
            if trainer.is_global_zero:
                results = json.loads(results_path.read_text())
                best = trainer.checkpoint_callback.best_model_path
                log_final_summary(trainer, results)
                print(f"\nTest metrics of {best}:\n{format_table(results)}\n", flush=True)
        return results
    finally:
        finish_wandb()


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    # The value a Hydra sweeper optimises: the first test protocol's rsum.
    return next(iter(results.values()))["rsum"] if results else None


if __name__ == "__main__":
    main()
