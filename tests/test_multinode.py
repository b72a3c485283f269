"""Two nodes × one process on localhost through torchrun (gloo, CPU), through the same entry point
and trainer settings a cluster job uses (``trainer=ddp trainer.num_nodes=2 trainer.devices=1``),
against one process: the gathered loss and global batch per step, the trained weights, the
distributed evaluation and a resume from ``last.ckpt`` give what one process gives."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from helpers import ENV, TINY_DEMO, free_port, one_line_error, run

from gpo_lit.run_dir import prepare

# No BatchNorm and no model-side random cell dropping: with those, 2 ranks of batch B/2 differ
# from one process of batch B by design (per-replica statistics, per-process RNG). Data order and
# word augmentation are functions of (seed, epoch, index), so they agree.
COMMON = [
    "experiment=demo",
    *TINY_DEMO,
    "model/visual=grid_precomp",
    "model.visual.in_dim=${data.demo.feat_dim}",
    "model.visual.size_augment=false",
    "~model.visual.mlp_hidden",
    "trainer.accelerator=cpu",
    "trainer.limit_train_batches=3",
    "trainer.log_every_n_steps=1",
    "callbacks.last_checkpoint.train_time_interval=null",
    "callbacks.last_checkpoint.every_n_train_steps=2",  # a mid-epoch last.ckpt to resume from
    "logger=csv",
]


def two_nodes(run_dir: Path, data: Path, *overrides: str) -> str:
    """``torchrun --nnodes=2 --node_rank=k --nproc_per_node=1`` for k = 0, 1, as two cluster
    nodes would start it (both pointed at one run folder on a shared file system)."""
    port = free_port()
    args = [*COMMON, "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1",
            f"paths.data_dir={data}", f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    with ExitStack() as files:
        logs = [[files.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"] for _ in "01"]
        nodes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes=2",
                    f"--node_rank={k}",
                    "--nproc_per_node=1",
                    "--master_addr=127.0.0.1",
                    f"--master_port={port}",
                    "-m",
                    "gpo_lit.train",
                    *args,
                ],  # fmt: skip
                cwd=run_dir.parent,
                env={**ENV, "GLOO_SOCKET_IFNAME": "lo"},
                stdout=logs[k][0],
                stderr=logs[k][1],
                text=True,
            )
            for k in (0, 1)
        ]
        # A node that fails leaves the other one waiting for it at the rendezvous: stop the
        # other at once rather than at the time limit.
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in nodes):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in nodes):
                for p in nodes:
                    if p.poll() is None:
                        p.terminate()  # torchrun stops its worker (in a session of its own)
                break
            time.sleep(0.2)
        outs = []
        for p, (out, err) in zip(nodes, logs, strict=True):
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out.seek(0)
            err.seek(0)
            outs.append((out.read(), err.read()))
    for k, (p, (_, err)) in enumerate(zip(nodes, outs, strict=True)):
        assert p.returncode == 0, f"node {k} (exit status {p.returncode}): {err[-3000:]}"
    return outs[0][0]


def steps(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, train/loss, train/negative_pool) per logged training step."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [(int(r["step"]), float(r["train/loss"]), float(r["train/negative_pool"]))
            for r in rows]  # fmt: skip


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_two_nodes_by_torchrun_equal_one_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ref = tmp_path / "one"
    res = run("gpo_lit.train", *COMMON, "trainer.max_epochs=2", f"paths.data_dir={data}",
              f"hydra.run.dir={ref}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]

    multi = tmp_path / "two"
    multi.mkdir()
    two_nodes(multi, data, "trainer.max_epochs=1", "test_after_fit=false")  # stopped after epoch 0
    first = steps(multi)
    out = two_nodes(
        multi, data, "trainer.max_epochs=2", "ckpt_path=last", "resume_changes=allow"
    )  # resumed

    # the gathered loss over the global batch of 32, step by step (resumed steps logged again)
    one = steps(ref)
    two = {s: (loss, pool) for s, loss, pool in [*first, *steps(multi)]}  # resumed steps: last
    assert [s for s, _, _ in one] == sorted(two) == list(range(6))
    # the resumed run's metrics.csv keeps the first run's steps: every step exactly once
    assert [s for s, _, _ in steps(multi)] == list(range(6))
    for s, loss, pool in one:
        assert pool == two[s][1] == 31  # negatives per query: the global batch less the positive
        assert loss == pytest.approx(two[s][0], rel=1e-5, abs=1e-6)
    # the trained weights, through the resume: equal to float32 rounding, which Adam amplifies
    # where a gradient component is near zero (measured 3e-5 on demo v1, 1.5e-4 on demo v2; the
    # per-step losses above agree to 1e-5)
    a, b = weights(ref / "checkpoints" / "last.ckpt"), weights(multi / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-4, msg=k)
    # distributed evaluation of the best checkpoint = one process evaluating it
    (best,) = re.findall(r"Test metrics of (\S+):", out)  # the best of both runs
    res = run("gpo_lit.eval", f"ckpt={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    distributed = json.loads((multi / "metrics.json").read_text())
    assert distributed == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    for k, v in ref_metrics["full"].items():
        assert distributed["full"][k] == pytest.approx(v, abs=0.25), k  # at most a tie flipped


# A job that Hydra sets up completely and that then stops at once (its data does not exist).
FAILING = ["experiment=f30k_butd_bigru", "seed=3"]


def test_a_rank_started_before_rank_0_leaves_the_run_folder_unused(tmp_path: Path) -> None:
    """torchrun starts the nodes in any order: node 1's rank, set up by Hydra first, must not make
    the shared folder look used, or rank 0 would refuse it. Here rank 1 runs to its end first."""
    shared = tmp_path / "run"
    args = [*FAILING, f"paths.data_dir={tmp_path / 'nodata'}", f"hydra.run.dir={shared}"]
    rank1 = run("gpo_lit.train", *args, cwd=tmp_path, env={**ENV, "RANK": "1", "WORLD_SIZE": "2"})
    assert "train_ims.npy" in one_line_error(rank1)  # the job ran: Hydra had set it up
    assert not shared.exists() or not any(shared.iterdir())  # no .hydra/, no train.log
    rank0 = run("gpo_lit.train", *args, cwd=tmp_path, env={**ENV, "RANK": "0", "WORLD_SIZE": "2"})
    assert "train_ims.npy" in one_line_error(rank0)  # not "expected a new or empty run folder"
    assert sorted(p.name for p in shared.iterdir()) == [".hydra", "train.log"]  # rank 0's records


@pytest.mark.parametrize("env", ["RANK", "SLURM_PROCID", "LOCAL_RANK"])
def test_other_ranks_keep_no_records_and_no_log_file(tmp_path, monkeypatch, env: str) -> None:
    monkeypatch.setenv(env, "1")
    argv = ["experiment=demo", f"hydra.run.dir={tmp_path / 'run'}"]
    added = prepare("train", argv)[len(argv) :]
    assert added == [
        "hydra.output_subdir=null",
        "~hydra.job_logging.handlers.file",
        "hydra.job_logging.root.handlers=[console]",
    ]
    assert not (tmp_path / "run").exists()  # nothing claimed or created either
    monkeypatch.setenv(env, "0")
    assert prepare("train", argv) == argv  # rank 0: the given folder, checked, kept
