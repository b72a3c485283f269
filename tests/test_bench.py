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


def test_pooling_speed_smoke() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pooling_speed.py"), "--smoke"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in res.stdout.splitlines() if ln.startswith("| 1 |")]
    assert len(rows) == 1, res.stdout
    threads, b, n, max_ms, gpo_ms, ratio, max_mem, gpo_mem = (c.strip() for c in rows[0][:8])
    assert (threads, b, n) == ("1", "4", "5")
    assert float(max_ms) > 0 and float(gpo_ms) > 0 and ratio.endswith("x")
    # Saved-for-backward bytes: max keeps about its (masked) input; GPO more than max.
    assert float(max_mem) >= 1.0 and float(gpo_mem) > float(max_mem)
    assert "load average" in res.stdout
