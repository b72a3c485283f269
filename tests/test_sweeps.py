"""Sweep and cluster configs compose into what the launchers and Lightning need."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import compose_train
from omegaconf import OmegaConf


def test_slurm_job_matches_lightning_devices() -> None:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train(
        "experiment=demo",
        "cluster=slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        "+hydra.launcher.additional_parameters.account=vision",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.additional_parameters.account == "vision"
    HydraConfig.instance().set_config(cfg)  # what a launched job sees
    try:
        assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")
    finally:
        HydraConfig.instance().cfg = None  # global state: leave none for later tests
    plugins = [p._target_ for p in cfg.trainer.plugins]
    assert "lightning_fabric.plugins.environments.SLURMEnvironment" in plugins
    assert "gpo_lit.checkpoint_io.AtomicCheckpointIO" in plugins
    # The requeue signal is gpo_lit's (StopOnSignal), not Lightning's: submitit asks for SIGUSR2.
    import signal

    from hydra.utils import instantiate

    node = next(p for p in cfg.trainer.plugins if p._target_.endswith("SLURMEnvironment"))
    env = instantiate(node)
    assert not env.auto_requeue and env.requeue_signal == signal.SIGUSR2


@pytest.mark.slow  # a subprocess (the train entry point's wiring is test_train_eval's)
def test_cfg_hydra_prints_the_slurm_job() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpo_lit.train",
            "experiment=demo",
            "cluster=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "--cfg",
            "hydra",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    launcher = OmegaConf.create(res.stdout).hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)


@pytest.mark.parametrize(
    ("sweep", "key", "n_values"),
    [
        ("pooling", "model/pooling@model.visual_pooling", 4),
        ("kmax_grid", "model.visual_pooling.k", 6),
        ("zoo", "model/pooling@model.visual_pooling", 12),
    ],
)
def test_sweeps_compose(sweep: str, key: str, n_values: int) -> None:
    cfg = compose_train("experiment=demo", f"+sweep={sweep}")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert len(str(cfg.hydra.sweeper.params[key]).split(",")) == n_values
    if sweep == "kmax_grid":
        assert cfg.model.visual_pooling.name == cfg.model.text_pooling.name == "kmax"
    if sweep == "zoo":
        from gpo_lit.pooling import available_poolings

        names = set(str(cfg.hydra.sweeper.params[key]).split(","))
        assert names <= set(available_poolings())
