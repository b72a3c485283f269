"""What every Hydra entry point shares: one-line errors, loggers and callbacks from config."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpo_lit.errors import GpoLitError

log = logging.getLogger("gpo_lit")

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def user_error(err: BaseException) -> GpoLitError | None:
    """The GpoLitError behind ``err`` (Hydra wraps errors raised while instantiating)."""
    while err is not None:
        if isinstance(err, GpoLitError):
            return err
        err = err.__cause__ if isinstance(err, InstantiationException) else None
    return None


def report_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a GpoLitError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            found = user_error(err)
            if found is None:
                raise
            print(f"error: {found}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a dict-of-nodes group (loggers, callbacks)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node and "_target_" in node]


def finish_wandb() -> None:
    """Close the W&B run so the next job of a multirun starts its own."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of retrieval metrics, one row per protocol (i2t = image/video → text)."""
    cols = [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")]
    names = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "medr": "MdR", "meanr": "MnR"}
    head = (
        "| protocol | " + " | ".join(f"{c[:3].upper()} {names[c[4:]]}" for c in cols) + " | RSUM |"
    )
    rule = "|---" * (len(cols) + 2) + "|"
    rows = [
        f"| {p} | " + " | ".join(f"{m[c]:.2f}" for c in [*cols, "rsum"]) + " |"
        for p, m in results.items()
    ]
    return "\n".join([head, rule, *rows])


def ensure_new(path: Path) -> None:
    """Refuse to overwrite results: an existing file is never clobbered."""
    if path.exists():
        raise GpoLitError(f"{path}: expected a new file, found an existing one (not overwritten)")


def write_metrics(path: Path, results: dict[str, dict[str, float]]) -> None:
    """Write metrics as JSON; an existing file is never overwritten."""
    ensure_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
