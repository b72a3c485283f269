"""A run killed mid-epoch resumes from its last checkpoint and ends with identical metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_train_eval import ENV, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "experiment=demo",
    "++data.demo.n_train=120",
    "++data.demo.n_dev=40",
    "++data.demo.n_test=60",
    "data.batch_size=32",
    "data.eval_batch_size=60",
    "trainer.max_epochs=2",
    "callbacks.last_checkpoint.every_n_train_steps=4",
]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path: Path) -> None:
    os.environ.setdefault("PYTHONPATH", "")
    ENV["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ENV.get('PYTHONPATH', '')}"
    data = f"paths.data_dir={tmp_path / 'data'}"
    # 600 pairs / 32 = 18 batches per epoch; the kill lands at step 26 (epoch 1, batch 8),
    # two steps after the last checkpoint (step 24).
    straight = tmp_path / "straight"
    res = run("gpo_lit.train", *SMALL, data, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    killed = tmp_path / "killed"
    res = run(
        "gpo_lit.train",
        *SMALL,
        data,
        f"hydra.run.dir={killed}",
        "+callbacks.kill._target_=tests.killer.KillAtStep",
        "+callbacks.kill.step=26",
        cwd=tmp_path,
    )
    assert res.returncode != 0 and not (killed / "metrics.json").exists()
    assert (killed / "checkpoints" / "last.ckpt").is_file()

    res = run(
        "gpo_lit.train", *SMALL, data, f"hydra.run.dir={killed}", "ckpt_path=last", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed == json.loads((straight / "metrics.json").read_text())
