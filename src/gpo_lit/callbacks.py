"""Lightning callbacks that log to Weights & Biases: GPO's θ curves and example retrievals.

Both do nothing unless the trainer has a W&B logger (CSV-only runs are unaffected), log from
rank zero only, and draw with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from gpo_lit.wandb_utils import wandb_loggers

log = logging.getLogger("gpo_lit.callbacks")

HIT = "✓"
MODALITIES = {"visual": "visual_pool", "text": "text_pool"}
DEFAULT_SIZES = {"visual": 36, "text": 12}


def _item_names(split: Any, n: int) -> list[str]:
    """Names of a split's items: its image / video ids when it has them, else ``#i``."""
    for attr in ("image_ids", "video_ids"):
        ids = getattr(split, attr, None)
        if ids is not None and len(ids) >= n:
            return [str(i) for i in ids[:n]]
    return [f"#{i}" for i in range(n)]


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``0..n-1`` (deterministic queries)."""
    if n <= 0 or k <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))})


def _mark(text: str, hit: bool) -> str:
    return f"{HIT} {text}" if hit else text


def retrieval_examples(
    img: Tensor,
    cap: Tensor,
    cap2img: Tensor | np.ndarray | Sequence[int],
    captions: Sequence[str],
    item_names: Sequence[str],
    n_queries: int = 8,
    top_k: int = 5,
) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Example retrievals as ``{"text_to_image": (columns, rows), "image_to_text": (...)}``.

    Queries are spread evenly over the captions / items. A text→image row is the caption, its
    image, the rank of that image and the top ``top_k`` item names; an image→text row is the
    item, one of its captions, the best rank of its captions and the top ``top_k`` captions.
    Retrieved entries that are ground truth start with ``✓``.
    """
    img, cap = img.float(), cap.float()
    c2i = torch.as_tensor(np.asarray(cap2img), device=img.device, dtype=torch.long)
    k_img, k_cap = min(top_k, img.shape[0]), min(top_k, cap.shape[0])

    t2i_cols = ["caption", "ground truth", "rank of ground truth"]
    t2i_cols += [f"top {r + 1}" for r in range(k_img)]
    t2i_rows = []
    q = _spread(cap.shape[0], n_queries)
    if q:
        sims = cap[q] @ img.T  # [Q, n_img]
        gt = c2i[q]
        ranks = (sims > sims.gather(1, gt[:, None])).sum(1) + 1
        top = sims.topk(k_img, dim=1).indices
        for row, j in enumerate(q):
            g = int(gt[row])
            picks = [_mark(item_names[int(i)], int(i) == g) for i in top[row]]
            t2i_rows.append([captions[j], item_names[g], int(ranks[row]), *picks])

    i2t_cols = ["image", "a ground-truth caption", "best rank of its captions"]
    i2t_cols += [f"top {r + 1}" for r in range(k_cap)]
    i2t_rows = []
    q = _spread(img.shape[0], n_queries)
    if q:
        sims = img[q] @ cap.T  # [Q, n_cap]
        mine = c2i[None, :] == torch.as_tensor(q, device=img.device)[:, None]  # [Q, n_cap]
        best_gt = sims.masked_fill(~mine, float("-inf")).max(1).values
        ranks = (sims > best_gt[:, None]).sum(1) + 1
        top = sims.topk(k_cap, dim=1).indices
        for row, i in enumerate(q):
            own = torch.nonzero(mine[row]).flatten()
            first = captions[int(own[0])] if len(own) else ""
            picks = [_mark(captions[int(j)], bool(mine[row, j])) for j in top[row]]
            i2t_rows.append([item_names[i], first, int(ranks[row]) if len(own) else -1, *picks])
    return {"text_to_image": (t2i_cols, t2i_rows), "image_to_text": (i2t_cols, i2t_rows)}


def theta_figure(curves: dict[str, np.ndarray]) -> Any:
    """A matplotlib figure of θ_k against rank k per modality (Agg canvas, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    for modality, theta in curves.items():
        ranks = np.arange(1, len(theta) + 1)
        ax.plot(ranks, theta, marker="o", markersize=3, label=f"{modality} (n = {len(theta)})")
    ax.set_xlabel("rank k (features sorted descending)")
    ax.set_ylabel("θ_k")
    ax.set_title("GPO pooling weights")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _png(fig: Any) -> Any:
    """The figure as a PIL image (what ``wandb.Image`` takes without matplotlib's pyplot)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


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
        return DEFAULT_SIZES[modality]

    @torch.no_grad()
    def curves(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        """θ at this callback's set size for each modality whose pooling exposes it."""
        out = {}
        for modality, attr in MODALITIES.items():
            pool = getattr(pl_module, attr, None)
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
            media["pooling/theta"] = wandb.Image(
                _png(theta_figure(curves)), caption=f"epoch {trainer.current_epoch}"
            )
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
    item → top ``top_k`` captions; ground-truth hits start with ``✓``. Reads the embeddings the
    model keeps from its last evaluation (``pl_module.last_eval = (img, cap, cap2img, stage)``)
    and skips when there are none.
    """

    def __init__(self, n_queries: int = 8, top_k: int = 5) -> None:
        self.n_queries = int(n_queries)
        self.top_k = int(top_k)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loggers = wandb_loggers(trainer)
        last = getattr(pl_module, "last_eval", None)
        if not loggers or last is None:
            return
        img, cap, cap2img, stage = last
        if stage != "test":
            return
        split = trainer.datamodule.eval_split("test")
        tables = retrieval_examples(
            img,
            cap,
            cap2img,
            split.captions,
            _item_names(split, img.shape[0]),
            n_queries=self.n_queries,
            top_k=self.top_k,
        )
        import wandb

        media = {
            f"retrieval/{key}": wandb.Table(columns=cols, data=rows)
            for key, (cols, rows) in tables.items()
        }
        for logger in loggers:
            logger.log_metrics(media, step=trainer.global_step)
