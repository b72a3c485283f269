"""The built wheel is a whole program: configs inside the package, runnable from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files copied to ``dest``: the build writes its ``build/`` and
    egg-info there, not into the checkout."""
    listed = run(["git", "ls-files", "-z"], ROOT).stdout.split("\0")
    for name in filter(None, listed):
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # src/gpo_lit/conf -> the repository's conf/
            dst.symlink_to(os.readlink(src))
        elif src.is_file():  # a file deleted but not yet committed is skipped
            shutil.copy2(src, dst)
    return dest


@pytest.mark.slow  # builds a wheel and a venv, then trains a few batches (~1 min)
def test_wheel_in_a_fresh_venv_trains_the_demo_from_an_empty_folder(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    in_checkout = [ROOT / "build", ROOT / "src" / "gpo_lit.egg-info"]
    before = {p for p in in_checkout if p.exists()}
    tree = tracked_copy(tmp_path / "tree")
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(wheels), str(tree)],
        cwd=tmp_path,
    )
    assert {p for p in in_checkout if p.exists()} == before  # the build wrote nothing there
    (wheel,) = wheels.glob("gpo_lit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("gpo_lit/conf/") for n in names if n.startswith("gpo_lit/conf/")}
    in_repo = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_repo  # every config, nothing else

    # No PYTHONPATH: the repository's src/ (and its egg-info) must not be seen in the venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        tmp_path,
        env,
    )
    # The dependencies (torch & co.) come from this interpreter's site-packages, added after the
    # install so that pip sees none of them; its editable gpo_lit is not on that path.
    site = Path(
        run(
            [str(py), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run([str(py), "-c", "import gpo_lit; print(gpo_lit.__file__)"], empty, env).stdout
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's copy, not the repo's
    run([str(venv / "bin" / "gpo-train"), "experiment=demo", "debug=fast"], empty, env)
    (metrics,) = (empty / "logs").rglob("metrics.json")
    assert "rsum" in next(iter(json.loads(metrics.read_text()).values()))
    assert (empty / "data" / "demo").is_dir()  # demo data generated under the working folder
