"""The whole report: a sweep read into a :class:`Report` in memory (:func:`build_report`), then
written into its folder (:func:`write_report`), never over an existing file unless asked."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from gpo_lit.cli import FIGURE_FILE
from gpo_lit.files import ensure_new
from gpo_lit.report.aggregate import Row, aggregate
from gpo_lit.report.jobs import Job, collect_jobs, common_overrides, optuna_note, sweep_tags
from gpo_lit.report.markdown import format_markdown
from gpo_lit.report.plots import KGrid, kmax_grids, plot_kmax_grids, plot_rsum
from gpo_lit.report.summary import write_csv
from gpo_lit.report.theta import ThetaCurve, plot_theta, theta_curves

OUTPUT_FILES = ("report.md", "summary.csv", "rsum.png", "kmax_grid.png", "gpo_theta.png")
RETRIEVAL_FIGURE = FIGURE_FILE  # a job's example-retrieval grid (train/eval figures=true)


@dataclass
class Report:
    """Everything a report shows, built in memory (nothing written)."""

    sweep_dir: Path
    protocol: str
    jobs: list[Job]
    rows: list[Row]
    common: list[str]
    grids: list[KGrid]
    curves: list[ThetaCurve]
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)  # file name -> figure
    retrieval: list[Path] = field(default_factory=list)  # the best configuration's job figures
    out_dir: Path | None = None  # where report.md goes (links are relative to it)

    @property
    def markdown(self) -> str:
        base = self.out_dir if self.out_dir is not None else self.sweep_dir / "report"
        links = [os.path.relpath(p, base) for p in self.retrieval]
        return format_markdown(
            self.sweep_dir,
            self.protocol,
            self.rows,
            self.common,
            self.notes,
            list(self.figures),
            tags=sweep_tags(self.jobs),
            retrieval=links,
        )


def build_report(
    sweep_dir: str | Path,
    protocol: str | None = None,
    theta_sizes: dict[str, int | None] | None = None,
    set_sizes: dict[str, int | None] | None = None,
    skip: str | Path | None = None,
) -> Report:
    """Read a sweep (``skip``: a folder inside it not to search, e.g. the report's own)."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir, skip=skip)
    protocol, rows = aggregate(jobs, protocol, set_sizes)
    grids = kmax_grids(rows)
    curves, notes = theta_curves(rows, theta_sizes)
    if not any(r.n for r in rows):
        notes.insert(0, "no finished job: nothing to plot")
    note = optuna_note(sweep_dir)
    if note:
        notes.insert(0, note)
    made = {
        "rsum.png": plot_rsum(rows),
        "kmax_grid.png": plot_kmax_grids(grids),
        "gpo_theta.png": plot_theta(curves),
    }
    figures = {k: f for k, f in made.items() if f is not None}
    if any(r.n for r in rows) and "rsum.png" not in figures:
        notes.append(f"protocol {protocol} has no rsum: no rsum / K-max plots")
    common = common_overrides(jobs)
    retrieval = [j.path / RETRIEVAL_FIGURE for j in rows[0].jobs] if rows and rows[0].n else []
    retrieval = [p for p in retrieval if p.is_file()]
    return Report(sweep_dir, protocol, jobs, rows, common, grids, curves, notes, figures, retrieval)


def check_new(out_dir: str | Path, names: Iterable[str] = OUTPUT_FILES) -> None:
    """Refuse (one line naming the file) if one of the report's files exists in ``out_dir``."""
    for name in names:
        ensure_new(Path(out_dir) / name, "pass overwrite=true or another out_dir")


def write_report(
    report: Report, out_dir: str | Path | None = None, overwrite: bool = False
) -> list[Path]:
    """Write ``report.md``, ``summary.csv`` and the figures into ``out_dir`` (default
    ``<sweep_dir>/report``). Refuses, before writing anything, if one of them exists."""
    out_dir = Path(out_dir) if out_dir is not None else report.sweep_dir / "report"
    names = ("report.md", "summary.csv", *report.figures)
    if not overwrite:
        check_new(out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.out_dir = out_dir  # figure links relative to it
    for name, fig in report.figures.items():
        fig.savefig(out_dir / name, dpi=120)
    write_csv(report.rows, out_dir / "summary.csv")
    (out_dir / "report.md").write_text(report.markdown)
    return [out_dir / n for n in names]
