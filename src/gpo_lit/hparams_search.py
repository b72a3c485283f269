"""Search spaces that Hydra's Optuna sweeper cannot say in ``params`` alone (conditional ones).

``conf/hparams_search/pooling_optuna.yaml`` names :func:`gpo_temperature` as the sweeper's
``custom_search_space``: it runs once per trial, after the trial's ``params`` are drawn.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

MODALITIES = ("visual", "text")


def _pooling_name(cfg: DictConfig, trial: Any, modality: str) -> str | None:
    """The pooling a trial gives ``modality``: drawn, fixed on the command line, or the config's."""
    key = f"model/pooling@model.{modality}_pooling"
    if key in trial.params:
        return str(trial.params[key])
    if key in trial.user_attrs:
        return str(trial.user_attrs[key])
    return OmegaConf.select(cfg, f"model.{modality}_pooling.name")


def gpo_temperature(cfg: DictConfig, trial: Any) -> None:
    """Draw ``model.<modality>_pooling.temperature`` (log-uniform in ``search.gpo_temperature``)
    for each modality whose pooling in this trial is GPO; other poolings have no temperature."""
    low, high = (float(v) for v in OmegaConf.select(cfg, "search.gpo_temperature"))
    for modality in MODALITIES:
        if _pooling_name(cfg, trial, modality) == "gpo":
            trial.suggest_float(f"model.{modality}_pooling.temperature", low, high, log=True)
