"""``gpo-eval``: embed a split with a checkpoint, count ranks, write ``metrics.json``.

``ckpt=[a.ckpt,b.ckpt]`` (``make eval CKPT=a.ckpt,b.ckpt``) evaluates the ensemble of the models:
each embeds the split with its own data pipeline (``member<i>/``: its metrics and embeddings),
then the similarity matrices are averaged before ranking (REFERENCE §6) into ``metrics.json``.
``ties=optimistic`` counts only candidates strictly above the ground truth (default
``pessimistic``, whatever the training run used: a tie counts against the query).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from gpo_lit.cli import ensure_new, entry_point, format_table, write_metrics
from gpo_lit.errors import GpoLitError
from gpo_lit.metrics import check_ties
from gpo_lit.model import load_model

Results = dict[str, dict[str, float]]


def evaluate_one(
    ckpt: str, cfg: DictConfig, out_dir: Path, save_embeddings: bool
) -> tuple[Results, str]:
    """Embed and evaluate one checkpoint's test split into ``out_dir``; (results, split name)."""
    results_path = out_dir / "metrics.json"
    ensure_new(results_path)
    model, run_cfg = load_model(ckpt)
    data_cfg = dict((run_cfg or {}).get("data") or {})
    data_cfg["demo"] = None  # never regenerate data while evaluating
    if cfg.data_root:
        data_cfg["root"] = cfg.data_root
    if "root" not in data_cfg:
        raise GpoLitError(
            f"data_root: expected a folder (the checkpoint {ckpt} names none), found null"
        )
    if cfg.split:
        data_cfg["test_split"] = cfg.split
    data_cfg["num_workers"] = cfg.num_workers
    data_cfg.setdefault("_target_", "gpo_lit.data.datamodule.RetrievalDataModule")
    datamodule = instantiate(data_cfg)
    datamodule.set_tokenizer(model.tokenizer)
    model.eval_cfg = dict(model.eval_cfg)
    model.eval_cfg["ties"] = cfg.ties
    if cfg.protocols:
        model.eval_cfg["test_protocols"] = list(cfg.protocols)
    if save_embeddings:
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
    return json.loads(results_path.read_text()), datamodule.splits["test"]


def ensemble(
    members: list[Path], protocols: list[str], shard_size: int = 1024, ties: str = "pessimistic"
) -> Results:
    """Metrics of the averaged similarity matrices of saved member embeddings."""
    from gpo_lit.metrics import evaluate, load_embeddings

    loaded = [load_embeddings(m) for m in members]
    img0, cap0, cap2img = loaded[0]
    for path, (img, cap, c2i) in zip(members[1:], loaded[1:], strict=True):
        if img.shape[0] != img0.shape[0] or not torch.equal(c2i, cap2img):
            raise GpoLitError(
                f"{path}: expected the test split of {members[0]} ({img0.shape[0]} images, "
                f"{cap0.shape[0]} captions), found {img.shape[0]} images, {cap.shape[0]} captions"
                " or another caption → image map (an ensemble ranks one split)"
            )
    imgs = [img for img, _, _ in loaded]
    caps = [cap for _, cap, _ in loaded]
    return {p: evaluate(imgs, caps, cap2img, p, shard_size, ties) for p in protocols}


def evaluate_checkpoint(cfg: DictConfig) -> Results:
    check_ties(cfg.ties)  # before any checkpoint is loaded
    out_dir = Path(cfg.paths.output_dir)
    ckpts = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig | list) else [str(cfg.ckpt)]
    if len(ckpts) == 1:
        results, split = evaluate_one(ckpts[0], cfg, out_dir, bool(cfg.save_embeddings))
        print(f"\nTest metrics of {ckpts[0]} on split '{split}':\n{format_table(results)}\n")
        return results
    ensure_new(out_dir / "metrics.json")
    member_files = []
    for i, ckpt in enumerate(ckpts):
        member_dir = out_dir / f"member{i}"
        results, split = evaluate_one(ckpt, cfg, member_dir, save_embeddings=True)
        member_files.append(member_dir / "embeddings.npz")
        print(f"\nTest metrics of {ckpt} on split '{split}':\n{format_table(results)}\n")
    results = ensemble(member_files, list(results), ties=cfg.ties)
    write_metrics(out_dir / "metrics.json", results)
    print(
        f"\nTest metrics of the ensemble of {len(ckpts)} models (similarities averaged):\n"
        f"{format_table(results)}\n",
        flush=True,
    )
    return results


@entry_point("eval")
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
