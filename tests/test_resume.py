"""A run killed or terminated mid-epoch resumes from its last checkpoint and ends with identical
metrics and an identical CSV history, its original run records untouched."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SMALL, TESTS_ENV, one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
# 600 pairs / 32 = 18 batches per epoch. Step 26 is epoch 1, batch 8, two steps after the last
# step checkpoint (24); step 19 is epoch 1, batch 1, after epoch 0's validation and its best
# checkpoint, three steps after the last step checkpoint (16): the resumed run validates again.
AT = 26
KILL_AT = 19


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def records(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted run, and the data folder every run shares."""
    tmp = tmp_path_factory.mktemp("straight")
    data = f"paths.data_dir={tmp / 'data'}"
    res = run("gpo_lit.train", *SMALL, data, f"hydra.run.dir={tmp / 'run'}", cwd=tmp, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run", data


def assert_same_run(resumed: Path, straight: Path) -> None:
    assert (resumed / "metrics.json").read_bytes() == (straight / "metrics.json").read_bytes()
    got, want = rows(resumed), rows(straight)
    assert got == want  # every step exactly once, in order, with the same values
    assert len({r["step"] for r in want}) > 2 * 18  # one row per step at least


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path: Path, straight) -> None:
    ref, data = straight
    killed = tmp_path / "killed"
    args = [
        *SMALL,
        data,
        "+callbacks.kill._target_=tests.killer.KillAtStep",
        f"+callbacks.kill.step={KILL_AT}",
    ]
    res = run("gpo_lit.train", *args, f"hydra.run.dir={killed}", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == -9 and not (killed / "metrics.json").exists()
    assert (killed / "checkpoints" / "last.ckpt").is_file()
    # Rows past the checkpoint (global step 16 = logging step 15) were written before the kill:
    # the resume drops them, as it logs those steps again.
    assert max(int(r["step"]) for r in rows(killed)) > 15
    original = records(killed)

    res = run(
        "gpo_lit.train",
        *args,
        f"hydra.run.dir={killed}",
        "ckpt_path=last",
        cwd=tmp_path,
        env=TESTS_ENV,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(killed, ref)
    # epoch 0's best checkpoint, saved again by the resumed run, replaced (not best-…-v1.ckpt)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == sorted(
        p.name for p in (ref / "checkpoints").iterdir()
    )
    assert records(killed) == original  # the original .hydra/ is kept …
    resume = (killed / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert "ckpt_path=last" in resume  # … and the resume recorded beside it


# The visual pooling a Transformer with dropout 0.1: the model draws from the global torch RNG
# every training step (as dropout in BERT, grid size augmentation, image mixing do).
DROPOUT = [*SMALL, "+model/pooling@model.visual_pooling=temporal_transformer"]


@pytest.fixture(scope="module")
def straight_dropout(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("straight_dropout")
    data = f"paths.data_dir={tmp / 'data'}"
    res = run(
        "gpo_lit.train", *DROPOUT, data, f"hydra.run.dir={tmp / 'run'}", cwd=tmp, env=TESTS_ENV
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run", data


@pytest.mark.slow
def test_killed_run_drawing_random_numbers_resumes_to_identical_metrics(
    tmp_path: Path, straight_dropout
) -> None:
    """The random state travels in the checkpoint: the steps resumed draw the dropout masks the
    uninterrupted run drew. Every 9 steps on 18-batch epochs, killed at step 20: step 18, the
    last batch of epoch 0, is no checkpoint (Lightning would resume it without epoch 0's
    validation and stop there), so the run resumes mid-epoch from step 9."""
    ref, data = straight_dropout
    killed = tmp_path / "killed"
    args = [
        *DROPOUT,
        data,
        "callbacks.last_checkpoint.every_n_train_steps=9",
        "+callbacks.kill._target_=tests.killer.KillAtStep",
        "+callbacks.kill.step=20",
        f"hydra.run.dir={killed}",
    ]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == -9
    last = killed / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 9
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(killed, ref)


@pytest.mark.slow
def test_sigterm_at_an_epochs_last_batch_stops_after_the_next_step(tmp_path: Path, straight):
    """The epoch's validation runs first; the checkpoint after it resumes to identical metrics."""
    ref, data = straight
    term = tmp_path / "term"
    args = [
        *SMALL,
        data,
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        "+callbacks.kill.step=18",  # epoch 0's last batch
        f"hydra.run.dir={term}",
    ]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 143, res.stderr[-3000:]
    saved = torch.load(term / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 19
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(term, ref)


@pytest.mark.slow
def test_sigterm_saves_at_the_signal_and_prints_the_resume_command(
    tmp_path: Path, straight
) -> None:
    ref, data = straight
    wb = tmp_path / "wandb_home"
    env = {
        **TESTS_ENV,
        "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(wb / "cache"),
        "WANDB_DATA_DIR": str(wb / "data"),
        "WANDB_CONFIG_DIR": str(wb / "config"),
        "WANDB_SILENT": "true",
    }
    term = tmp_path / "term"
    cmd = [
        sys.executable,
        "-m",
        "gpo_lit.train",
        *SMALL,
        data,
        "logger=wandb_csv",
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={AT}",
        f"hydra.run.dir={term}",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 143, res.stderr[-3000:]
    assert not (term / "metrics.json").exists()
    saved = torch.load(term / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == AT  # saved at the signal, not at the last step checkpoint
    last = [line for line in res.stderr.splitlines() if line.strip()][-1]
    prefix = f"stopped by SIGTERM: {term / 'checkpoints' / 'last.ckpt'} saved at step {AT}; "
    assert last.startswith(prefix + "resume with: make train EXP=demo ")
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[-2:] == [f"hydra.run.dir={term}", "ckpt_path=last"]
    original = records(term)

    # The printed command itself, through the Makefile.
    res = subprocess.run(
        [*command[:2], "-C", str(ROOT), *command[2:], f"PY={sys.executable}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(term, ref)
    assert records(term) == original
    # W&B: the resumed job continued the same run (its id is kept in the run folder).
    run_id = (term / "wandb-run-id").read_text().strip()
    parts = sorted((term / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "step", "saved"),
    [
        ("validation", 18, 19),  # epoch 0's validation finishes, the next step is saved
        ("test", 0, 36),  # training is over: last.ckpt was saved at its end
    ],
)
def test_sigterm_while_evaluating_stops_at_a_resumable_point(
    tmp_path: Path, straight, stage: str, step: int, saved: int
) -> None:
    ref, data = straight
    folder = tmp_path / stage
    args = [
        *SMALL,
        data,
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.stage={stage}",
    ]
    res = run("gpo_lit.train", *args, f"hydra.run.dir={folder}", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 143, res.stderr[-3000:]
    assert "resume with: make train EXP=demo" in res.stderr
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == saved and not (folder / "metrics.json").exists()
    res = run(
        "gpo_lit.train",
        *args,
        f"hydra.run.dir={folder}",
        "ckpt_path=last",
        cwd=tmp_path,
        env=TESTS_ENV,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(folder, ref)


@pytest.mark.slow
def test_continuing_from_a_checkpoint_file_checks_its_stored_config(
    tmp_path: Path, straight
) -> None:
    ref, data = straight
    last = ref / "checkpoints" / "last.ckpt"  # saved when training ended
    before = {p.relative_to(ref): p.read_bytes() for p in ref.rglob("*") if p.is_file()}
    changed = tmp_path / "changed"
    args = [*SMALL, data, f"ckpt_path={last}"]
    res = run(
        "gpo_lit.train", *args, "seed=5", f"hydra.run.dir={changed}", cwd=tmp_path, env=TESTS_ENV
    )
    msg = one_line_error(res)
    assert msg.startswith(f"error: ckpt_path={last}: expected the configuration it was saved with")
    assert "seed (0 → 5)" in msg and "output_dir" not in msg and "dirpath" not in msg
    assert not (changed / "metrics.json").exists()
    # The same configuration in a new folder: training is over, the test reproduces the run's.
    same = tmp_path / "same"
    res = run("gpo_lit.train", *args, f"hydra.run.dir={same}", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (same / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    assert {p.relative_to(ref): p.read_bytes() for p in ref.rglob("*") if p.is_file()} == before


def test_sigterm_handling_stays_lightnings_under_slurm_requeue() -> None:
    """cluster=slurm: SIGUSR2 checkpoints and requeues (Lightning's SLURM path, untouched)."""
    import signal

    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from gpo_lit.resume import StopOnSigterm

    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    requeue = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR2)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopOnSigterm("last.ckpt")
        stop.on_train_start(pl.Trainer(plugins=[requeue], **kw), None)
        assert signal.getsignal(signal.SIGTERM) is previous
        stop.on_train_start(pl.Trainer(**kw), None)
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
    finally:
        signal.signal(signal.SIGTERM, previous)
