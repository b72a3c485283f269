"""Aggregating seeds: one :class:`Row` per configuration with the mean and sample std of every
metric over its finished jobs, rows sorted best first; which metrics the table shows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpo_lit.errors import GpoLitError
from gpo_lit.report.configs import Configuration, describe
from gpo_lit.report.jobs import Job

# Metrics of the table (a higher mean is better for all of them), in column order: R@K protocols
# show TABLE_METRICS; others the known metrics they have (ECCV Caption: mAP@R, R-Precision, R@1).
TABLE_METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
KNOWN_METRICS = (
    *(f"{d}_{m}" for d in ("i2t", "t2i") for m in ("map_at_r", "rprecision", "r1", "r5", "r10")),
    "rsum",
)


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
            jobs[i] = _unfinished(
                job, f"metrics.json has no protocol {protocol!r} (has {sorted(job.metrics)})"
            )
        elif job.metrics is not None:
            bad = [m for m, v in job.metrics[protocol].items() if not _finite_number(v)]
            if bad:
                value = job.metrics[protocol][bad[0]]
                jobs[i] = _unfinished(job, f"metrics.json: {bad[0]} is {value!r}, not a number")
    configs = describe(jobs, set_sizes)
    members: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        members.setdefault(job.key, []).append(job)
    rows = []
    for key, group in members.items():
        group = _one_per_seed(group)
        # Every seed of a row has every metric of the row, or the metric's mean would rest on
        # fewer seeds than the row's n says: a job missing one counts as unfinished.
        have = {m for j in group if j.metrics is not None for m in j.metrics[protocol]}
        for i, job in enumerate(group):
            lacks = sorted(have - set(job.metrics[protocol])) if job.metrics is not None else []
            if lacks:
                group[i] = _unfinished(job, f"metrics.json lacks {', '.join(lacks)}")
        done = [j.metrics[protocol] for j in group if j.metrics is not None]
        names = [m for m in KNOWN_METRICS if any(m in d for d in done)]
        names += sorted({m for d in done for m in d} - set(names))
        mean, std = {}, {}
        for m in names:
            mean[m], std[m] = mean_std([float(d[m]) for d in done])
        rows.append(Row(configs[key], group, mean, std, len(done)))
    cols = table_metrics(rows)
    rows.sort(key=lambda r: math.inf if math.isnan(_score(r, cols)) else -_score(r, cols))
    return protocol, rows


def _unfinished(job: Job, problem: str) -> Job:
    """``job`` counted as not finished, for ``problem``."""
    return Job(job.path, job.name, job.overrides, job.config, None, problem)


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _one_per_seed(group: list[Job]) -> list[Job]:
    """A configuration's jobs with each seed counted once: a second finished job of the same
    seed (a job folder copied twice) would add a seed that was never run."""
    seen: dict[str, str] = {}
    out = []
    for job in group:
        if job.metrics is not None and job.seed is not None:
            seed = repr(job.seed)
            if seed in seen:
                job = _unfinished(job, f"repeats {seen[seed]} (the same configuration and seed)")
            else:
                seen[seed] = job.name
        out.append(job)
    return out


def rsum(row: Row) -> float:
    """The row's mean rsum (NaN without one)."""
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
        return rsum(row)
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


def groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows per experiment (``Configuration.group``), in row order."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.config.group, []).append(r)
    return out
