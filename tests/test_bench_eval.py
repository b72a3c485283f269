"""``bench/eval_speed.py`` runs end to end at toy sizes, (e) the at-scale memory probe included."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, LOAD_AVERAGE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes (each imports torch): ~40 s on a loaded 2-core machine
def test_eval_speed_small_with_memory_probe() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--n-img", "40", "--dim", "16"]
    cmd += ["--naive-img", "10", "--naive-cap", "20", "--repeats", "1", "--threads", "1"]
    cmd += ["--no-memory"]  # the per-method peaks: same child mechanism as (e)
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "check ours == naive on the subset: float64 OK" in res.stdout
    # (e) runs 5x the images (5 captions each, as above), in a fresh process
    m = re.search(
        r"\(e\) retrieval_ranks on 200 images x 1000 captions: .* peak (\d+) MiB", res.stdout
    )
    assert m and 0 <= int(m.group(1)) < 1024, res.stdout[-2000:]
    assert len(LOAD_AVERAGE.findall(res.stdout)) == 2  # with the data, with (e)
