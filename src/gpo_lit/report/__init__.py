"""Summarise a Hydra multirun sweep: a table, a CSV and plots.

    python -m gpo_lit.report sweep_dir=logs/train/demo/multirun_2026-01-01_12-00-00
    make report SWEEP_DIR=logs/train/demo/multirun_… [protocol=coco_5k] [overwrite=true]

A Hydra entry point like ``train`` and ``eval`` (options in ``conf/report.yaml``: ``out_dir``,
``protocol``, ``theta_sizes``, ``set_sizes``, ``overwrite``), so it takes the same ``key=value``
overrides and answers user errors in one line (exit status 2). ``hydra.run.dir`` is the report
folder itself; Hydra writes nothing else there (no ``.hydra/``, no log file).

A *job* is a folder of the sweep holding ``.hydra/`` (Hydra writes ``<sweep_dir>/<job_num>/``); it
is finished when it holds ``metrics.json``. A *configuration* is a job's overrides minus ``seed``,
so the seeds of one setting are aggregated together (mean ± sample std, n = finished seeds). Each
configuration is rendered as experiment / visual pooling / text pooling (K-max's ``k`` shown, ``N``
when ``k`` reaches the set size) / any other override that varies.

Outputs (in ``out_dir``, default ``<sweep_dir>/report``; an existing file is never overwritten
unless ``overwrite=true``):

- ``report.md``: the table sorted by rsum, best mean per column in bold; missing jobs listed.
- ``summary.csv``: one row per configuration, mean and std of every metric.
- ``rsum.png``: rsum mean ± std per configuration (one panel per experiment / features).
- ``kmax_grid.png``: rsum over visual K × text K, when the sweep has a K-max × K-max grid.
- ``gpo_theta.png``: GPO's learned θ against rank k per modality (paper Fig. 5), from each finished
  GPO job's best checkpoint, averaged over seeds.

One job per module: :mod:`~gpo_lit.report.jobs` (collecting the sweep),
:mod:`~gpo_lit.report.configs` (labelling its configurations), :mod:`~gpo_lit.report.aggregate`
(mean ± std over seeds), :mod:`~gpo_lit.report.markdown` (the table, on
:mod:`gpo_lit.metrics.table`), :mod:`~gpo_lit.report.summary` (the CSV),
:mod:`~gpo_lit.report.plots` (rsum, K-max grid), :mod:`~gpo_lit.report.theta` (θ),
:mod:`~gpo_lit.report.build` (the whole report) and :mod:`~gpo_lit.report.command` (the entry
point). All but the last are pure (no Hydra), so that tests and ``notebooks/pooling_sweep.ipynb``
call them directly: :func:`build_report` reads a sweep into a :class:`Report` without writing
anything, :func:`write_report` writes it.
"""

from gpo_lit.report.aggregate import (
    KNOWN_METRICS,
    TABLE_METRICS,
    Row,
    aggregate,
    best_means,
    default_protocol,
    mean_std,
    sort_label,
    table_metrics,
)
from gpo_lit.report.build import (
    OUTPUT_FILES,
    RETRIEVAL_FIGURE,
    Report,
    build_report,
    check_new,
    write_report,
)
from gpo_lit.report.command import _sweep_dir_given, main
from gpo_lit.report.configs import Configuration, describe, pooling_node, set_size
from gpo_lit.report.jobs import (
    Job,
    best_checkpoint,
    collect_jobs,
    common_overrides,
    optuna_note,
    override_key,
    sweep_tags,
)
from gpo_lit.report.markdown import format_cell, format_markdown, format_table
from gpo_lit.report.plots import KGrid, figure_png, kmax_grids, plot_kmax_grids, plot_rsum
from gpo_lit.report.summary import write_csv
from gpo_lit.report.theta import ThetaCurve, load_gpo_weights, plot_theta, theta_curves

__all__ = [
    "KNOWN_METRICS",
    "OUTPUT_FILES",
    "RETRIEVAL_FIGURE",
    "TABLE_METRICS",
    "Configuration",
    "Job",
    "KGrid",
    "Report",
    "Row",
    "ThetaCurve",
    "_sweep_dir_given",
    "aggregate",
    "best_checkpoint",
    "best_means",
    "build_report",
    "check_new",
    "collect_jobs",
    "common_overrides",
    "default_protocol",
    "describe",
    "figure_png",
    "format_cell",
    "format_markdown",
    "format_table",
    "kmax_grids",
    "load_gpo_weights",
    "main",
    "mean_std",
    "optuna_note",
    "override_key",
    "plot_kmax_grids",
    "plot_rsum",
    "plot_theta",
    "pooling_node",
    "set_size",
    "sort_label",
    "sweep_tags",
    "table_metrics",
    "theta_curves",
    "write_csv",
    "write_report",
]
