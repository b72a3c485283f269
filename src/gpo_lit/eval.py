"""``gpo-eval``: embed a split with a checkpoint, count ranks, write ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpo_lit.cli import CONF_DIR, ensure_new, format_table, report_errors
from gpo_lit.errors import GpoLitError
from gpo_lit.model import load_model


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, dict[str, float]]:
    out_dir = Path(cfg.paths.output_dir)
    results_path = out_dir / "metrics.json"
    ensure_new(results_path)
    model, run_cfg = load_model(cfg.ckpt)
    data_cfg = dict((run_cfg or {}).get("data") or {})
    data_cfg["demo"] = None  # never regenerate data while evaluating
    if cfg.data_root:
        data_cfg["root"] = cfg.data_root
    if "root" not in data_cfg:
        raise GpoLitError(
            f"data_root: expected a folder (the checkpoint {cfg.ckpt} names none), found null"
        )
    if cfg.split:
        data_cfg["test_split"] = cfg.split
    data_cfg["num_workers"] = cfg.num_workers
    data_cfg.setdefault("_target_", "gpo_lit.data.datamodule.RetrievalDataModule")
    datamodule = instantiate(data_cfg)
    datamodule.set_tokenizer(model.tokenizer)
    model.eval_cfg = dict(model.eval_cfg)
    if cfg.protocols:
        model.eval_cfg["test_protocols"] = list(cfg.protocols)
    if cfg.save_embeddings:
        model.eval_cfg["save_embeddings_to"] = str(out_dir / "embeddings.npz")
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model.eval_cfg["results_to"] = str(results_path)
    trainer.test(model, datamodule=datamodule, verbose=False)
    results = json.loads(results_path.read_text())
    print(
        f"\nTest metrics of {cfg.ckpt} on split '{datamodule.splits['test']}':\n"
        f"{format_table(results)}\n",
        flush=True,
    )
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
