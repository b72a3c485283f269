"""The files an evaluation writes after testing, on rank zero (under ``ddp_spawn`` in the worker
that tested): ``metrics.json`` and ``embeddings.npz`` (:class:`WriteEvaluation`), a retrieval
figure and per-query ranks. An existing file is never overwritten (checked when the callback is
made and again before writing)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch import Tensor

from gpo_lit.cli import FIGURE_FILE, RANKS_FILE, write_metrics
from gpo_lit.files import ensure_new, write_atomic

log = logging.getLogger("gpo_lit.callbacks")
METRICS_FILE = "metrics.json"
EMBEDDINGS_FILE = "embeddings.npz"


def tested_split(
    trainer: pl.Trainer, pl_module: pl.LightningModule
) -> tuple[Tensor, Tensor, Tensor, Any] | None:
    """(img, cap, cap2img, split) of the test split the model just evaluated, on rank zero; None
    elsewhere, before testing and for a subset (limited batches: its rows are not the split's)."""
    if not trainer.is_global_zero:
        return None
    ranked = getattr(pl_module, "evaluated", {}).get("test")
    if ranked is None or ranked.subset:
        return None
    # Lightning sets trainer.datamodule at run time; its hints lack it
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    return ranked.img, ranked.cap, ranked.cap2img, datamodule.eval_split("test")


class WriteEvaluation(pl.Callback):
    """After testing, on rank zero: the test metrics (``pl_module.test_results``) to
    ``metrics_file`` as JSON (full precision; the logged values are float32) and, given
    ``embeddings_file``, the embeddings they were ranked from (``img``, ``cap``, ``cap2img``;
    :func:`gpo_lit.metrics.save_embeddings`), which re-evaluate to the same metrics."""

    def __init__(self, metrics_file: str | Path, embeddings_file: str | Path | None = None):
        self.metrics_file = Path(metrics_file)
        self.embeddings_file = None if embeddings_file is None else Path(embeddings_file)
        for path in (self.metrics_file, self.embeddings_file):
            if path is not None:
                ensure_new(path)  # before anything is embedded

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        module: Any = pl_module  # a VSEModel (or a test double): evaluated, test_results
        if self.embeddings_file is not None:
            from gpo_lit.metrics import save_embeddings

            ranked = module.evaluated["test"]
            save_embeddings(self.embeddings_file, ranked.img, ranked.cap, ranked.cap2img)
        write_metrics(self.metrics_file, module.test_results)


class RetrievalFigure(pl.Callback):
    """After testing, write a PNG grid of example retrievals (:func:`split_figure`) to ``path``:
    ``n_queries`` text→image and ``n_queries`` image→text queries with their top ``top_k``.
    An existing file is never overwritten (checked again before writing)."""

    def __init__(self, path: str | Path, n_queries: int = 4, top_k: int = 5) -> None:
        self.path = Path(path)
        self.n_queries = int(n_queries)
        self.top_k = int(top_k)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = tested_split(trainer, pl_module)
        if got is None:
            return
        from gpo_lit.callbacks.figures import split_figure

        ensure_new(self.path)
        fig = split_figure(*got, n_queries=self.n_queries, top_k=self.top_k)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda f: fig.savefig(f, format="png"))
        log.info("wrote %s", self.path)


class SaveRanks(pl.Callback):
    """After testing, write per-query results of the test split to ``path`` (compressed .npz,
    no pickles; never over an existing file), for error analysis without recomputing similarities.

    Keys (0-based indices into the split; ranks over the whole split, the ``full`` gallery):
    ``i2t_rank`` int64 [n_img] (rank of the item's best ground-truth caption), ``t2i_rank`` int64
    [n_cap] (rank of the caption's item), ``i2t_top`` int64 [n_img, k] (caption indices, best
    first), ``t2i_top`` int64 [n_cap, k] (item indices), ``cap2img`` int64 [n_cap], ``captions``
    str [n_cap] and, when the split has them, ``item_ids`` str [n_img]. Ties count against the
    query (:mod:`gpo_lit.metrics.topk`).
    """

    def __init__(self, path: str | Path, k: int = 10) -> None:
        self.path = Path(path)
        self.k = int(k)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = tested_split(trainer, pl_module)
        if got is None:
            return
        from gpo_lit.metrics.ranks import prepare_embeddings
        from gpo_lit.metrics.topk import per_query_results

        ensure_new(self.path)
        img, cap, cap2img, split = got
        shard = getattr(pl_module, "eval_cfg", {}).get("shard_size", 1024)
        arrays = per_query_results(prepare_embeddings(img, cap, cap2img), self.k, shard)
        arrays["captions"] = np.asarray(list(split.captions), dtype=str)
        ids = getattr(split, "image_ids", None) or getattr(split, "video_ids", None)
        if ids is not None:
            arrays["item_ids"] = np.asarray([str(i) for i in ids[: img.shape[0]]], dtype=str)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # numpy's hints let **arrays fill its allow_pickle: bool (no key here is that)
        write_atomic(self.path, lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]
        log.info("wrote %s", self.path)


def output_callbacks(
    out_dir: str | Path, figures: bool, save_ranks: bool, save_embeddings: bool = False
) -> list[pl.Callback]:
    """The file-writing test callbacks of an entry point: ``metrics.json`` always, the files its
    ``save_embeddings`` / ``figures`` / ``save_ranks`` ask for, after checking that they are all
    new (before anything is embedded)."""
    out_dir = Path(out_dir)
    embeddings = out_dir / EMBEDDINGS_FILE if save_embeddings else None
    out: list[pl.Callback] = [WriteEvaluation(out_dir / METRICS_FILE, embeddings)]
    if figures:
        ensure_new(out_dir / FIGURE_FILE)
        out.append(RetrievalFigure(out_dir / FIGURE_FILE))
    if save_ranks:
        ensure_new(out_dir / RANKS_FILE)
        out.append(SaveRanks(out_dir / RANKS_FILE))
    return out
