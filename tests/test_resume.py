"""A run killed or terminated mid-epoch resumes from its last checkpoint and ends with identical
metrics and an identical CSV history, its original run records untouched."""

from __future__ import annotations

import csv
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import SMALL, TESTS_ENV, one_line_error, run, train_here
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from gpo_lit.resume import StopOnSignal, TrainingInterrupted, requeue_job
from gpo_lit.run_dir import requeued_job

ROOT = Path(__file__).resolve().parents[1]
# 600 pairs / 32 = 18 batches per epoch. Step 26 is epoch 1, batch 8, two steps after the last
# step checkpoint (24); step 19 is epoch 1, batch 1, after epoch 0's validation and its best
# checkpoint, three steps after the last step checkpoint (16): the resumed run validates again.
AT = 26
KILL_AT = 19


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def saved_step(run_dir: Path) -> int:
    """The global step a run's last.ckpt holds."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"]


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
    assert saved_step(killed) == 9
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(killed, ref)


@pytest.mark.slow
def test_continuing_from_an_epochs_best_checkpoint_draws_the_same_random_numbers(
    tmp_path: Path, straight_dropout
) -> None:
    """The best checkpoint is written during validation (epoch 0's), its random state with it:
    continued in a new folder, epoch 1 draws the uninterrupted run's dropout masks."""
    ref, data = straight_dropout
    killed, cont = tmp_path / "killed", tmp_path / "cont"
    kill = ["+callbacks.kill._target_=tests.killer.KillAtStep", "+callbacks.kill.step=19"]
    res = run(
        "gpo_lit.train",
        *DROPOUT,
        data,
        *kill,
        f"hydra.run.dir={killed}",
        cwd=tmp_path,
        env=TESTS_ENV,
    )
    assert res.returncode == -9
    best = killed / "checkpoints" / "best-epoch000.ckpt"
    args = [*DROPOUT, data, f"ckpt_path={best}", "resume_changes=allow", f"hydra.run.dir={cont}"]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)  # allow: no kill callback
    assert res.returncode == 0, res.stderr[-3000:]
    assert (cont / "metrics.json").read_bytes() == (ref / "metrics.json").read_bytes()
    assert rows(cont) == [r for r in rows(ref) if int(r["step"]) >= 18]  # from epoch 1 on


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
    assert saved_step(term) == 19
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
    assert saved_step(term) == AT  # saved at the signal, not at the last step checkpoint
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
def test_a_seed_null_run_resumes_with_its_own_overrides(tmp_path: Path, straight) -> None:
    """seed=null draws a seed and stores it; the printed resume command repeats seed=null,
    which takes that seed again (it used to be refused as a changed configuration)."""
    _, data = straight
    folder = tmp_path / "drawn"
    args = [
        *SMALL,
        data,
        "seed=null",
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={AT}",
        f"hydra.run.dir={folder}",
    ]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 143, res.stderr[-3000:]
    assert "seed=null" in res.stderr.strip().splitlines()[-1]  # in the resume command
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    seed = OmegaConf.load(folder / ".hydra" / "config.yaml").seed
    last = folder / "checkpoints" / "last.ckpt"
    assert f"seed=null: seed {seed} (from {last})" in (folder / "train.log").read_text()


@pytest.mark.slow
def test_one_ranks_signal_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """2 gloo ranks (trainer=ddp on the CPU), SIGTERM to rank 1 alone at step 10: both ranks
    agree (one collective per step), last.ckpt holds step 10, and the resume on 2 ranks ends
    with the uninterrupted 2-rank run's metrics and CSV."""
    ddp = [*SMALL, f"paths.data_dir={tmp_path / 'data'}", "trainer=ddp", "trainer.accelerator=cpu"]
    ddp.append("trainer.devices=2")
    ref, folder = tmp_path / "straight", tmp_path / "rank1"
    res = run("gpo_lit.train", *ddp, f"hydra.run.dir={ref}", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    kill = ["+callbacks.kill._target_=tests.killer.SignalAtStep", "+callbacks.kill.step=10"]
    args = [*ddp, *kill, "+callbacks.kill.rank=1", f"hydra.run.dir={folder}"]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 143, res.stderr[-3000:]
    assert saved_step(folder) == 10
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(folder, ref)


@pytest.mark.slow
def test_ctrl_c_says_which_checkpoint_resumes_and_how(tmp_path: Path, straight) -> None:
    """Ctrl-C (SIGINT) stops at once, as Lightning does (exit status 1), then names the last
    periodic checkpoint and the resume command; that resume ends as the uninterrupted run."""
    ref, data = straight
    folder = tmp_path / "ctrl_c"
    args = [
        *SMALL,
        data,
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={AT}",
        "+callbacks.kill.signum=SIGINT",
        f"hydra.run.dir={folder}",
    ]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 1, res.stderr[-3000:]
    last = folder / "checkpoints" / "last.ckpt"
    final = [line for line in res.stderr.splitlines() if line.strip()][-1]
    step = AT - AT % 4  # every 4 steps
    assert final.startswith(f"interrupted (Ctrl-C): {last} holds step {step}; resume with: make ")
    assert shlex.split(final)[-2:] == [f"hydra.run.dir={folder}", "ckpt_path=last"]
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(folder, ref)


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path) -> None:
    from gpo_lit.train import interrupted_message

    assert interrupted_message(tmp_path) == (
        "interrupted (Ctrl-C) before the first checkpoint: nothing to resume"
    )


@pytest.mark.slow
def test_a_signal_to_every_process_with_loader_workers_still_saves_and_resumes(
    tmp_path: Path, straight
) -> None:
    """scancel and preemptions signal every process of the job, the DataLoader workers too:
    they ignore it (they used to exit and take the run with them, unsaved), the run saves at
    the signal and resumes, with its 2 workers, to the uninterrupted run's metrics."""
    ref, data = straight
    folder = tmp_path / "group"
    args = [
        *SMALL,
        data,
        "data.num_workers=2",
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={AT}",
        "+callbacks.kill.group=true",
        f"hydra.run.dir={folder}",
    ]
    cmd = [sys.executable, "-m", "gpo_lit.train", *args]
    res = subprocess.run(
        cmd, cwd=tmp_path, env=TESTS_ENV, capture_output=True, text=True, timeout=600,
        start_new_session=True,  # its own process group: the signal reaches nothing else
    )  # fmt: skip
    assert res.returncode == 143, res.stderr[-3000:]
    assert saved_step(folder) == AT
    res = run("gpo_lit.train", *args, "ckpt_path=last", cwd=tmp_path, env=TESTS_ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(folder, ref)


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
    assert saved_step(folder) == saved and not (folder / "metrics.json").exists()
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


def test_sigterm_handling_stays_lightnings_under_its_slurm_auto_requeue() -> None:
    """A SLURM environment with Lightning's auto_requeue: its handlers, untouched."""
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    requeue = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR2)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)
    try:
        stop = StopOnSignal("last.ckpt")
        stop.on_train_start(pl.Trainer(plugins=[requeue], **kw), None)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR2)) == previous
        stop.on_train_start(pl.Trainer(**kw), None)
        assert signal.getsignal(signal.SIGTERM) == stop._on_signal
        assert signal.getsignal(signal.SIGUSR2) == previous[1]  # no requeue signal outside SLURM
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGUSR2, previous[1])


# What SLURM sets in the one task of a one-node job (cluster=slurm's Lightning environment).
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "gpo-test",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
    "SLURM_JOB_NODELIST": "localhost",
}
# cluster=slurm's trainer plugins (its GPU and launcher settings aside).
SLURM_PLUGINS = (
    "trainer.plugins=[{_target_:gpo_lit.checkpoint_io.AtomicCheckpointIO},"
    "{_target_:lightning_fabric.plugins.environments.SLURMEnvironment,auto_requeue:false,"
    "requeue_signal:{_target_:signal.Signals,_args_:[12]}}]"
)


def fake_scontrol(folder: Path) -> tuple[str, Path]:
    """A ``PATH`` whose ``scontrol`` appends its arguments to a log (exit status 0), and the log."""
    bin_dir, log = folder / "bin", folder / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\n')
    scontrol.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", log


def test_requeue_signal_is_listened_to_and_chains_to_the_handler_before_it(monkeypatch) -> None:
    """cluster=slurm: the requeue signal only sets a flag; at the stop, the handler it had
    before (submitit's) runs once, its exit caught, and the run stops with 128 + SIGUSR2."""
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    env = SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGUSR2)
    calls = []

    def submitit_like(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # what submitit does once it has requeued

    previous = signal.getsignal(signal.SIGTERM), signal.signal(signal.SIGUSR2, submitit_like)
    try:
        trainer = pl.Trainer(plugins=[env], **kw)
        stop = StopOnSignal("last.ckpt")
        stop.on_train_start(trainer, None)
        stop.on_test_start(trainer, None)  # a second stage: still chains to submitit's
        assert signal.getsignal(signal.SIGUSR2) == stop._on_signal
        assert stop.previous is submitit_like and stop._agreed(trainer) is None
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [] and stop._agreed(trainer) == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop._agreed(trainer) == signal.SIGUSR2  # the requeue comes first
        stop.stopping = stop._agreed(trainer)
        with pytest.raises(TrainingInterrupted) as stopped:
            stop._stop(trainer)
        assert calls == [signal.SIGUSR2] and stopped.value.code == 128 + signal.SIGUSR2
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGUSR2, previous[1])


@pytest.mark.parametrize(
    ("array", "job"),
    [({}, "4242"), ({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}, "77_3")],
)
def test_requeue_without_submitit_runs_scontrol(tmp_path, monkeypatch, array, job) -> None:
    path, log = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", path)
    for key, value in {**SLURM_TASK, **array}.items():
        monkeypatch.setenv(key, value)
    requeue_job()
    assert log.read_text().split() == ["requeue", job]


def test_a_failed_requeue_is_one_warning(tmp_path, monkeypatch, caplog) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with caplog.at_level(logging.WARNING, logger="gpo_lit.resume"):
        requeue_job()
    assert [r.getMessage() for r in caplog.records] == [
        "not requeued: scontrol requeue 4242 failed: Invalid job id specified"
    ]


@pytest.mark.parametrize(
    ("env", "requeued"),
    [
        ({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, True),
        ({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}, False),
        ({"SLURM_JOB_ID": "4242"}, False),
        ({"SLURM_RESTART_COUNT": "2"}, False),  # not in a SLURM job
    ],
)
def test_requeued_job_is_read_from_slurms_restart_count(monkeypatch, env, requeued) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert requeued_job() is requeued


def test_any_ranks_signal_stops_every_rank_and_the_requeue_comes_first() -> None:
    """Under DDP the flags are summed over the ranks in one collective (here: two ranks, the
    other one's flags added by a stand-in for the strategy's reduce)."""
    from types import SimpleNamespace

    def trainer_beside(other: list[int]):
        reduce = lambda t, reduce_op: t + torch.tensor(other, dtype=t.dtype)  # noqa: E731
        strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
        return SimpleNamespace(world_size=2, strategy=strategy)

    stop = StopOnSignal("last.ckpt")
    stop.received[signal.SIGUSR2] = False  # what listening under cluster=slurm adds
    assert stop._agreed(trainer_beside([0, 0])) is None
    assert stop._agreed(trainer_beside([0, 1])) == signal.SIGTERM  # order: SIGUSR2, SIGTERM
    assert stop._agreed(trainer_beside([1, 1])) == signal.SIGUSR2
    stop.received[signal.SIGTERM] = True
    assert stop._agreed(trainer_beside([1, 0])) == signal.SIGUSR2


def test_a_requeued_job_without_ckpt_path_resumes_from_its_last_checkpoint(
    tmp_path, monkeypatch
) -> None:
    """Under submitit the requeued job is Hydra's task run again (no entry point before it):
    ckpt_path=null, SLURM_RESTART_COUNT=1: this run's last.ckpt, if it saved one."""
    from omegaconf import OmegaConf

    from gpo_lit.train import resume_path

    cfg = OmegaConf.create({"ckpt_path": None})
    last = tmp_path / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_path(cfg, tmp_path) is None  # requeued before its first save: afresh
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_path(cfg, tmp_path) == str(last)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_path(cfg, tmp_path) is None  # the job's first run: a new run


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(
    tmp_path: Path, straight, monkeypatch
) -> None:
    """cluster=slurm under submitit, SIGUSR2 at step 26: last.ckpt saved at that step, submitit
    checkpoints its job and requeues it (scontrol), the run stops. SLURM runs the job again
    (SLURM_RESTART_COUNT=1) and it resumes to the uninterrupted run's metrics, both ways: as
    Hydra's submitit launcher runs it (the training task alone, in this process) and as an
    sbatch script's command line (the entry point)."""
    ref, data = straight
    folder = tmp_path / "job"
    path, log = fake_scontrol(tmp_path)
    env = {**TESTS_ENV, **SLURM_TASK, "PATH": path}
    args = [
        *SMALL,
        data,
        SLURM_PLUGINS,
        "+callbacks.submitit._target_=tests.killer.SubmititSignals",
        f"+callbacks.submitit.folder={tmp_path / 'submitit'}",
        "+callbacks.kill._target_=tests.killer.SignalAtStep",
        f"+callbacks.kill.step={AT}",
        "+callbacks.kill.signum=SIGUSR2",
        f"hydra.run.dir={folder}",
    ]
    res = run("gpo_lit.train", *args, cwd=tmp_path, env=env)
    assert res.returncode == 128 + signal.SIGUSR2, res.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "submitit" / "4242_submitted.pkl").is_file()  # submitit's own checkpoint
    last = folder / "checkpoints" / "last.ckpt"
    assert saved_step(folder) == AT and not (folder / "metrics.json").exists()
    final = [line for line in res.stderr.splitlines() if line.strip()][-1]
    assert final.startswith(
        f"stopped by SIGUSR2 (SLURM's requeue signal): {last} saved at step {AT}; "
    )
    original = records(folder)
    task = tmp_path / "task"
    shutil.copytree(folder, task)

    # Under the launcher: Hydra's task run again in the same folder, no entry point before it.
    for key, value in {**SLURM_TASK, "SLURM_RESTART_COUNT": "1", "PATH": path}.items():
        monkeypatch.setenv(key, value)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "12910")):
        monkeypatch.setenv(key, value)  # Lightning's SLURM environment sets them: undone after
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGCONT)}
    try:
        overrides = [a.replace(str(folder), str(task)) for a in args if not a.startswith("hydra.")]
        same = [a.replace("+callbacks", "++callbacks") for a in overrides]
        train_here(task, *same, "print_config=true")  # as the job ran: the stored config
    finally:
        for signum, handler in handlers.items():  # submitit's handlers stay out of pytest
            signal.signal(signum, handler)
    assert_same_run(task, ref)

    # An sbatch script's command line: resumed as with ckpt_path=last, the records kept.
    res = run("gpo_lit.train", *args, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(folder, ref)
    assert records(folder) == original  # the requeued job's records go to .hydra/resume-1/
    assert (folder / ".hydra" / "resume-1" / "overrides.yaml").is_file()
    assert log.read_text().split() == ["requeue", "4242"]  # requeued once


@pytest.mark.slow
def test_a_copied_run_folder_resumes_and_tests_its_own_best_checkpoint(
    tmp_path: Path, straight
) -> None:
    # A run folder copied (or moved: the old one gone) and resumed: its last.ckpt names the old
    # folder's best checkpoint; the test step takes the copy's own.
    run_dir, data = straight
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.json").unlink()  # as if killed while testing
    res = run(
        "gpo_lit.train", *SMALL, data, f"hydra.run.dir={copy}", "ckpt_path=last",
        cwd=tmp_path, env=TESTS_ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    best = sorted((copy / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    assert f"Test metrics of {best[0]}" in res.stdout
    assert f"checkpoint path at {run_dir}" not in res.stdout + res.stderr  # not the old one
    # The same weights: the original run's metrics.
    assert (copy / "metrics.json").read_bytes() == (run_dir / "metrics.json").read_bytes()
