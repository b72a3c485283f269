"""The GPU training-step benchmark keeps working where no GPU is (tiny models, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains five tiny models in a subprocess
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


@pytest.mark.slow  # ~20 s on a loaded 2-core machine (worker processes)
def test_loader_speed_smoke() -> None:
    """Both readers load the same batches; the new one reads about one sample per sample on a
    cold cache, and the file is deleted afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        res = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "loader_speed.py"), "--smoke", "--dir", where],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert list(Path(where).iterdir()) == []  # the feature file is gone
    rows = [
        ln.split("|")[1:-1]
        for ln in res.stdout.splitlines()
        if ln.startswith("| OLD") or ln.startswith("| NEW")
    ]
    seen = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows}
    assert seen == {(n, w, c) for n in ("OLD", "NEW") for w in ("0", "2") for c in ("cold", "hot")}
    assert all(float(r[3]) > 0 for r in rows)  # batches/s measured
    cold_new = [float(r[5]) for r in rows if r[0].strip() == "NEW" and r[2].strip() == "cold"]
    if any(float(r[5]) > 0 for r in rows):  # a file system that counts read_bytes
        assert all(x <= 1.5 + 4096 / (36 * 256 * 4) for x in cold_new), res.stdout


def test_loader_speed_refuses_without_disk() -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loader_speed.py"), "--rows", "10000000000"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error: --dir ") and "GB free" in res.stderr


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
