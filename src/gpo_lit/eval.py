"""``gpo-eval``: embed a split with a checkpoint, count ranks, write ``metrics.json``.

``ckpt=[a.ckpt,b.ckpt]`` (``make eval CKPTS="a.ckpt b.ckpt"``) evaluates the ensemble of the models:
each embeds the split with its own data pipeline (``member<i>/``: its metrics and embeddings),
then the similarity matrices are averaged before ranking (REFERENCE §6) into ``metrics.json``.
``ties=optimistic`` counts only candidates strictly above the ground truth (default
``pessimistic``, whatever the training run used: a tie counts against the query).

What can be checked without embedding is checked first, before any model is built: the
protocols' sizes against the split, the COCO ids for eccv / cxc, the files that must be new
(:func:`precheck`). A run that fails leaves no run folder behind when nothing but Hydra's own
files were written into it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from gpo_lit.checkpoint_io import read_checkpoint
from gpo_lit.cli import entry_point, write_metrics
from gpo_lit.config_check import check_config
from gpo_lit.errors import GpoLitError, expect
from gpo_lit.files import ensure_new
from gpo_lit.metrics import check_ties
from gpo_lit.metrics.ensemble import check_same_split
from gpo_lit.metrics.table import results_block

if TYPE_CHECKING:
    from gpo_lit.metrics.eccv import CocoIds

Results = dict[str, dict[str, float]]
HYDRA_ONLY = {".hydra"}  # what Hydra puts in a run folder before the job (plus an empty log)


def data_config(run_cfg: dict | None, cfg: DictConfig, ckpt: str) -> dict:
    """The data config to evaluate with: the training run's, never regenerating demo data, with
    this command's ``data_root``, ``split`` and ``num_workers``."""
    data_cfg = (run_cfg or {}).get("data") or {}
    expect(
        isinstance(data_cfg, dict), ckpt, "a dict in gpo_lit_config.data", type(data_cfg).__name__
    )
    data_cfg = dict(data_cfg)
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
    return data_cfg


def eval_config(hparams_eval: dict, cfg: DictConfig) -> dict:
    """The checkpoint's evaluation settings with this command's ``protocols`` and ``coco_ids``."""
    eval_cfg = dict(hparams_eval)
    if cfg.protocols:
        eval_cfg["test_protocols"] = list(cfg.protocols)
    if cfg.get("coco_ids"):
        eval_cfg["coco_ids"] = str(cfg.coco_ids)
    return eval_cfg


def precheck(ckpt: str, cfg: DictConfig, out_dir: Path) -> tuple[int, Tensor]:
    """Fail fast, before the model is built: new output files, the test split's size against
    every protocol, COCO ids for eccv / cxc (the checkpoint's stored config; headers only).
    Returns the split as ``(n_images, cap2img)``, for an ensemble's members to be compared."""
    from hydra.utils import instantiate

    from gpo_lit.data.formats.base import open_split
    from gpo_lit.data.formats.precomp import PrecompSplit
    from gpo_lit.eval_checks import check_protocols

    ensure_new(out_dir / "metrics.json")
    from gpo_lit.model import check_model_hparams

    stored = read_checkpoint(ckpt, mmap=True)
    check_model_hparams(ckpt, stored["hyper_parameters"])
    data_cfg = data_config(stored.get("gpo_lit_config"), cfg, ckpt)
    reader = instantiate(data_cfg["reader"]) if data_cfg.get("reader") else PrecompSplit
    name = data_cfg.get("test_split", "test")
    split = open_split(reader, data_cfg["root"], name, None, data_cfg.get("source_hint", ""))
    eval_cfg = eval_config(stored["hyper_parameters"].get("evaluation") or {}, cfg)
    check_protocols(eval_cfg, "test", split, name, data_cfg["root"])
    return split.n_images, torch.as_tensor(split.cap2img)


def evaluate_one(
    ckpt: str, cfg: DictConfig, out_dir: Path, save_embeddings: bool
) -> tuple[Results, str, CocoIds | None]:
    """Embed and evaluate one checkpoint's test split into ``out_dir``; (results, split name,
    the split's COCO ids when a protocol needed them)."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from gpo_lit.callbacks import output_callbacks
    from gpo_lit.callbacks.outputs import EMBEDDINGS_FILE, METRICS_FILE
    from gpo_lit.eval_checks import check_evaluation
    from gpo_lit.model import load_model

    results_path = out_dir / METRICS_FILE
    ensure_new(results_path)
    if save_embeddings:
        ensure_new(out_dir / EMBEDDINGS_FILE)
    model, run_cfg = load_model(ckpt)
    threads = cfg.get("num_threads") or (run_cfg or {}).get("num_threads")
    if threads:  # as the training run did (the demos: one thread)
        torch.set_num_threads(int(threads))
    datamodule = instantiate(data_config(run_cfg, cfg, ckpt))
    datamodule.set_tokenizer(model.tokenizer)
    model.eval_cfg = eval_config(model.eval_cfg, cfg)
    model.eval_cfg["ties"] = cfg.ties
    datamodule.check_splits(  # before embedding anything
        ["test"],
        in_dim=model.hparams["visual"].get("in_dim"),
        in_dim_key=f"the model.visual.in_dim of {ckpt}",
        protocols={"test": model.eval_cfg["test_protocols"]},
    )
    # Before embedding anything: sizes, COCO ids, files that must be new.
    model.coco_ids = check_evaluation(model.eval_cfg, datamodule)
    figures, save_ranks = bool(cfg.get("figures")), bool(cfg.get("save_ranks"))
    callbacks = output_callbacks(out_dir, figures, save_ranks, save_embeddings)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    return json.loads(results_path.read_text()), datamodule.splits["test"], model.coco_ids


def ensemble(
    members: list[Path],
    protocols: list[str],
    shard_size: int = 1024,
    coco_ids: CocoIds | None = None,
    ties: str = "pessimistic",
) -> Results:
    """Metrics of the averaged similarity matrices of saved member embeddings."""
    from gpo_lit.metrics import evaluate_protocols
    from gpo_lit.metrics.ensemble import load_members

    imgs, caps, cap2img = load_members(members)
    return evaluate_protocols(imgs, caps, cap2img, protocols, shard_size, ties, coco_ids)


def checkpoints(cfg: DictConfig) -> list[str]:
    """The checkpoints to evaluate: ``ckpt`` or its alias ``ckpt_path`` (one or a list)."""
    # Empty counts as not given: `make eval` passes `ckpt=$(CKPT)` even without CKPT.
    ckpt, alias = (v if v != "" else None for v in (cfg.get("ckpt"), cfg.get("ckpt_path")))
    if ckpt is not None and alias is not None and ckpt != alias:
        raise GpoLitError(
            f"ckpt_path: expected the same checkpoint as ckpt= (it is an alias) or no ckpt=, "
            f"found ckpt={ckpt} and ckpt_path={alias}"
        )
    ckpt = ckpt if ckpt is not None else alias
    if ckpt is None:
        raise GpoLitError(
            "ckpt: expected a checkpoint (ckpt=<file> or ckpt_path=<file>), found none"
        )
    return list(ckpt) if isinstance(ckpt, ListConfig | list) else [str(ckpt)]


def evaluate_checkpoint(cfg: DictConfig) -> Results:
    check_config(cfg)
    check_ties(cfg.ties)  # before any checkpoint is loaded
    out_dir = Path(cfg.paths.output_dir)
    ckpts = checkpoints(cfg)
    ensure_new(out_dir / "metrics.json")
    splits = [  # every member is checked before any is evaluated, its split against the first's
        precheck(ckpt, cfg, out_dir if len(ckpts) == 1 else out_dir / f"member{i}")
        for i, ckpt in enumerate(ckpts)
    ]
    for ckpt, member in zip(ckpts[1:], splits[1:], strict=True):
        check_same_split(ckpt, ckpts[0], splits[0], member)
    if len(ckpts) == 1:
        results, split, _ = evaluate_one(ckpts[0], cfg, out_dir, bool(cfg.save_embeddings))
        print(results_block(f"Test metrics of {ckpts[0]} on split '{split}'", results))
        return results
    member_files = []
    for i, ckpt in enumerate(ckpts):
        member_dir = out_dir / f"member{i}"
        results, split, ids = evaluate_one(ckpt, cfg, member_dir, save_embeddings=True)
        member_files.append(member_dir / "embeddings.npz")
        print(results_block(f"Test metrics of {ckpt} on split '{split}'", results))
    results = ensemble(member_files, list(results), coco_ids=ids, ties=cfg.ties)
    write_metrics(out_dir / "metrics.json", results)
    title = f"Test metrics of the ensemble of {len(ckpts)} models (similarities averaged)"
    print(results_block(title, results), flush=True)
    return results


def holds_only_hydra_files(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but Hydra's ``.hydra/`` and empty log files: what Hydra
    writes before a job starts, so nothing a failed evaluation must keep."""
    if not folder.is_dir():
        return False
    for entry in folder.iterdir():
        empty_log = entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0
        if entry.name not in HYDRA_ONLY and not empty_log:
            return False
    return True


def remove_unused_run_dir(out_dir: Path, log_dir: Any) -> None:
    """Remove a run folder holding only Hydra's files, then the empty folders above it up to
    ``log_dir`` itself (Hydra made them for this run: ``logs/eval/<name>/``)."""
    cwd = Path.cwd().resolve()
    if not holds_only_hydra_files(out_dir) or out_dir.resolve() in (cwd, *cwd.parents):
        return  # results inside, or the working folder itself (hydra.run.dir=.)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        stop = Path(log_dir).resolve()
        here = out_dir.resolve().parent
        while here == stop or stop in here.parents:
            here.rmdir()  # only ever removes an empty folder (else OSError: stop)
            if here == stop:
                break
            here = here.parent
    except (OSError, TypeError):
        pass


@entry_point("eval")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.paths.output_dir)
    fresh = holds_only_hydra_files(out_dir)  # Hydra made it for this run, or it holds nothing
    try:
        evaluate_checkpoint(cfg)
    except BaseException:
        # Hydra creates the run folder before the job runs: a failed evaluation that wrote
        # nothing leaves no empty run folder behind (a folder with results is never touched).
        if fresh:
            remove_unused_run_dir(out_dir, cfg.paths.get("log_dir"))
        raise


if __name__ == "__main__":
    main()
