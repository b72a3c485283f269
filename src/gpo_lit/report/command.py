"""The ``report`` entry point (``python -m gpo_lit.report``, ``gpo-report``, ``make report``): a
Hydra main on ``conf/report.yaml`` whose run folder is the report folder itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpo_lit.cli import entry_point
from gpo_lit.errors import GpoLitError
from gpo_lit.modalities import MODALITIES
from gpo_lit.report.build import build_report, check_new, write_report


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
