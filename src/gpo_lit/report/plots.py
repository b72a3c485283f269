"""The sweep's plots: rsum per configuration (``rsum.png``) and, when the sweep has a K-max ×
K-max grid, rsum over visual K × text K (``kmax_grid.png``); figures on matplotlib's Agg canvas
(no pyplot)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gpo_lit.modalities import MODALITIES
from gpo_lit.report.aggregate import Row, groups, rsum
from gpo_lit.report.configs import is_gpo

GPO_COLOR, OTHER_COLOR = "tab:orange", "tab:blue"


def plot_rsum(rows: Sequence[Row]) -> Figure | None:
    """Horizontal bars of mean rsum per configuration from 0, best on top, one panel per
    experiment / features; GPO configurations in orange (a legend says so). Error bars (± sample
    std over seeds) only where a configuration has 2 or more finished seeds. None without results.
    """
    from matplotlib.patches import Patch

    # the eccv / cxc protocols have no rsum: no bars for them
    panels = {
        g: [r for r in rs if r.n and not math.isnan(rsum(r))] for g, rs in groups(rows).items()
    }
    panels = {g: rs for g, rs in panels.items() if rs}
    if not panels:
        return None
    heights = [max(1.6, 0.42 * len(rs) + 1.0) for rs in panels.values()]
    fig = Figure(figsize=(8.5, sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    hi = max(rsum(r) + np.nan_to_num(r.std.get("rsum", math.nan)) for rs in panels.values()
             for r in rs)  # fmt: skip
    for ax, (group, rs) in zip(axes, panels.items(), strict=True):
        rs = sorted(rs, key=rsum)  # barh draws bottom-up: best on top
        mean = np.array([rsum(r) for r in rs])
        std = np.array([r.std.get("rsum", math.nan) if r.n > 1 else math.nan for r in rs])
        gpo = [any(is_gpo(r.config.node(m)) for m in MODALITIES) for r in rs]
        colors = [GPO_COLOR if g else OTHER_COLOR for g in gpo]
        y = np.arange(len(rs))
        ax.barh(y, mean, color=colors, height=0.7)
        spread = np.isfinite(std)
        if spread.any():  # one seed: no error bar at all (not a zero-width one)
            ax.errorbar(mean[spread], y[spread], xerr=std[spread], fmt="none", ecolor="black",
                        capsize=3, linewidth=1)  # fmt: skip
        ax.set_yticks(y, [f"{r.config.label} (n={r.n})" for r in rs], fontsize=8)
        ax.set_xlim(0.0, 1.12 * hi)  # bars start at 0: lengths compare; same scale per panel
        for yi, m, sd in zip(y, mean, np.nan_to_num(std), strict=True):
            ax.text(m + sd + 0.01 * hi, yi, f"{m:.1f}", va="center", fontsize=7)
        ax.set_title(group if len(panels) > 1 else f"rsum per pooling configuration: {group}")
        n_max = max(r.n for r in rs)
        ax.set_xlabel("rsum (mean ± sample std over seeds)" if n_max > 1 else "rsum (one seed)")
        ax.grid(axis="x", alpha=0.3)
        shown = [(GPO_COLOR, "GPO pooling (either modality)"), (OTHER_COLOR, "other pooling")]
        handles = [Patch(color=c, label=t) for c, t in shown if c in colors]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


@dataclass
class KGrid:
    """rsum over visual K (rows) × text K (columns) of the K-max × K-max configurations of one
    experiment; NaN where the sweep has no such cell."""

    group: str
    visual_k: list[int]
    text_k: list[int]
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray
    set_sizes: tuple[int, int]
    gpo_rsum: float | None = None  # GPO on both sides in the same experiment, for comparison

    def k_labels(self, modality: str) -> list[str]:
        ks = self.visual_k if modality == "visual" else self.text_k
        n = self.set_sizes[MODALITIES.index(modality)]
        labels = ["N" if k >= n else str(k) for k in ks]
        if labels.count("N") > 1:  # several Ks reach the set size: tell them apart
            labels = [f"N ({k})" if lab == "N" else lab for lab, k in zip(labels, ks, strict=True)]
        return labels


def kmax_grids(rows: Sequence[Row]) -> list[KGrid]:
    """One grid per experiment (and per value of the other overrides) whose K-max × K-max
    configurations cover at least 2 distinct visual K or 2 distinct text K."""
    grids = []
    for group, rs in groups(rows).items():
        by_other: dict[str, dict[tuple[int, int], Row]] = {}
        gpo = [r for r in rs if r.n and all(is_gpo(r.config.node(m)) for m in MODALITIES)]
        for r in rs:
            vis, txt = r.config.node("visual"), r.config.node("text")
            vk, tk = vis.get("k"), txt.get("k")
            both_kmax = vis.get("name") == "kmax" == txt.get("name")
            has_rsum = not math.isnan(rsum(r))  # eccv / cxc have none: no grid
            if r.n and has_rsum and both_kmax and isinstance(vk, int) and isinstance(tk, int):
                by_other.setdefault(r.config.other, {})[vk, tk] = r
        for other, cells in by_other.items():
            vks = sorted({v for v, _ in cells})
            tks = sorted({t for _, t in cells})
            if len(vks) < 2 and len(tks) < 2:
                continue
            mean = np.full((len(vks), len(tks)), np.nan)
            std, n = mean.copy(), np.zeros_like(mean, dtype=int)
            for (v, t), r in cells.items():
                i, j = vks.index(v), tks.index(t)
                mean[i, j], std[i, j], n[i, j] = rsum(r), r.std.get("rsum", math.nan), r.n
            sizes = next(iter(cells.values())).config.set_sizes
            label = f"{group}, {other}" if other else group
            best_gpo = max((rsum(r) for r in gpo), default=None)
            grids.append(KGrid(label, vks, tks, mean, std, n, sizes, best_gpo))
    return grids


def plot_kmax_grids(grids: Sequence[KGrid]) -> Figure | None:
    """Heat-maps of rsum over visual K × text K (K at or above the set size labelled N); cell
    text mean ± std, the best cell outlined. None without grids."""
    if not grids:
        return None
    fig = Figure(figsize=(6.2 * len(grids), 5.2), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, g in zip(axes, grids, strict=True):
        im = ax.imshow(np.ma.masked_invalid(g.mean), cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, label="rsum (mean over seeds)")
        ax.set_xticks(range(len(g.text_k)), g.k_labels("text"))
        ax.set_yticks(range(len(g.visual_k)), g.k_labels("visual"))
        ax.set_xlabel("text K")
        ax.set_ylabel("visual K")
        finite = np.isfinite(g.mean)
        lo, hi = np.nanmin(g.mean), np.nanmax(g.mean)
        for i in range(g.mean.shape[0]):
            for j in range(g.mean.shape[1]):
                if not finite[i, j]:
                    ax.text(j, i, "–", ha="center", va="center", color="grey")
                    continue
                text = f"{g.mean[i, j]:.1f}"
                if np.isfinite(g.std[i, j]):
                    text += f"\n±{g.std[i, j]:.1f}"
                dark = hi > lo and (g.mean[i, j] - lo) / (hi - lo) < 0.6
                color = "white" if dark else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        bi, bj = np.unravel_index(np.nanargmax(g.mean), g.mean.shape)
        ax.add_patch(
            Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
        )
        title = f"K-max grid, rsum: {g.group}\nbest {g.mean[bi, bj]:.1f} at visual K = "
        title += f"{g.k_labels('visual')[bi]}, text K = {g.k_labels('text')[bj]}"
        if g.gpo_rsum is not None:
            title += f"; GPO (no search): {g.gpo_rsum:.1f}"
        ax.set_title(title, fontsize=9)
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes (for notebooks: ``IPython.display.Image(data=...)``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
