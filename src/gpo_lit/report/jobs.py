"""Collecting a sweep: every job folder (``.hydra/`` + ``metrics.json``) read into a :class:`Job`,
and what the sweep as a whole says (its tags, shared overrides, an Optuna search's result)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpo_lit.config_dict import config_dict
from gpo_lit.errors import GpoLitError


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
        return select(self.config, "seed")

    @property
    def key(self) -> tuple[str, ...]:
        """The configuration: overrides minus ``seed``, sorted."""
        return tuple(sorted(o for o in self.overrides if override_key(o) != "seed"))


def override_key(override: str) -> str:
    """``+model/pooling@model.visual_pooling=kmax`` -> ``model/pooling@model.visual_pooling``."""
    return override.split("=", 1)[0].lstrip("+~")


def natural(text: str) -> list[Any]:
    """Sort key putting ``2`` before ``10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def fmt_value(value: Any) -> str:
    """A config value for people (floats without trailing zeros)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def select(cfg: DictConfig | None, key: str, default: Any = None) -> Any:
    """``cfg.<key>`` as plain Python (interpolations resolved when possible, else left as text)."""
    if cfg is None:
        return default
    try:
        value = OmegaConf.select(cfg, key, default=default)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: fall back to its text
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        try:
            raw = node._get_node(leaf)  # noqa: SLF001
            if raw is None:
                return default
            value = raw._value()  # noqa: SLF001 - the raw ``${...}`` text
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
    return sorted(found, key=lambda p: natural(str(p.relative_to(sweep_dir))))


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


def best_checkpoint(job: Job) -> Path | None:
    """The job's best checkpoint: the last ``checkpoints/best*.ckpt`` in natural order."""
    found = sorted((job.path / "checkpoints").glob("best*.ckpt"), key=lambda p: natural(p.name))
    return found[-1] if found else None


def sweep_tags(jobs: Sequence[Job]) -> list[str]:
    """The ``tags`` of the sweep's jobs (their run configs), each once, in order of appearance."""
    tags: dict[str, None] = {}
    for job in jobs:
        value = select(job.config, "tags") or []
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
        found = config_dict(OmegaConf.load(path), resolve=False)
        value, params = float(found["best_value"]), found["best_params"]
    except Exception as err:  # noqa: BLE001 - a note, not a reason to stop the report
        return f"{path.name}: unreadable ({type(err).__name__})"
    shown = ", ".join(f"`{k}={fmt_value(v)}`" for k, v in params.items())
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
