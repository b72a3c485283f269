"""What only Weights & Biases shows: GPO's θ curves after validation epochs and tables of example
retrievals after testing. Both do nothing unless the trainer has a W&B logger (CSV-only runs are
unaffected) and run on rank zero only."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from gpo_lit.callbacks.examples import item_names, retrieval_examples
from gpo_lit.callbacks.figures import png, thumbnail
from gpo_lit.callbacks.outputs import tested_split
from gpo_lit.modalities import DEFAULT_THETA_SIZE, MODALITIES, pool_attr
from gpo_lit.wandb_utils import wandb_loggers

log = logging.getLogger("gpo_lit.callbacks")


class PoolingWeightsPlot(pl.Callback):
    """After each ``every_n_epochs``-th validation epoch, plot θ of every GPO-like pooling.

    Logs ``pooling/theta`` (image: θ_k against rank k per modality) and ``pooling/theta_values``
    (a W&B line plot over a table of the raw values) to each W&B logger.

    Args:
        sizes: set size per modality (``visual``, ``text``) to draw θ at; by default the data's
            regions per image (36 if unknown) and 12 tokens.
        every_n_epochs: plot every n-th epoch.
    """

    def __init__(self, sizes: dict[str, int] | None = None, every_n_epochs: int = 1) -> None:
        self.sizes = dict(sizes or {})
        self.every_n_epochs = max(1, int(every_n_epochs))

    def _size(self, trainer: pl.Trainer, modality: str) -> int:
        if modality in self.sizes:
            return int(self.sizes[modality])
        if modality == "visual":
            dm = getattr(trainer, "datamodule", None)
            try:
                n = getattr(dm.eval_split("val"), "n_regions", None) if dm is not None else None
            except Exception:  # noqa: BLE001 - any data module: fall back to the default
                n = None
            if isinstance(n, int) and n > 0:
                return n
        return DEFAULT_THETA_SIZE[modality]

    @torch.no_grad()
    def curves(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        """θ at this callback's set size for each modality whose pooling exposes it."""
        out = {}
        for modality in MODALITIES:
            pool = getattr(pl_module, pool_attr(modality), None)
            if pool is None or not callable(getattr(pool, "weights_for_length", None)):
                continue
            theta = pool.weights_for_length(self._size(trainer, modality))
            out[modality] = theta.detach().float().cpu().numpy()
        return out

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        curves = self.curves(trainer, pl_module)
        if not curves:
            return
        import wandb

        media: dict[str, Any] = {}
        try:
            from gpo_lit.report.theta import ThetaCurve, plot_theta  # the report's figure

            fig = plot_theta([ThetaCurve(m, theta) for m, theta in curves.items()])
            media["pooling/theta"] = wandb.Image(png(fig), caption=f"epoch {trainer.current_epoch}")
        except ImportError as err:  # no matplotlib / PIL: the line plot still goes out
            log.warning("pooling/theta image skipped: %s", err)
        rows = [[m, k + 1, float(t)] for m, theta in curves.items() for k, t in enumerate(theta)]
        table = wandb.Table(columns=["modality", "rank", "theta"], data=rows)
        media["pooling/theta_values"] = wandb.plot.line(
            table, "rank", "theta", stroke="modality", title="GPO θ against rank"
        )
        for logger in loggers:
            logger.log_metrics(media, step=trainer.global_step)


class RetrievalExamples(pl.Callback):
    """After testing, log example retrievals as W&B tables.

    ``retrieval/text_to_image``: caption → top ``top_k`` items; ``retrieval/image_to_text``:
    item → top ``top_k`` captions; ground-truth hits start with ``✓``; items are thumbnails
    (``wandb.Image``) when the reader has pictures (raw images), else names. Ranks and lists come
    from :mod:`gpo_lit.metrics` (:func:`gpo_lit.callbacks.examples.query_examples`). Reads what
    the model's test ranked (``pl_module.evaluated["test"]``) and skips without it.
    """

    def __init__(self, n_queries: int = 8, top_k: int = 5, thumbnail_px: int = 96) -> None:
        self.n_queries = int(n_queries)
        self.top_k = int(top_k)
        self.thumbnail_px = int(thumbnail_px)

    def tables(self, img: Tensor, cap: Tensor, cap2img: Any, split: Any) -> dict[str, Any]:
        """``{"retrieval/text_to_image": wandb.Table, "retrieval/image_to_text": ...}``."""
        import wandb

        display = getattr(split, "display_image", None)
        thumb = None
        if display is not None and display(0) is not None:

            def thumb(i: int, label: str) -> Any:
                im = display(i)
                if im is None:
                    return label
                return wandb.Image(thumbnail(im, self.thumbnail_px), caption=label)

        tables = retrieval_examples(
            img,
            cap,
            cap2img,
            split.captions,
            item_names(split, img.shape[0]),
            n_queries=self.n_queries,
            top_k=self.top_k,
            thumb=thumb,
        )
        return {
            f"retrieval/{key}": wandb.Table(columns=list[str | int](cols), data=rows)
            for key, (cols, rows) in tables.items()
        }

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        got = tested_split(trainer, pl_module) if loggers else None
        if got is None:
            return
        media = self.tables(*got)
        for logger in loggers:
            logger.log_metrics(media, step=trainer.global_step)
