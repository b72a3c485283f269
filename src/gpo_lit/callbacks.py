"""Lightning callbacks: GPO's θ curves and example retrievals for Weights & Biases, and the files
an evaluation can write besides its metrics (a retrieval figure, per-query ranks).

The W&B ones do nothing unless the trainer has a W&B logger (CSV-only runs are unaffected). All
run on rank zero only and draw with matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from gpo_lit.cli import FIGURE_FILE, RANKS_FILE
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


@dataclass
class Example:
    """One example query: its index, the 0-based rank of its best ground truth (the metrics' own
    rule, :mod:`gpo_lit.metrics.ranks`), its top list (best first), which of those are ground
    truth, and all of its ground truth (t2i: the caption's item; i2t: the item's captions)."""

    query: int
    rank: int
    top: list[int]
    hits: list[bool]
    truth: list[int]


def query_examples(
    img: Tensor,
    cap: Tensor,
    cap2img: Tensor | np.ndarray | Sequence[int],
    n_queries: int = 8,
    top_k: int = 5,
) -> dict[str, list[Example]]:
    """``{"text_to_image": [...], "image_to_text": [...]}``: queries spread evenly over the
    captions / items; ranks from :func:`ranks_from_prepared` over the whole split and top lists
    from :func:`topk_lists` (ties count against the query in both)."""
    from gpo_lit.metrics.ranks import prepare_embeddings, ranks_from_prepared
    from gpo_lit.metrics.topk import topk_lists

    p = prepare_embeddings(img.float(), cap.float(), torch.as_tensor(np.asarray(cap2img)))
    i2t_rank, t2i_rank = (r.cpu().numpy() for r in ranks_from_prepared(p))
    c2i = p.cap2img.cpu().numpy()
    caps_of: dict[int, list[int]] = {}
    for j, i in enumerate(c2i.tolist()):
        caps_of.setdefault(i, []).append(j)
    out: dict[str, list[Example]] = {"text_to_image": [], "image_to_text": []}
    q = _spread(p.n_cap, n_queries)
    if q:
        tops = topk_lists(p, "t2i", top_k, queries=q).cpu().numpy()
        for j, top in zip(q, tops, strict=True):
            g = int(c2i[j])
            picks = [int(i) for i in top]
            out["text_to_image"].append(
                Example(j, int(t2i_rank[j]), picks, [i == g for i in picks], [g])
            )
    q = _spread(p.n_img, n_queries)
    if q:
        tops = topk_lists(p, "i2t", top_k, queries=q).cpu().numpy()
        for i, top in zip(q, tops, strict=True):
            picks = [int(j) for j in top]
            out["image_to_text"].append(
                Example(i, int(i2t_rank[i]), picks, [int(c2i[j]) == i for j in picks], caps_of[i])
            )
    return out


def retrieval_examples(
    img: Tensor,
    cap: Tensor,
    cap2img: Tensor | np.ndarray | Sequence[int],
    captions: Sequence[str],
    item_names: Sequence[str],
    n_queries: int = 8,
    top_k: int = 5,
    thumb: Callable[[int, str], Any] | None = None,
) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Example retrievals as ``{"text_to_image": (columns, rows), "image_to_text": (...)}``.

    Queries are spread evenly over the captions / items (:func:`query_examples`). A text→image
    row is the caption, its image, the (1-based) rank of that image and the top ``top_k`` items;
    an image→text row is the item, one of its captions, the best rank of its captions and the top
    ``top_k`` captions. Retrieved entries that are ground truth start with ``✓``. ``thumb(i,
    label)`` turns an item cell into something else (a ``wandb.Image`` thumbnail); default: the
    label.
    """
    show = thumb or (lambda i, label: label)
    ex = query_examples(img, cap, cap2img, n_queries, top_k)
    k_img, k_cap = min(top_k, img.shape[0]), min(top_k, cap.shape[0])

    t2i_cols = ["caption", "ground truth", "rank of ground truth"]
    t2i_cols += [f"top {r + 1}" for r in range(k_img)]
    t2i_rows = []
    for e in ex["text_to_image"]:
        g = e.truth[0]
        picks = [show(i, _mark(item_names[i], h)) for i, h in zip(e.top, e.hits, strict=True)]
        t2i_rows.append([captions[e.query], show(g, item_names[g]), e.rank + 1, *picks])

    i2t_cols = ["image", "a ground-truth caption", "best rank of its captions"]
    i2t_cols += [f"top {r + 1}" for r in range(k_cap)]
    i2t_rows = []
    for e in ex["image_to_text"]:
        picks = [_mark(captions[j], h) for j, h in zip(e.top, e.hits, strict=True)]
        first = captions[e.truth[0]]
        i2t_rows.append([show(e.query, item_names[e.query]), first, e.rank + 1, *picks])
    return {"text_to_image": (t2i_cols, t2i_rows), "image_to_text": (i2t_cols, i2t_rows)}


def _thumbnail(im: Any, size: int) -> Any:
    """A copy of a PIL image fitted into ``size`` × ``size`` pixels."""
    im = im.convert("RGB")
    im.thumbnail((size, size))
    return im


def _wrap(text: str, width: int = 24, lines: int = 6) -> str:
    import textwrap

    out = textwrap.wrap(text, width) or [""]
    return "\n".join(
        out[:lines] if len(out) <= lines else [*out[: lines - 1], out[lines - 1] + " …"]
    )


def retrieval_figure(
    examples: dict[str, list[Example]],
    captions: Sequence[str],
    item_names: Sequence[str],
    display: Callable[[int], Any] | None = None,
    kind: str = "image",
    note: str = "",
) -> Any:
    """A grid of example queries (matplotlib Agg figure, no pyplot): one row per query, the query,
    its top list, then its ground truth; ground truth framed in green and marked ``✓``.

    Text→image rows show the caption, the retrieved items and the caption's own item;
    image→text rows the item, the retrieved captions and one of its own captions. Items are drawn
    with ``display(i)`` (a PIL image) where it gives one, else shown by name (``kind`` says what
    an item is: image / video); ``note`` goes under the title.
    """
    from matplotlib.figure import Figure

    rows = [("t2i", e) for e in examples["text_to_image"]]
    rows += [("i2t", e) for e in examples["image_to_text"]]
    k = max((len(e.top) for _, e in rows), default=1)
    n = max(1, len(rows))
    fig = Figure(figsize=(1.75 * (k + 2) + 0.3, 1.95 * n + 0.9), dpi=100)
    top = 1 - 0.75 / (1.95 * n + 0.9)
    grid = fig.add_gridspec(n, k + 2, hspace=0.6, wspace=0.1, left=0.02, right=0.98)
    grid.update(top=top, bottom=0.01)
    cache: dict[int, Any] = {}

    def picture(i: int) -> Any:
        if display is None:
            return None
        if i not in cache:
            im = display(i)
            cache[i] = None if im is None else np.asarray(_thumbnail(im, 160))
        return cache[i]

    def cell(r: int, c: int, *, item=None, text="", head="", hit=None, truth=False) -> None:
        ax = fig.add_subplot(grid[r, c])
        ax.set_xticks([])
        ax.set_yticks([])
        pic = picture(item) if item is not None else None
        if pic is not None:
            ax.imshow(pic)
        else:
            body = text if item is None else f"{kind} {item_names[item]}"
            ax.text(0.5, 0.5, _wrap(body), ha="center", va="center", fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
        color = {True: "tab:green", False: "lightgrey", None: "black"}[hit]
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3.5 if hit else 1.0)
            spine.set_linestyle("--" if truth else "-")  # the truth column, not a retrieved hit
        ax.set_title(head, fontsize=7, color="tab:green" if hit else "black")

    for r, (direction, e) in enumerate(rows):
        found = f"found at {e.rank + 1}" if e.rank < len(e.top) else f"rank {e.rank + 1}: missed"
        if direction == "t2i":
            cell(r, 0, text=captions[e.query], head=f"text→{kind} query\n{found}")
            for c, (i, h) in enumerate(zip(e.top, e.hits, strict=True)):
                head = f"{HIT + ' ' if h else ''}{c + 1}. {item_names[i]}"
                cell(r, c + 1, item=i, hit=h, head=head)
            g = e.truth[0]
            cell(r, k + 1, item=g, hit=True, truth=True, head=f"ground truth\n{item_names[g]}")
        else:
            head = f"{kind}→text query\n{item_names[e.query]}, {found}"
            cell(r, 0, item=e.query, head=head)
            for c, (j, h) in enumerate(zip(e.top, e.hits, strict=True)):
                cell(r, c + 1, text=captions[j], hit=h, head=f"{HIT + ' ' if h else ''}{c + 1}.")
            j = next((j for j in e.truth if j not in e.top), e.truth[0])
            cell(r, k + 1, text=captions[j], hit=True, truth=True, head="a ground-truth caption")
    title = (
        "Example retrievals on the test split: query | its top list (ground truth in green, "
        f"{HIT}) | its ground truth (dashed); rank = position of the best ground truth"
    )
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9, y=1 - 0.2 / (1.95 * n + 0.9))
    return fig


def split_figure(img: Tensor, cap: Tensor, cap2img: Any, split: Any, n_queries: int, top_k: int):
    """:func:`retrieval_figure` for a split reader: its pictures when it has them
    (``display_image``), else items by id with a note saying why."""
    names = _item_names(split, img.shape[0])
    kind = "video" if getattr(split, "video_ids", None) is not None else "image"
    display = getattr(split, "display_image", None)
    has_pictures = display is not None and display(0) is not None
    note = ""
    if not has_pictures:
        note = (
            "(video frames here are feature vectors, not images: videos shown by id)"
            if kind == "video"
            else "(precomputed features, no pixels: images shown by id)"
        )
    ex = query_examples(img, cap, cap2img, n_queries, top_k)
    return retrieval_figure(
        ex, split.captions, names, display if has_pictures else None, kind, note
    )


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


def _test_embeddings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple | None:
    """(img, cap, cap2img, split) of the test split the model just evaluated, on rank zero."""
    if not trainer.is_global_zero:
        return None
    last = getattr(pl_module, "last_eval", None)
    if last is None or last[3] != "test":
        return None
    img, cap, cap2img, _ = last
    return img, cap, cap2img, trainer.datamodule.eval_split("test")  # type: ignore[attr-defined]


class RetrievalExamples(pl.Callback):
    """After testing, log example retrievals as W&B tables.

    ``retrieval/text_to_image``: caption → top ``top_k`` items; ``retrieval/image_to_text``:
    item → top ``top_k`` captions; ground-truth hits start with ``✓``; items are thumbnails
    (``wandb.Image``) when the reader has pictures (raw images), else names. Ranks and lists come
    from :mod:`gpo_lit.metrics` (:func:`query_examples`). Reads the embeddings the model keeps
    from its last evaluation (``pl_module.last_eval = (img, cap, cap2img, stage)``) and skips when
    there are none.
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
                return wandb.Image(_thumbnail(im, self.thumbnail_px), caption=label)

        tables = retrieval_examples(
            img,
            cap,
            cap2img,
            split.captions,
            _item_names(split, img.shape[0]),
            n_queries=self.n_queries,
            top_k=self.top_k,
            thumb=thumb,
        )
        return {
            f"retrieval/{key}": wandb.Table(columns=cols, data=rows)  # type: ignore[arg-type]
            for key, (cols, rows) in tables.items()
        }

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        got = _test_embeddings(trainer, pl_module) if loggers else None
        if got is None:
            return
        media = self.tables(*got)
        for logger in loggers:
            logger.log_metrics(media, step=trainer.global_step)


class RetrievalFigure(pl.Callback):
    """After testing, write a PNG grid of example retrievals (:func:`split_figure`) to ``path``:
    ``n_queries`` text→image and ``n_queries`` image→text queries with their top ``top_k``.
    An existing file is never overwritten (checked again before writing)."""

    def __init__(self, path: str | Path, n_queries: int = 4, top_k: int = 5) -> None:
        self.path = Path(path)
        self.n_queries = int(n_queries)
        self.top_k = int(top_k)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        got = _test_embeddings(trainer, pl_module)
        if got is None:
            return
        from gpo_lit.cli import ensure_new
        from gpo_lit.files import write_atomic

        ensure_new(self.path)
        fig = split_figure(*got, n_queries=self.n_queries, top_k=self.top_k)  # type: ignore[misc]
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
        got = _test_embeddings(trainer, pl_module)
        if got is None:
            return
        from gpo_lit.cli import ensure_new
        from gpo_lit.files import write_atomic
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
        write_atomic(self.path, lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]
        log.info("wrote %s", self.path)


def output_callbacks(out_dir: str | Path, figures: bool, save_ranks: bool) -> list[pl.Callback]:
    """The file-writing test callbacks an entry point's ``figures`` / ``save_ranks`` ask for,
    after checking that their files are new (before anything is embedded)."""
    from gpo_lit.cli import ensure_new

    out_dir = Path(out_dir)
    out: list[pl.Callback] = []
    if figures:
        ensure_new(out_dir / FIGURE_FILE)
        out.append(RetrievalFigure(out_dir / FIGURE_FILE))
    if save_ranks:
        ensure_new(out_dir / RANKS_FILE)
        out.append(SaveRanks(out_dir / RANKS_FILE))
    return out
