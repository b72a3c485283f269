"""Figures of an evaluation or of the pooling: a grid of example retrievals and GPO's θ curves,
drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from gpo_lit.callbacks.examples import HIT, Example, item_names, query_examples


def thumbnail(im: Any, size: int) -> Any:
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
            cache[i] = None if im is None else np.asarray(thumbnail(im, 160))
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
    names = item_names(split, img.shape[0])
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


def png(fig: Any) -> Any:
    """The figure as a PIL image (what ``wandb.Image`` takes without matplotlib's pyplot)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
