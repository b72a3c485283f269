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

The collecting, aggregating, formatting and plotting functions are pure (no Hydra) so that tests
and ``notebooks/pooling_sweep.ipynb`` call them directly: :func:`build_report` reads a sweep into a
:class:`Report` without writing anything, :func:`write_report` writes it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import DictConfig, OmegaConf

from gpo_lit.cli import FIGURE_FILE, entry_point
from gpo_lit.errors import GpoLitError, UnsafeCheckpointError, first_line

# Metrics of the table (a higher mean is better for all of them), in column order: R@K protocols
# show TABLE_METRICS; others the known metrics they have (ECCV Caption: mAP@R, R-Precision, R@1).
TABLE_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
_PER_DIRECTION = {"map_at_r": "mAP@R", "rprecision": "R-P", "r1": "R@1", "r5": "R@5", "r10": "R@10"}
KNOWN_METRICS = (
    *(f"{d}_{m}" for d in ("i2t", "t2i") for m in _PER_DIRECTION),
    "rsum",
)
METRIC_TITLES = {f"{d}_{m}": f"{d} {t}" for d in ("i2t", "t2i") for m, t in _PER_DIRECTION.items()}
METRIC_TITLES["rsum"] = "rsum"
MODALITIES = ("visual", "text")
# Set sizes when neither the options nor the data config say: BUTD's 36 regions per image; a
# caption length for θ plots; a K at or above ``DEFAULT_SET_SIZE`` is labelled N (mean pooling).
DEFAULT_THETA_SIZE = {"visual": 36, "text": 12}
DEFAULT_SET_SIZE = {"visual": 36, "text": 64}
# Pooling options always shown in a label (they define the operator), whether or not they vary.
DEFINING_OPTIONS = {"kmax": ("k",)}
# Overrides rendered by the pooling columns or the experiment column (not repeated under "other").
_POOLING_KEYS = ("model/pooling", "model.pooling", "model.visual_pooling", "model.text_pooling")
_GROUP_KEYS = ("experiment", "name", "model/visual", "model/text")
OUTPUT_FILES = ("report.md", "summary.csv", "rsum.png", "kmax_grid.png", "gpo_theta.png")
RETRIEVAL_FIGURE = FIGURE_FILE  # a job's example-retrieval grid (train/eval figures=true)


# ---- collecting -----------------------------------------------------------------------------------
@dataclass
class Job:
    """One job folder of a sweep. ``metrics`` is None when the job did not finish (``problem``
    says why); ``config`` is the composed config (unresolved), None when unreadable."""

    path: Path
    name: str  # the folder relative to the sweep dir
    overrides: tuple[str, ...]
    config: DictConfig | None
    metrics: dict[str, dict[str, float]] | None
    problem: str | None = None

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def seed(self) -> Any:
        return _select(self.config, "seed")

    @property
    def key(self) -> tuple[str, ...]:
        """The configuration: overrides minus ``seed``, sorted."""
        return tuple(sorted(o for o in self.overrides if override_key(o) != "seed"))


def override_key(override: str) -> str:
    """``+model/pooling@model.visual_pooling=kmax`` -> ``model/pooling@model.visual_pooling``."""
    return override.split("=", 1)[0].lstrip("+~")


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _select(cfg: DictConfig | None, key: str, default: Any = None) -> Any:
    """``cfg.<key>`` as plain Python (interpolations resolved when possible, else left as text)."""
    if cfg is None:
        return default
    try:
        value = OmegaConf.select(cfg, key, default=default)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: fall back to its text
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        try:
            value = node._get_node(leaf)._value()  # type: ignore[union-attr]  # noqa: SLF001 - the raw ``${...}`` text
        except Exception:  # noqa: BLE001
            return default
    if isinstance(value, DictConfig) or OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001
            return OmegaConf.to_container(value, resolve=False)
    return value


def _job_dirs(sweep_dir: Path, skip: Path | None) -> list[Path]:
    """Folders holding ``.hydra/`` (not searched below a job, nor inside ``skip``)."""
    found = []
    for root, dirs, _ in os.walk(sweep_dir):
        here = Path(root)
        if skip is not None and here.resolve() == skip.resolve():
            dirs[:] = []
            continue
        if ".hydra" in dirs:
            found.append(here)
            dirs[:] = []
        else:
            dirs.sort()
    return sorted(found, key=lambda p: _natural(str(p.relative_to(sweep_dir))))


def _read_job(path: Path, sweep_dir: Path) -> Job:
    name = str(path.relative_to(sweep_dir)) if path != sweep_dir else "."
    problems = []
    overrides: tuple[str, ...] = ()
    try:
        loaded = OmegaConf.load(path / ".hydra" / "overrides.yaml")
        overrides = tuple(str(o) for o in loaded)
    except Exception as err:  # noqa: BLE001 - reported per job, the sweep goes on
        problems.append(f"unreadable .hydra/overrides.yaml ({type(err).__name__})")
    config = None
    try:
        config = OmegaConf.load(path / ".hydra" / "config.yaml")
        if not isinstance(config, DictConfig):
            raise TypeError("not a mapping")
    except Exception as err:  # noqa: BLE001
        config = None
        problems.append(f"unreadable .hydra/config.yaml ({type(err).__name__})")
    metrics = None
    mpath = path / "metrics.json"
    if not mpath.is_file():
        problems.append("no metrics.json (failed or unfinished)")
    else:
        try:
            metrics = json.loads(mpath.read_text())
            ok = isinstance(metrics, dict) and all(isinstance(m, dict) for m in metrics.values())
            if not ok or not metrics:
                raise ValueError("expected {protocol: {metric: value}}")
        except Exception as err:  # noqa: BLE001
            metrics = None
            problems.append(f"unreadable metrics.json ({type(err).__name__}: {err})")
    return Job(path, name, overrides, config, metrics, "; ".join(problems) or None)


def collect_jobs(sweep_dir: str | Path, skip: str | Path | None = None) -> list[Job]:
    """Every job of a Hydra multirun folder, finished or not, in job-number order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise GpoLitError(f"{sweep_dir}: expected a Hydra multirun folder, found no such folder")
    dirs = _job_dirs(sweep_dir, Path(skip) if skip is not None else None)
    if not dirs:
        raise GpoLitError(
            f"{sweep_dir}: expected a Hydra multirun folder (job folders holding .hydra/), "
            "found none"
        )
    return [_read_job(d, sweep_dir) for d in dirs]


# ---- describing configurations -------------------------------------------------------------------
def pooling_node(cfg: DictConfig | None, modality: str) -> dict[str, Any]:
    """The pooling a modality uses: ``model.<modality>_pooling``, else ``model.pooling``."""
    node = _select(cfg, f"model.{modality}_pooling") or _select(cfg, "model.pooling") or {}
    return dict(node) if isinstance(node, dict) else {"name": str(node)}


def set_size(cfg: DictConfig | None, modality: str, given: int | None, default: dict) -> int:
    """A modality's set size: ``given``, else (visual) the regions / frames per item of the demo
    data config, else ``default[modality]``."""
    if given is not None:
        return int(given)
    if modality == "visual":
        for key in ("data.demo.n_regions", "data.demo.n_frames", "data.reader.n_frames"):
            value = _select(cfg, key)
            if isinstance(value, list | tuple) and value:
                value = max(value)
            if isinstance(value, int) and value > 0:
                return value
    return default[modality]


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "?"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Configuration:
    """A setting of the sweep, rendered for people: experiment (+ features when they vary),
    visual and text pooling, other varying overrides."""

    key: tuple[str, ...]
    group: str
    visual: str
    text: str
    other: str
    pooling: tuple[tuple[tuple[str, Any], ...], ...]  # visual, text nodes
    set_sizes: tuple[int, ...]  # visual, text: K at or above is N

    @property
    def label(self) -> str:
        pool = self.visual if self.visual == self.text else f"{self.visual} / {self.text}"
        return f"{pool}, {self.other}" if self.other else pool

    def node(self, modality: str) -> dict[str, Any]:
        return dict(self.pooling[MODALITIES.index(modality)])


def _pooling_label(node: dict, shown: Iterable[str], n: int) -> str:
    name = str(node.get("name", "?"))
    parts = []
    for opt in shown:
        if opt not in node:
            continue
        value = node[opt]
        is_n = name == "kmax" and opt == "k" and isinstance(value, int) and value >= n
        parts.append(f"{opt}={'N' if is_n else _fmt_value(value)}")
    return f"{name}({', '.join(parts)})" if parts else name


def describe(
    jobs: Sequence[Job], set_sizes: dict[str, int | None] | None = None
) -> dict[tuple[str, ...], Configuration]:
    """Each configuration of the sweep (keyed by :attr:`Job.key`), labelled by what varies."""
    set_sizes = set_sizes or {}
    first: dict[tuple[str, ...], Job] = {}
    for job in jobs:
        first.setdefault(job.key, job)
    reps = list(first.values())
    # Options shown per pooling name: the defining ones and those that vary across the sweep.
    values: dict[str, dict[str, set[str]]] = {}
    for job in reps:
        for modality in MODALITIES:
            node = pooling_node(job.config, modality)
            for opt, value in node.items():
                if opt != "name":
                    values.setdefault(str(node.get("name")), {}).setdefault(opt, set()).add(
                        repr(value)
                    )
    shown = {
        name: [o for o in opts if o in DEFINING_OPTIONS.get(name, ()) or len(opts[o]) > 1]
        for name, opts in values.items()
    }
    # Group: the experiment name, plus the encoders when they vary.
    parts = {
        job.key: (
            str(_select(job.config, "name", "?")),
            _short(_select(job.config, "model.visual._target_")),
            _short(_select(job.config, "model.text.encoder._target_")),
        )
        for job in reps
    }
    varies = [len({p[i] for p in parts.values()}) > 1 for i in range(3)]
    common = set.intersection(*(set(k) for k in first)) if first else set()

    out = {}
    for key, job in first.items():
        name, vis_enc, txt_enc = parts[key]
        encoders = [e for e, v in zip((vis_enc, txt_enc), varies[1:], strict=True) if v]
        group = f"{name} ({' + '.join(encoders)})" if encoders else name
        nodes, labels, sizes = [], [], []
        for modality in MODALITIES:
            node = pooling_node(job.config, modality)
            n = set_size(job.config, modality, set_sizes.get(modality), DEFAULT_SET_SIZE)
            nodes.append(tuple(sorted(node.items(), key=lambda kv: kv[0])))
            labels.append(_pooling_label(node, shown.get(str(node.get("name")), []), n))
            sizes.append(n)
        other: Any = [  # list[str] here, str below
            o
            for o in job.overrides  # in the order given
            if o in key
            and o not in common
            and not override_key(o).startswith(_POOLING_KEYS)
            and override_key(o) not in _GROUP_KEYS
        ]
        out[key] = Configuration(
            key, group, labels[0], labels[1], ", ".join(other), tuple(nodes), tuple(sizes)
        )
    # Two configurations must never read the same: add the overrides that tell them apart.
    by_text: dict[tuple[str, str, str, str], list[tuple[str, ...]]] = {}
    for key, c in out.items():
        by_text.setdefault((c.group, c.visual, c.text, c.other), []).append(key)
    for keys in by_text.values():
        if len(keys) > 1:
            shared = set.intersection(*(set(k) for k in keys))
            for key in keys:
                extra = ", ".join(o for o in first[key].overrides if o in key and o not in shared)
                c = out[key]
                other = f"{c.other}, {extra}" if c.other else extra
                out[key] = Configuration(
                    key, c.group, c.visual, c.text, other, c.pooling, c.set_sizes
                )
    return out


def sweep_tags(jobs: Sequence[Job]) -> list[str]:
    """The ``tags`` of the sweep's jobs (their run configs), each once, in order of appearance."""
    tags: dict[str, None] = {}
    for job in jobs:
        value = _select(job.config, "tags") or []
        for tag in value if isinstance(value, list | tuple) else [value]:
            tags[str(tag)] = None
    return list(tags)


def optuna_note(sweep_dir: Path) -> str | None:
    """One line on an Optuna search's result (``optimization_results.yaml`` of the sweep), whose
    objective is each trial's best validation rsum (gpo_lit.train), not the test rsum tabled."""
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return None
    try:
        found = OmegaConf.to_container(OmegaConf.load(path))
        value, params = float(found["best_value"]), found["best_params"]  # type: ignore[call-overload, index]
    except Exception as err:  # noqa: BLE001 - a note, not a reason to stop the report
        return f"{path.name}: unreadable ({type(err).__name__})"
    shown = ", ".join(f"`{k}={_fmt_value(v)}`" for k, v in params.items())  # type: ignore[union-attr]
    return (
        f"Optuna search ({path.name}): best validation rsum {value:.2f} (the objective; the table "
        f"shows test metrics) with {shown}"
    )


def common_overrides(jobs: Sequence[Job]) -> list[str]:
    """Overrides (minus ``seed``) shared by every job of the sweep, in the first job's order."""
    if not jobs:
        return []
    shared = set.intersection(*(set(j.key) for j in jobs))
    return [o for o in jobs[0].overrides if o in shared]


# ---- aggregating ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One configuration: its jobs and, over the finished ones, the mean and sample std (NaN
    with fewer than 2 finished seeds) of every metric of the protocol."""

    config: Configuration
    jobs: list[Job]
    mean: dict[str, float]
    std: dict[str, float]
    n: int  # finished jobs (seeds)

    @property
    def missing(self) -> list[Job]:
        return [j for j in self.jobs if j.metrics is None]

    @property
    def seeds(self) -> list[Any]:
        return [j.seed for j in self.jobs if j.metrics is not None]


def default_protocol(jobs: Sequence[Job]) -> str:
    """The first protocol of the first finished job's ``metrics.json``."""
    for job in jobs:
        if job.metrics:
            return next(iter(job.metrics))
    raise GpoLitError("sweep: expected at least one finished job (a metrics.json), found none")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN below 2 values; both NaN for none)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(
    jobs: Sequence[Job],
    protocol: str | None = None,
    set_sizes: dict[str, int | None] | None = None,
) -> tuple[str, list[Row]]:
    """``(protocol, rows)``: one row per configuration, sorted by mean rsum (best first; rows
    without results last). Jobs whose ``metrics.json`` lacks the protocol count as missing."""
    protocol = protocol or default_protocol(jobs)
    known = {p for j in jobs if j.metrics for p in j.metrics}
    if protocol not in known:
        raise GpoLitError(f"protocol: expected one of {sorted(known)}, found {protocol!r}")
    jobs = list(jobs)
    for i, job in enumerate(jobs):
        if job.metrics is not None and protocol not in job.metrics:
            jobs[i] = Job(
                job.path,
                job.name,
                job.overrides,
                job.config,
                None,
                f"metrics.json has no protocol {protocol!r} (has {sorted(job.metrics)})",
            )
    configs = describe(jobs, set_sizes)
    members: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        members.setdefault(job.key, []).append(job)
    rows = []
    for key, group in members.items():
        done = [j.metrics[protocol] for j in group if j.metrics is not None]
        names = [m for m in KNOWN_METRICS if any(m in d for d in done)]
        names += sorted({m for d in done for m in d} - set(names))
        mean, std = {}, {}
        for m in names:
            mean[m], std[m] = mean_std([float(d[m]) for d in done if m in d])
        rows.append(Row(configs[key], group, mean, std, len(done)))
    cols = table_metrics(rows)
    rows.sort(key=lambda r: math.inf if math.isnan(_score(r, cols)) else -_score(r, cols))
    return protocol, rows


def _rsum(row: Row) -> float:
    return row.mean.get("rsum", math.nan)


def table_metrics(rows: Sequence[Row]) -> tuple[str, ...]:
    """The table's columns: :data:`TABLE_METRICS` for R@K protocols, else the known metrics the
    protocol has (``eccv``: mAP@R, R-Precision and R@1 per direction; ``cxc``: R@1/5/10)."""
    have = {m for r in rows for m in r.mean}
    if "rsum" in have or not have & set(KNOWN_METRICS):
        return TABLE_METRICS
    return tuple(m for m in KNOWN_METRICS if m in have)


def sort_label(rows: Sequence[Row]) -> str:
    """What the rows are sorted by: rsum, else the sum of the table's columns."""
    return "rsum" if "rsum" in table_metrics(rows) else "the sum of the columns"


def _score(row: Row, cols: Sequence[str]) -> float:
    """rsum when the protocol has it, else the sum of the row's table columns."""
    if "rsum" in cols:
        return _rsum(row)
    vals = [row.mean.get(m, math.nan) for m in cols]
    return math.nan if any(math.isnan(v) for v in vals) else sum(vals)


def best_means(rows: Sequence[Row], metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The best (highest) mean per metric over the rows that have one."""
    best = {}
    for m in metrics if metrics is not None else table_metrics(rows):
        vals = [r.mean[m] for r in rows if not math.isnan(r.mean.get(m, math.nan))]
        if vals:
            best[m] = max(vals)
    return best


# ---- formatting -----------------------------------------------------------------------------------
def format_cell(mean: float, std: float, bold: bool = False, digits: int = 2) -> str:
    """``12.34 ± 0.56`` (just the mean below 2 seeds, ``–`` without results); ``**…**`` if bold."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"**{text}**" if bold else text


def _n_cell(row: Row) -> str:
    missing = len(row.missing)
    return f"{row.n} (+{missing} missing)" if missing else str(row.n)


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table, one row per configuration (as sorted), best mean per metric in bold."""
    cols = table_metrics(rows)
    best = best_means(rows, cols)
    show_other = any(r.config.other for r in rows)
    head = ["experiment", "visual pooling", "text pooling", *(["other"] if show_other else [])]
    head += ["n", *(METRIC_TITLES[m] for m in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.config
        cells = [c.group, c.visual, c.text, *([c.other] if show_other else []), _n_cell(r)]
        for m in cols:
            mean, std = r.mean.get(m, math.nan), r.std.get(m, math.nan)
            cells.append(format_cell(mean, std, bold=m in best and mean == best[m]))
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


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


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    """``summary.csv``: configuration columns, n, missing, seeds, then ``<metric>_mean`` and
    ``<metric>_std`` for every metric (empty where undefined)."""
    metrics = list(table_metrics(rows))
    for r in rows:
        metrics += [m for m in r.mean if m not in metrics]
    head = ["experiment", "visual_pooling", "text_pooling", "other", "overrides", "n", "missing"]
    head += ["seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]

    def num(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else repr(float(x))

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            c = r.config
            w.writerow(
                [c.group, c.visual, c.text, c.other, " ".join(c.key), r.n, len(r.missing)]
                + [" ".join(str(s) for s in r.seeds)]
                + [num(d.get(m)) for m in metrics for d in (r.mean, r.std)]
            )


# ---- plots ----------------------------------------------------------------------------------------
def _groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.config.group, []).append(r)
    return out


def _is_gpo(node: dict) -> bool:
    return str(node.get("name", "")).startswith("gpo")


GPO_COLOR, OTHER_COLOR = "tab:orange", "tab:blue"


def plot_rsum(rows: Sequence[Row]) -> Figure | None:
    """Horizontal bars of mean rsum per configuration from 0, best on top, one panel per
    experiment / features; GPO configurations in orange (a legend says so). Error bars (± sample
    std over seeds) only where a configuration has 2 or more finished seeds. None without results.
    """
    from matplotlib.patches import Patch

    # the eccv / cxc protocols have no rsum: no bars for them
    groups = {
        g: [r for r in rs if r.n and not math.isnan(_rsum(r))] for g, rs in _groups(rows).items()
    }
    groups = {g: rs for g, rs in groups.items() if rs}
    if not groups:
        return None
    heights = [max(1.6, 0.42 * len(rs) + 1.0) for rs in groups.values()]
    fig = Figure(figsize=(8.5, sum(heights)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
    hi = max(_rsum(r) + np.nan_to_num(r.std.get("rsum", math.nan)) for rs in groups.values()
             for r in rs)  # fmt: skip
    for ax, (group, rs) in zip(axes, groups.items(), strict=True):
        rs = sorted(rs, key=_rsum)  # barh draws bottom-up: best on top
        mean = np.array([_rsum(r) for r in rs])
        std = np.array([r.std.get("rsum", math.nan) if r.n > 1 else math.nan for r in rs])
        is_gpo = [any(_is_gpo(r.config.node(m)) for m in MODALITIES) for r in rs]
        colors = [GPO_COLOR if g else OTHER_COLOR for g in is_gpo]
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
        ax.set_title(group if len(groups) > 1 else f"rsum per pooling configuration: {group}")
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
    set_sizes: tuple[int, ...]
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
    for group, rs in _groups(rows).items():
        by_other: dict[str, dict[tuple[int, int], Row]] = {}
        gpo = [r for r in rs if r.n and all(_is_gpo(r.config.node(m)) for m in MODALITIES)]
        for r in rs:
            vis, txt = r.config.node("visual"), r.config.node("text")
            ks = vis.get("k"), txt.get("k")
            both_kmax = vis.get("name") == "kmax" == txt.get("name")
            has_rsum = not math.isnan(_rsum(r))  # eccv / cxc have none: no grid
            if r.n and has_rsum and both_kmax and all(isinstance(k, int) for k in ks):
                by_other.setdefault(r.config.other, {})[ks] = r  # type: ignore[index]
        for other, cells in by_other.items():
            vks = sorted({v for v, _ in cells})
            tks = sorted({t for _, t in cells})
            if len(vks) < 2 and len(tks) < 2:
                continue
            mean = np.full((len(vks), len(tks)), np.nan)
            std, n = mean.copy(), np.zeros_like(mean, dtype=int)
            for (v, t), r in cells.items():
                i, j = vks.index(v), tks.index(t)
                mean[i, j], std[i, j], n[i, j] = _rsum(r), r.std.get("rsum", math.nan), r.n
            sizes = next(iter(cells.values())).config.set_sizes
            label = f"{group}, {other}" if other else group
            best_gpo = max((_rsum(r) for r in gpo), default=None)
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


@dataclass
class ThetaCurve:
    """θ of one configuration and modality at set size ``size``, averaged over seeds."""

    config: Configuration
    modality: str
    size: int
    mean: np.ndarray  # [size]
    std: np.ndarray  # [size], NaN with one seed
    n: int


def best_checkpoint(job: Job) -> Path | None:
    """The job's best checkpoint: the last ``checkpoints/best*.ckpt`` in natural order."""
    found = sorted((job.path / "checkpoints").glob("best*.ckpt"), key=lambda p: _natural(p.name))
    return found[-1] if found else None


def load_gpo_weights(path: str | Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """θ at ``sizes[modality]`` of every GPO-type pooling of a gpo_lit checkpoint, per modality.

    Rebuilds only the two pooling heads from the checkpoint's ``hyper_parameters`` and
    ``state_dict`` (exactly as :class:`gpo_lit.model.VSEModel` builds them), so no encoder (BERT,
    a timm backbone) is constructed; read by :func:`gpo_lit.checkpoint_io.read_checkpoint`.
    Per-dimension θ (``gpo_perdim``, ``[n, D]``) is averaged over the dimensions.
    """
    import torch

    import gpo_lit.pooling.sequence  # noqa: F401 - registers the poolers by name
    import gpo_lit.pooling.zoo  # noqa: F401
    from gpo_lit.checkpoint_io import read_checkpoint
    from gpo_lit.pooling import create_pooling

    path = Path(path)
    ckpt = read_checkpoint(path, mmap=True)  # UnsafeCheckpointError for a hostile config
    try:
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        out = {}
        for modality in MODALITIES:
            node = hp.get(f"{modality}_pooling") or hp["pooling"]
            pool = create_pooling(dim=hp["embed_dim"], **node)
            if not hasattr(pool, "weights_for_length"):
                continue
            prefix = f"{modality}_pool."
            pool.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
            pool.eval()
            with torch.no_grad():
                theta = pool.weights_for_length(int(sizes[modality])).float()  # type: ignore[operator]
            out[modality] = (theta.mean(-1) if theta.dim() > 1 else theta).numpy().copy()
        return out
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise GpoLitError(
            f"{path}: expected a gpo_lit checkpoint whose pooling heads its hyper_parameters "
            f"rebuild, found {first_line(err)}"
        ) from None


def theta_curves(
    rows: Sequence[Row], theta_sizes: dict[str, int | None] | None = None
) -> tuple[list[ThetaCurve], list[str]]:
    """θ per modality of every configuration with a GPO-type pooling, from the best checkpoint of
    each finished job, averaged over seeds; and notes on the jobs that gave none."""
    theta_sizes = theta_sizes or {}
    curves, notes = [], []
    for r in rows:
        gpo_mods = [m for m in MODALITIES if _is_gpo(r.config.node(m))]
        if not gpo_mods:
            continue
        per_mod: dict[str, list[np.ndarray]] = {m: [] for m in gpo_mods}
        first = r.jobs[0]
        sizes = {
            m: set_size(first.config, m, theta_sizes.get(m), DEFAULT_THETA_SIZE) for m in MODALITIES
        }
        for job in r.jobs:
            if not job.finished:
                continue
            ckpt = best_checkpoint(job)
            if ckpt is None:
                notes.append(f"`{job.name}`: no checkpoints/best*.ckpt, left out of the θ plot")
                continue
            try:
                weights = load_gpo_weights(ckpt, sizes)
            except UnsafeCheckpointError:
                raise  # never a note: someone else's code was put in the sweep
            except GpoLitError as err:
                notes.append(f"θ plot: {err}")
                continue
            for m in gpo_mods:
                if m in weights:
                    per_mod[m].append(weights[m])
        for m, thetas in per_mod.items():
            if thetas:
                stack = np.stack(thetas)
                std = stack.std(0, ddof=1) if len(thetas) > 1 else np.full(stack.shape[1], np.nan)
                curves.append(ThetaCurve(r.config, m, sizes[m], stack.mean(0), std, len(thetas)))
    return curves, notes


def plot_theta(curves: Sequence[ThetaCurve]) -> Figure | None:
    """θ_k against rank k (1 = largest value), one panel per modality, one line per GPO
    configuration (band: ± std over seeds) — the paper's Fig. 5. None without curves."""
    if not curves:
        return None
    mods = [m for m in MODALITIES if any(c.modality == m for c in curves)]
    fig = Figure(figsize=(6.0 * len(mods), 4.2), layout="constrained")
    axes = fig.subplots(1, len(mods), squeeze=False)[0]
    groups = {c.config.group for c in curves}
    for ax, m in zip(axes, mods, strict=True):
        cs = [c for c in curves if c.modality == m]
        sizes = {c.size for c in cs}
        for c in cs:
            k = np.arange(1, c.size + 1)
            label = c.config.label if len(groups) == 1 else f"{c.config.group}: {c.config.label}"
            label += f" (n={c.n}" + (f", N={c.size})" if len(sizes) > 1 else ")")
            (line,) = ax.plot(k, c.mean, marker="o", markersize=3, label=label)
            if c.n > 1:
                low = np.clip(c.mean - c.std, 0.0, None)  # θ >= 0
                ax.fill_between(k, low, c.mean + c.std, color=line.get_color(), alpha=0.2)
        size = f" (N = {next(iter(sizes))})" if len(sizes) == 1 else ""
        ax.set_title(f"{m} GPO weights{size}")
        ax.set_xlabel("rank k (1 = largest)")
        ax.set_ylabel("θ_k")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes (for notebooks: ``IPython.display.Image(data=...)``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


# ---- the whole report -----------------------------------------------------------------------------
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
    figures = {
        "rsum.png": plot_rsum(rows),
        "kmax_grid.png": plot_kmax_grids(grids),
        "gpo_theta.png": plot_theta(curves),
    }
    figures = {k: f for k, f in figures.items() if f is not None}
    if any(r.n for r in rows) and "rsum.png" not in figures:
        notes.append(f"protocol {protocol} has no rsum: no rsum / K-max plots")
    common = common_overrides(jobs)
    retrieval = [j.path / RETRIEVAL_FIGURE for j in rows[0].jobs] if rows and rows[0].n else []
    retrieval = [p for p in retrieval if p.is_file()]
    return Report(sweep_dir, protocol, jobs, rows, common, grids, curves, notes, figures, retrieval)  # type: ignore[arg-type]


def write_report(report: Report, out_dir: str | Path | None = None, overwrite: bool = False):
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


def check_new(out_dir: str | Path, names: Iterable[str] = OUTPUT_FILES) -> None:
    """Refuse (one line naming the file) if one of the report's files exists in ``out_dir``."""
    for name in names:
        path = Path(out_dir) / name
        if path.exists():
            raise GpoLitError(
                f"{path}: expected a new file, found an existing one (not overwritten; pass "
                "overwrite=true or another out_dir)"
            )


def _sizes(node: Any) -> dict[str, int | None]:
    return {m: (None if node is None else node.get(m)) for m in MODALITIES}


def _remove_if_empty(out_dir: Path, sweep_dir: Path) -> None:
    """Remove ``out_dir`` if empty, then ``sweep_dir`` if empty and ``out_dir`` was inside it."""
    try:
        out_dir.rmdir()  # only ever removes an empty folder
        if out_dir.resolve().parent == sweep_dir.resolve():
            sweep_dir.rmdir()
    except OSError:
        pass


def _sweep_dir_given(cfg: DictConfig) -> bool:
    """``sweep_dir`` is set (not ``???``, null or empty, as ``make report`` without it gives)."""
    return not OmegaConf.is_missing(cfg, "sweep_dir") and bool(str(cfg.sweep_dir or "").strip())


def _report_dir(*, _root_: DictConfig) -> str:
    """``hydra.run.dir``: ``out_dir``, else ``<sweep_dir>/report``; ``.`` without a sweep_dir (so
    that Hydra starts and :func:`main` answers in one line)."""
    if not _sweep_dir_given(_root_):
        return "."
    return str(_root_.out_dir or Path(str(_root_.sweep_dir)) / "report")


if not OmegaConf.has_resolver("gpo_lit.report_dir"):
    OmegaConf.register_new_resolver("gpo_lit.report_dir", _report_dir)


@entry_point("report")
def main(cfg: DictConfig) -> None:
    if not _sweep_dir_given(cfg):
        raise GpoLitError(
            "sweep_dir: expected a Hydra multirun folder (sweep_dir=logs/train/<name>/multirun_…), "
            "found none given"
        )
    sweep_dir, out_dir = Path(cfg.sweep_dir), Path(_report_dir(_root_=cfg))
    if not cfg.overwrite:
        check_new(out_dir)  # before reading the sweep: a refusal costs nothing
    try:
        report = build_report(
            sweep_dir, cfg.protocol, _sizes(cfg.theta_sizes), _sizes(cfg.set_sizes), skip=out_dir
        )
    except GpoLitError:
        # Hydra created out_dir (hydra.run.dir) before we ran: do not leave an empty tree behind.
        _remove_if_empty(out_dir, sweep_dir)
        raise
    written = write_report(report, out_dir, overwrite=cfg.overwrite)
    print(report.markdown)
    print("wrote " + ", ".join(str(p) for p in written if p.exists()), flush=True)


if __name__ == "__main__":
    main()
