"""The GPU training-step benchmark keeps working where no GPU is (tiny models, CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, LOAD_AVERAGE

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """``bench/<script> args`` in its own process, its output captured."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # trains tiny models in a subprocess
def test_gpu_train_step_tiny_on_cpu() -> None:
    res = run_bench("gpu_train_step.py", "--device", "cpu", "--tiny", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [
        ln.split("|")[1:-1]
        for ln in res.stdout.splitlines()
        if ln.startswith("| ") and " ms |" in ln
    ]
    names = [(r[0].strip(), r[1].strip()) for r in rows]
    settings = ["wsl_fp32", "wsl_bf16", "wsl_bf16_gc", "region_fp32", "region_bf16"]
    assert names == [(s, p) for s in settings for p in ("gpo", "max")]
    assert all(float(r[4]) > 0 for r in rows)  # images/s measured
    shares = [float(r[6].strip().rstrip("%")) for r in rows]
    assert all(x >= 0 for x in shares)  # the pooling's share of the step, measured


@pytest.mark.slow  # ~20 s on a loaded 2-core machine (worker processes)
def test_loader_speed_smoke() -> None:
    """Both readers load the same batches; the new one reads about one sample per sample on a
    cold cache, and the file is deleted afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        res = run_bench("loader_speed.py", "--smoke", "--dir", where, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert list(Path(where).iterdir()) == []  # the feature file is gone
    rows = [
        ln.split("|")[1:-1]
        for ln in res.stdout.splitlines()
        if ln.startswith("| OLD") or ln.startswith("| NEW")
    ]
    seen = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows}
    assert seen == {(n, w, c) for n in ("OLD", "NEW") for w in ("0", "2") for c in ("cold", "hot")}
    assert LOAD_AVERAGE.search(res.stdout)
    assert all(float(r[3]) > 0 for r in rows)  # batches/s measured
    cold_new = [float(r[5]) for r in rows if r[0].strip() == "NEW" and r[2].strip() == "cold"]
    if any(float(r[5]) > 0 for r in rows):  # a file system that counts read_bytes
        assert all(x <= 1.5 + 4096 / (36 * 256 * 4) for x in cold_new), res.stdout


def test_loader_speed_refuses_without_disk() -> None:
    res = run_bench("loader_speed.py", "--rows", "10000000000", timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: --dir ") and "GB free" in res.stderr


def test_pooling_speed_smoke() -> None:
    res = run_bench("pooling_speed.py", "--smoke", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in res.stdout.splitlines() if ln.startswith("| 1 |")]
    assert len(rows) == 1, res.stdout
    threads, b, n, max_ms, gpo_ms, ratio, max_mem, gpo_mem = (c.strip() for c in rows[0][:8])
    assert (threads, b, n) == ("1", "4", "5")
    assert float(max_ms) > 0 and float(gpo_ms) > 0 and ratio.endswith("x")
    # Saved-for-backward bytes: max keeps about its (masked) input; GPO more than max.
    assert float(max_mem) >= 1.0 and float(gpo_mem) > float(max_mem)
    busy = [float(c) for c in rows[0][-2:]]  # worker busy, max and gpo: fractions of the wall
    assert all(0.0 <= f < 5.0 for f in busy), rows[0]
    assert len(LOAD_AVERAGE.findall(res.stdout)) == 3  # at start, per thread count, at end


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread times from /proc")
def test_native_worker_cpu_counts_intra_op_threads_only() -> None:
    # The intra-op workers' CPU time grows while a parallel op runs on 2 threads, and not while
    # the main thread or a Python thread works alone.
    import importlib.util
    import threading
    import time

    import torch

    spec = importlib.util.spec_from_file_location("pooling_speed", ROOT / "bench/pooling_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    a = torch.randn(2_000_000)

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    try:
        torch.set_num_threads(2)
        a.exp()  # workers started
        time.sleep(0.5)  # and asleep
        done, release = threading.Event(), threading.Event()

        def python_thread() -> None:
            spin(0.3)
            done.set()
            release.wait()  # still listed when the main thread reads the times

        worker = threading.Thread(target=python_thread)
        w0 = bench.native_worker_cpu()
        worker.start()
        spin(0.3)
        done.wait()
        idle = bench.native_worker_cpu() - w0
        release.set()
        worker.join()
        # Parallel ops until the main thread itself has 0.4 s of CPU: the worker does its share
        # beside it whatever else loads the machine (a wall-clock budget was flaky under load).
        t0, c0, w0 = time.perf_counter(), time.thread_time(), bench.native_worker_cpu()
        while time.thread_time() - c0 < 0.4 and time.perf_counter() - t0 < 30:
            a.exp()
        main, parallel = time.thread_time() - c0, bench.native_worker_cpu() - w0
    finally:
        torch.set_num_threads(before)
    assert idle <= 0.05 and main >= 0.4 and parallel >= 0.25 * main, (idle, parallel, main)


@pytest.mark.slow  # one short training run in a subprocess (~30 s on a loaded 2-core machine)
def test_train_throughput_smoke() -> None:
    res = run_bench("train_throughput.py", "--smoke", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ours:"))
    assert float(line.split()[1]) > 0  # steps/s measured
    lines = res.stdout.splitlines()
    assert any(ln.startswith("OURS") and LOAD_AVERAGE.search(ln) for ln in lines)  # per run
    assert any(ln.startswith("before: ") and LOAD_AVERAGE.search(ln) for ln in lines)
    assert any(ln.startswith("after: ") and LOAD_AVERAGE.search(ln) for ln in lines)


def test_train_throughput_refuses_a_folder_that_is_not_their_code(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("")
    res = run_bench("train_throughput.py", "--authors", str(tmp_path), timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: --authors {tmp_path}: expected a checkout")
    assert len(res.stderr.strip().splitlines()) == 1


def test_train_throughput_patches_match_the_released_bigru_code(tmp_path: Path) -> None:
    """The patches apply to a tree with the released code's lines (the bench checks the same
    counts against a real checkout); the patched lines no longer call CUDA unguarded."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_throughput as tt
    finally:
        sys.path.pop(0)
    src = tmp_path / "their"
    for rel, old, _, count in tt.AUTHOR_PATCHES:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(old * count + "\n")
    for need in ("train.py", "arguments.py", "lib/vocab.py"):
        (src / need).touch()
    demo = tmp_path / "demo"
    demo.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    code = tt.prepare_authors(src, work, demo)
    vse = (code / "lib/vse.py").read_text()
    assert "torch.Tensor(lengths).cuda() if torch.cuda.is_available()" in vse
    assert "import cv2" not in (code / "lib/datasets/image_caption.py").read_text()
    assert "img_embs[list(ids)] = " in (code / "lib/evaluation.py").read_text()
    for driver in ("driver.py", "full_driver.py", "tensorboard_logger.py"):
        assert (code / driver).is_file()
    for split in ("train", "dev", "test"):
        assert (work / f"data/precomp/{split}_ims.npy").is_symlink()


@pytest.mark.slow  # one short whole recipe (1 epoch, tiny demo) in a subprocess
def test_train_throughput_to_end_reports_each_seeds_test_rsum() -> None:
    res = run_bench(
        "train_throughput.py", "--smoke", "--to-end", "0", "trainer.max_epochs=1", timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    seed = re.search(r"^OURS +seed 0: test rsum ([0-9.]+) \(load average", res.stdout, re.M)
    assert seed is not None, res.stdout
    assert 0 < float(seed[1]) <= 600
    assert f"ours: test rsum {float(seed[1]):.2f} over seeds [0]" in res.stdout


def test_train_throughput_refuses_seeds_that_are_not_numbers() -> None:
    res = run_bench("train_throughput.py", "--to-end", "0,one", timeout=120)
    assert res.returncode == 2
    assert "--to-end: expected seeds such as 0,1,2, found '0,one'" in res.stderr


@pytest.mark.slow  # the prepared GPU run in its CPU form (~20 s: a tiny training step included)
def test_device_check_runs_every_step_and_reports_each(tmp_path: Path) -> None:
    def check(py: str, out: Path) -> subprocess.CompletedProcess:
        env = {**ENV, "DEVICE": "cpu", "PY": py, "OUT": str(out)}
        return subprocess.run(
            ["bash", str(ROOT / "bench" / "device_check.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    res = check(sys.executable, tmp_path / "ok")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    steps = ["environment", "cuda_tests", "gpu_train_step", "pooling_speed"]
    summary = (tmp_path / "ok" / "summary.txt").read_text().splitlines()
    assert summary == [f"{s} rc=0" for s in steps]
    assert "2 skipped" in (tmp_path / "ok" / "cuda_tests.txt").read_text()  # no CUDA here
    assert "worst gpo/max" in (tmp_path / "ok" / "pooling_speed.txt").read_text()
    # A Python that fails everything: each step still runs and is reported, the run fails.
    res = check("false", tmp_path / "bad")
    assert res.returncode != 0
    summary = (tmp_path / "bad" / "summary.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in summary] == ["environment", "wheels", *steps[1:]]
    assert all(not ln.endswith(" rc=0") for ln in summary)
