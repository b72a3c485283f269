"""The GPU training-step benchmark keeps working where no GPU is (tiny models, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_train_eval import ENV

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_step_smoke() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_train_step.py"), "--smoke"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| ") and "ms |" in ln]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["wsl_fp32", "wsl_bf16", "wsl_bf16_gc", "region_fp32", "region_bf16"]
    assert all(float(r.split("|")[4]) > 0 for r in rows)  # images/s measured
