"""``report.md``: the table of configurations (mean ± std over seeds, best mean per column in
bold), built from :mod:`gpo_lit.metrics.table`'s pieces, and the page around it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gpo_lit.report.aggregate import Row, best_means, sort_label, table_metrics


def format_cell(mean: float, std: float, bold: bool = False, digits: int = 2) -> str:
    """``12.34 ± 0.56`` (just the mean below 2 seeds, ``–`` without results); ``**…**`` if bold."""
    from gpo_lit.metrics.table import cell  # on use: gpo_lit.metrics loads torch

    if math.isnan(mean):
        return cell(mean)
    text = cell(mean, digits)
    if not math.isnan(std):
        text += f" ± {cell(std, digits)}"
    return f"**{text}**" if bold else text


def _n_cell(row: Row) -> str:
    missing = len(row.missing)
    return f"{row.n} (+{missing} missing)" if missing else str(row.n)


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table, one row per configuration (as sorted), best mean per metric in bold."""
    from gpo_lit.metrics.table import markdown_table, title

    cols = table_metrics(rows)
    best = best_means(rows, cols)
    show_other = any(r.config.other for r in rows)
    head = ["experiment", "visual pooling", "text pooling", *(["other"] if show_other else [])]
    head += ["n", *(title(m) for m in cols)]
    lines = []
    for r in rows:
        c = r.config
        cells = [c.group, c.visual, c.text, *([c.other] if show_other else []), _n_cell(r)]
        for m in cols:
            mean, std = r.mean.get(m, math.nan), r.std.get(m, math.nan)
            cells.append(format_cell(mean, std, bold=m in best and mean == best[m]))
        lines.append(cells)
    return "\n".join(markdown_table(head, lines))


def format_markdown(
    sweep_dir: str | Path,
    protocol: str,
    rows: Sequence[Row],
    common: Sequence[str] = (),
    notes: Sequence[str] = (),
    plots: Sequence[str] = (),
    tags: Sequence[str] = (),
    retrieval: Sequence[str] = (),
) -> str:
    """The whole ``report.md``: header, table, missing jobs, notes, plot links and the best
    configuration's example-retrieval figures (``retrieval``: links to the jobs' PNGs)."""
    jobs = [j for r in rows for j in r.jobs]
    missing = [(r, j) for r in rows for j in r.missing]
    out = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"Protocol `{protocol}`; {len(jobs)} jobs, {len(jobs) - len(missing)} finished, "
        f"{len(missing)} missing; {len(rows)} configurations. Cells: mean ± sample std over "
        f"seeds (n = finished seeds); best mean per column in **bold**; sorted by "
        f"{sort_label(rows)}.",
    ]
    if tags:
        out += ["", "Tags: " + ", ".join(f"`{t}`" for t in tags)]
    if common:
        out += ["", "Common overrides: " + ", ".join(f"`{o}`" for o in common)]
    out += ["", format_table(rows)]
    if missing:
        out += ["", "## Missing results", ""]
        out += [
            f"- `{j.name}` ({r.config.group}: {r.config.label}): {j.problem}" for r, j in missing
        ]
    if notes:
        out += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if plots:
        out += ["", "## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots)]
    if retrieval:
        best = rows[0].config
        out += ["", f"## Example retrievals of the best configuration ({best.group}: {best.label})"]
        out += ["", *(f"![{Path(p).parent.name}]({p})" for p in retrieval)]
    return "\n".join(out) + "\n"
