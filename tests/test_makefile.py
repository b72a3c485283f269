"""The Makefile passes every value as one word, exactly as typed: no shell injection, paths with
spaces or commas are one path, ensembles have their own variable (CKPTS)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, one_line_error, save_native, spread_model

from gpo_lit.data.demo.regions import generate_demo

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, cwd: Path, py: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args, f"PY={py}"],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture()
def argv_of(tmp_path: Path):
    """``argv_of(target, *vars)``: the arguments the target gives Python, as Python sees them."""
    echo = tmp_path / "echo.py"
    echo.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")

    def argv(*args: str) -> list[str]:
        res = make(*args, cwd=tmp_path, py=f"{sys.executable} {echo}")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    return argv


def test_values_reach_python_as_typed(argv_of, tmp_path: Path) -> None:
    assert argv_of("eval", "CKPT=x; touch inj") == ["-m", "gpo_lit.eval", "ckpt='x; touch inj'"]
    assert argv_of("eval", "CKPT=/a b/it's,1.ckpt", "split=dev", "protocols=[coco_1k,coco_5k]") == [
        "-m",
        "gpo_lit.eval",
        "ckpt='/a b/it\\'s,1.ckpt'",  # a Hydra string: one path, not a list
        "protocols=[coco_1k,coco_5k]",
        "split=dev",
    ]
    assert argv_of("eval", "CKPTS=a.ckpt b,c.ckpt") == [
        "-m",
        "gpo_lit.eval",
        "ckpt=['a.ckpt','b,c.ckpt']",
    ]
    assert argv_of("train", "data.root=/my data", "+model/pooling@model.visual_pooling=kmax") == [
        "-m",
        "gpo_lit.train",
        "experiment=demo",
        "+model/pooling@model.visual_pooling=kmax",
        "data.root=/my data",
    ]
    assert argv_of("train", "EXP=demo; touch inj", "w=$(shell touch inj)")[2:] == [
        "experiment=demo; touch inj",
        "w=$(shell touch inj)",
    ]
    assert argv_of("features")[2:] == ["experiment=demo_grid"]
    assert argv_of("sweep", "SWEEP=zoo")[2:] == ["-m", "experiment=demo", "+sweep=zoo"]
    assert argv_of("report", "SWEEP_DIR=logs/a,b")[2:] == ["sweep_dir='logs/a,b'"]
    assert not list(ROOT.glob("inj")) and not list(tmp_path.glob("inj"))


@pytest.mark.slow
def test_injected_command_is_not_run(tmp_path: Path) -> None:
    res = make("eval", "CKPT=x; touch inj", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "x; touch inj" in lines[0], res.stderr[-2000:]
    assert not (ROOT / "inj").exists() and not (tmp_path / "inj").exists()


@pytest.mark.slow
def test_a_checkpoint_path_with_a_space_and_a_comma_is_one_checkpoint(tmp_path: Path) -> None:
    data = generate_demo(tmp_path / "demo", n_train=40, n_dev=20, n_test=60, feat_dim=6)
    folder = tmp_path / "my runs"
    folder.mkdir()
    ckpt = save_native(spread_model(1), folder / "best,v1.ckpt", data)
    out = tmp_path / "eval"
    res = make("eval", f"CKPT={ckpt}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Test metrics of {ckpt} on split 'test'" in res.stdout
    assert "ensemble" not in res.stdout and not (out / "member0").exists()
    assert json.loads((out / "metrics.json").read_text())["full"]["rsum"] >= 0
    # A missing one is one line naming that one path.
    res = make(
        "eval",
        f"CKPT={folder / 'missing,v2.ckpt'}",
        f"hydra.run.dir={tmp_path / 'e2'}",
        cwd=tmp_path,
    )
    assert "missing,v2.ckpt" in one_line_error_of_make(res)


def one_line_error_of_make(res: subprocess.CompletedProcess) -> str:
    """make reports the failed recipe itself (``make: *** … Error 2``); gpo_lit's one line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("make")]
    fake = subprocess.CompletedProcess(res.args, 2, res.stdout, "\n".join(lines))
    return one_line_error(fake)
