"""What every Hydra entry point shares: one-line errors, loggers and callbacks from config."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

import gpo_lit.resolvers  # noqa: F401 - registers the config resolvers
from gpo_lit.errors import GpoLitError, one_line, user_error
from gpo_lit.files import ensure_new

log = logging.getLogger("gpo_lit")

# The configs ship inside the package (in the repository a link to conf/ at its top).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
# Optional files of a run folder (besides metrics.json): written by gpo_lit.callbacks after
# testing (figures=true, save_ranks=true); make report links the figures.
FIGURE_FILE = "retrieval.png"
RANKS_FILE = "ranks.npz"


def report_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a GpoLitError into one line on stderr and exit status 2 (no traceback), also one
    raised inside a DataLoader worker."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        from gpo_lit.console import print_config_tree, quiet_known_noise

        logging.captureWarnings(True)  # warnings go to the job's log file too
        quiet_known_noise()
        try:
            print_config_tree(cfg)
            return task(cfg)
        except Exception as err:
            from gpo_lit.data.workers import end_workers

            end_workers()  # they ignore the SIGTERM that would end them at exit
            found = user_error(err)
            if found is None:
                raise
            print(f"error: {one_line(found)}", file=sys.stderr)
            sys.exit(2)

    return wrapped


def config_error(config_name: str, argv: list[str]) -> GpoLitError | None:
    """One line for an override that does not compose: a config group option that does not exist
    (``model/pooling=foo``), a key the config does not have (``trainer.max_epoch=5``), any other
    override Hydra refuses (``+`` on an existing key, a malformed override), or a value outside
    :data:`gpo_lit.config_check.RULES` (``data.batch_size=0``), found before Hydra creates or
    writes into the run folder.

    Hydra reports these in several lines; composing the command line's overrides first finds
    them. Anything else (a sweep, other errors) is left to Hydra and to the job itself.
    """
    if any(a in ("-m", "--multirun") or a.startswith("--") for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    from gpo_lit.config_check import check_config

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        missing = str(err.missing_cfg_file or "")
        group, _, value = missing.rpartition("/")
        arg = next((a for a in overrides if a.endswith(f"={value}") and group in a), missing)
        options = ", ".join(err.options or []) or "none"
        return GpoLitError(
            f"{arg}: expected one of the options of {group} ({options}), found '{value}'"
        )
    except (ConfigCompositionException, OverrideParseException) as err:
        return _override_error(err, overrides)
    except Exception:  # noqa: BLE001 - Hydra and the job report everything else themselves
        return None
    try:
        check_config(cfg)
    except GpoLitError as err:
        return err
    return None


def _override_error(err: Exception, overrides: list[str]) -> GpoLitError:
    """One line for an override Hydra could not apply: for a key the config does not have, the
    keys beside it (the closest first) and how to add a new one; else Hydra's own words."""
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    cause = err.__cause__
    key = cause.full_key if isinstance(cause, OmegaConfBaseException) else None
    if key:
        arg = next((a for a in overrides if a.split("=", 1)[0].lstrip("~+") == key), None)
        arg = arg or next((a for a in overrides if a.lstrip("~+").startswith(f"{key}.")), key)
        parent, _, name = key.rpartition(".")
        node = getattr(cause, "parent_node", None)
        keys = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(name, keys, n=3)
        listed = close + [k for k in keys if k not in close]
        shown = ", ".join(listed[:12]) + (", …" if len(listed) > 12 else "")
        where = f"a key of {parent}" if parent else "a top-level key"
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        return GpoLitError(
            f"{arg}: expected {where} ({shown or 'none'}), found '{name}' ({hint}a new key is "
            f"added with +{arg.lstrip('~+')})"
        )
    words = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    arg = next((a for a in overrides if a.split("=", 1)[0].lstrip("~+") in words), None)
    return GpoLitError(f"{arg}: {words}" if arg else words)


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@entry_point("train")``: a Hydra main on ``conf/<config_name>.yaml`` whose user errors,
    unknown group options and bad values included, are one line on stderr with exit status 2,
    and whose run folder is its own (:func:`gpo_lit.run_dir.prepare`)."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        import hydra

        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(
            report_errors(task)
        )

        @functools.wraps(task)
        def main() -> Any:
            from gpo_lit.run_dir import prepare

            err = config_error(config_name, sys.argv[1:])
            if err is None:  # the run folder, before Hydra writes into it (gpo_lit.run_dir)
                try:
                    sys.argv[1:] = prepare(config_name, sys.argv[1:])
                except GpoLitError as refused:
                    err = refused
            if err is not None:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            return hydra_main()

        return main

    return decorate


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


def write_metrics(path: Path, results: dict[str, dict[str, float]]) -> None:
    """Write metrics as JSON; an existing file is never overwritten."""
    ensure_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
