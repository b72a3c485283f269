"""Weights & Biases: one run per job, grouped by sweep, tagged with the Hydra choices.

``conf/logger/wandb.yaml`` builds a plain :class:`~pytorch_lightning.loggers.WandbLogger`;
:func:`instantiate_loggers` fills in what only the running Hydra job knows (group, tags, name and
the resolved config) wherever that file leaves them ``null``, and the run id kept in the run
folder (``wandb-run-id``: a job resumed in place continues its W&B run). The mode comes from ``WANDB_MODE``
(offline unless set), never from ``offline=True``, which leaks into every later run of the
process. The entry point closes the run at the end of each job (:func:`gpo_lit.cli.finish_wandb`)
so that the jobs of a multirun never share one run.
"""

from __future__ import annotations

import os
import secrets
import string
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from gpo_lit.config_dict import config_dict
from gpo_lit.files import write_atomic

MAX_TAG = 64  # W&B rejects longer tags
ID_FILE = "wandb-run-id"  # in the run folder: the id a resumed job continues
SETTINGS = ("group", "tags", "name", "config")


def _hydra_config() -> DictConfig | None:
    """The running job's ``hydra`` node, or None outside a Hydra job (compose API, tests)."""
    from hydra.core.hydra_config import HydraConfig

    return cast(DictConfig, HydraConfig.get()) if HydraConfig.initialized() else None


def _tags(hc: DictConfig) -> list[str]:
    """``group=option`` per Hydra choice (Hydra's own left out) then each job override not
    already there; longer than W&B allows are dropped (they are in the config anyway)."""
    choices = config_dict(hc.runtime.choices, resolve=False)
    tags = [
        f"{k}={v}"
        for k, v in choices.items()
        if v is not None and k != "hydra" and not k.startswith("hydra/")
    ]
    tags += [str(o) for o in hc.overrides.task]
    out: list[str] = []
    for tag in tags:
        if tag not in out and len(tag) <= MAX_TAG:
            out.append(tag)
    return out


def _run_tags(cfg: DictConfig, hc: DictConfig | None) -> list[str]:
    """The run's own ``tags`` first, then :func:`_tags` of the Hydra job; no repeats, none longer
    than W&B allows."""
    tags = [str(t) for t in cfg.get("tags") or []] + (_tags(hc) if hc is not None else [])
    return [t for t in dict.fromkeys(tags) if len(t) <= MAX_TAG]


def wandb_settings_from_hydra(cfg: DictConfig) -> dict[str, Any]:
    """``group``, ``tags``, ``name`` and ``config`` of this job's W&B run.

    - group: the sweep folder's name for a multirun (all jobs of one sweep share it, whatever the
      experiment of each), else the experiment ``name``;
    - tags: the run's ``tags``, then the Hydra choices (``model/pooling=gpo``, …) and the overrides;
    - name: ``<experiment>-<job number>`` in a multirun, else ``<experiment>-<time>``;
    - config: the resolved job config as plain containers.
    """
    from hydra.types import RunMode

    hc = _hydra_config()
    name = str(cfg.get("name") or "run")
    sweep = hc if hc is not None and hc.mode == RunMode.MULTIRUN else None
    if hc is not None:
        name = str(hc.runtime.choices.get("experiment") or name)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return {
        "group": Path(str(sweep.sweep.dir)).name if sweep else str(cfg.get("name") or name),
        "tags": _run_tags(cfg, hc),
        "name": f"{name}-{sweep.job.num}" if sweep else f"{name}-{stamp}",
        "config": config_dict(cfg),
    }


def is_wandb_node(node: Any) -> bool:
    """Whether a ``_target_`` node builds a :class:`WandbLogger` (or a subclass)."""
    from pytorch_lightning.loggers import WandbLogger

    target = node.get("_target_") if node else None
    if not target:
        return False
    try:
        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - a function target or an unimportable one: not ours to judge
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def run_id(run_dir: Path) -> str:
    """The W&B run id of the job in ``run_dir``: read from ``run_dir/wandb-run-id``, or new (and
    written there by rank 0), so that a job resumed in its folder continues the same run."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    path = run_dir / ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # W&B's own ids: 8 characters of [a-z0-9] (its generator is not public API)
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if getattr(rank_zero_only, "rank", 0) == 0:  # set by Lightning at import
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"{new}\n".encode())
    return new


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """Every logger of ``cfg.logger``; a W&B logger gets the settings of
    :func:`wandb_settings_from_hydra` for each of ``group``/``tags``/``name``/``config`` that its
    node leaves ``null`` or out (a value set in the node wins).

    A W&B node is built by calling its class with the resolved node as keyword arguments (the
    config holds ``_target_`` nodes that ``hydra.utils.instantiate`` would build, and ``config``
    is the name of instantiate's own first argument).
    """
    group = cfg.get("logger")
    if not group:
        return []
    loggers = []
    for node in group.values():
        if not node or "_target_" not in node:
            continue
        if not is_wandb_node(node):
            loggers.append(instantiate(node))
            continue
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs = config_dict(node)
        settings = wandb_settings_from_hydra(cfg)
        kwargs.update({k: settings[k] for k in SETTINGS if kwargs.get(k) is None})
        if kwargs.get("id") is None and kwargs.get("save_dir"):
            kwargs["id"] = run_id(Path(kwargs["save_dir"]))
            kwargs.setdefault("resume", "allow")  # a resumed job continues its run
        cls = get_class(kwargs.pop("_target_"))
        loggers.append(cls(**{k: v for k, v in kwargs.items() if not k.startswith("_")}))
    return loggers


def wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's W&B loggers (empty when none is attached or wandb is not installed)."""
    try:
        from pytorch_lightning.loggers import WandbLogger
    except ImportError:  # pragma: no cover - ships with pytorch_lightning
        return []
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, WandbLogger)]


def log_final_summary(trainer: Any, results: dict[str, dict[str, float]]) -> None:
    """Put the final test metrics in the run summary as ``test/<protocol>/<metric>`` (full
    precision: the logged history holds float32), with the checkpoint they came from."""
    if not results or not getattr(trainer, "is_global_zero", True):
        return
    summary: dict[str, Any] = {
        f"test/{protocol}/{metric}": float(value)
        for protocol, metrics in results.items()
        for metric, value in metrics.items()
    }
    best = getattr(getattr(trainer, "checkpoint_callback", None), "best_model_path", None)
    if best:
        summary["test/checkpoint"] = str(best)
    for logger in wandb_loggers(trainer):
        logger.experiment.summary.update(summary)
