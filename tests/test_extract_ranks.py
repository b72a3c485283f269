"""Sharded feature extraction: N ranks write one file byte-identical to one process, and a rank
killed midway resumes from its own progress record."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
from helpers import TINY_BACKBONE
from hydra import compose, initialize_config_dir

from gpo_lit.cli import CONF_DIR
from gpo_lit.data.formats.images import ImageSplit
from gpo_lit.encoders.grid import GridEncoder
from gpo_lit.errors import GpoLitError
from gpo_lit.feature_writer import extract_split, progress_path, share


@pytest.mark.parametrize(("n", "bs", "world"), [(9, 2, 2), (9, 2, 3), (40, 7, 4), (3, 4, 2)])
def test_shares_are_contiguous_runs_of_whole_batches(n: int, bs: int, world: int) -> None:
    shares = [share(n, bs, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    for (_, hi), (lo, _) in zip(shares, shares[1:], strict=False):
        assert hi == lo  # no gap, no overlap
    for lo, hi in shares:
        assert lo % bs == 0 and (hi % bs == 0 or hi == n)  # the one-process batch boundaries
    batches = [-(-(hi - lo) // bs) for lo, hi in shares]
    assert max(batches) - min(batches) <= 1


def _ranks(encoder, split, out: Path, world: int, die: dict[int, int] | None = None, **kw):
    """Run ``world`` ranks as threads; rank r dies (KeyboardInterrupt) at its die[r]-th batch."""
    errors: dict[int, BaseException] = {}
    calls: dict[int, list[int]] = {r: [] for r in range(world)}

    def rank_main(r: int) -> None:
        enc = copy.deepcopy(encoder)
        grid = enc.grid

        def counted(x, pool_grid=None):
            calls[r].append(len(x))
            if die and len(calls[r]) - 1 == die.get(r):  # the probe is call 0
                raise KeyboardInterrupt
            return grid(x, pool_grid)

        enc.grid = counted
        try:
            extract_split(enc, split, out, rank=r, world=world, **kw)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors[r] = err

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, calls


def test_two_ranks_write_the_one_process_file_byte_for_byte(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    split = tree_split
    kw = {
        "settings": {"backbone": TINY_BACKBONE},
        "batch_size": 2,
        "flush_every": 1,
        "progress": False,
    }
    ref = extract_split(encoder, split, tmp_path / "one", **kw)
    errors, calls = _ranks(encoder, split, tmp_path / "two", 2, **kw)
    assert errors == {}
    assert calls == {0: [1, 2, 2], 1: [1, 2, 2, 1]}  # probe, then batches 0-1 and 2-4
    out = tmp_path / "two" / "test_ims.npy"
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        p.name for p in ref.parent.iterdir()
    )  # captions, ids; no progress record left


def test_a_killed_rank_resumes_where_it_stopped(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    split = tree_split
    kw = {"settings": {}, "batch_size": 2, "flush_every": 1, "progress": False, "wait_s": 1.0}
    ref = extract_split(encoder, split, tmp_path / "one", **kw).read_bytes()
    out = tmp_path / "two"
    errors, _ = _ranks(encoder, split, out, 2, die={1: 2}, **kw)  # rank 1: one batch, then dies
    assert isinstance(errors[1], KeyboardInterrupt)
    assert isinstance(errors[0], GpoLitError)  # rank 0 gave up waiting, in one line
    assert "expected the other 1 rank(s) to finish their rows" in str(errors[0])
    assert "2 of 5 rows done" in str(errors[0]) and not (out / "test_ims.npy").exists()

    errors, calls = _ranks(encoder, split, out, 2, **kw)
    assert errors == {}
    assert calls == {0: [1], 1: [1, 2, 1]}  # rank 0 had finished; rank 1 only images 6..8
    assert (out / "test_ims.npy").read_bytes() == ref
    assert not progress_path(out, "test", 1, 2).exists()


def test_a_resume_with_another_number_of_ranks_is_refused(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    split = tree_split
    kw = {"settings": {}, "batch_size": 2, "flush_every": 1, "progress": False, "wait_s": 0.5}
    _ranks(encoder, split, tmp_path, 2, die={1: 1}, **kw)
    with pytest.raises(GpoLitError, match=r"test_ims\.partial\.npy: expected an interrupted"):
        extract_split(encoder, split, tmp_path, **kw)  # one process: no record of its own


@pytest.mark.slow
def test_extract_devices_2_spawns_ranks_with_one_process_output(tmp_path: Path) -> None:
    from gpo_lit.extract import extract

    common = [
        "experiment=demo_grid",
        f"paths.data_dir={tmp_path / 'data'}",
        "++data.demo.n_train=10",
        "++data.demo.n_dev=10",
        "++data.demo.n_test=23",
        "extract.splits=[test]",
        "extract.batch_size=4",
        "extract.flush_every=1",
        "extract.num_threads=1",
        "extract.progress=false",
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        one = compose("extract", [*common, f"extract.out_dir={tmp_path / 'one'}"])
        two = compose(
            "extract", [*common, f"extract.out_dir={tmp_path / 'two'}", "extract.devices=2"]
        )
    a = extract(one)["test"]
    b = extract(two)["test"]
    assert b == tmp_path / "two" / "test_ims.npy"
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "two" / "features_meta.json").exists()


@pytest.mark.slow
def test_make_features_reads_webdataset_shards(tmp_path: Path) -> None:
    """The shard demo packs the image demo's JPEGs: features from the shards are those of the
    image folders, row for row."""
    from gpo_lit.extract import extract

    common = [
        f"paths.data_dir={tmp_path / 'data'}",
        "++data.demo.n_train=8",
        "++data.demo.n_dev=8",
        "++data.demo.n_test=12",
        "extract.splits=[test]",
        "extract.progress=false",
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        shards = compose(
            "extract",
            ["experiment=demo_shards", *common, "data.demo.samples_per_shard=5",
             f"extract.out_dir={tmp_path / 'shards'}"],
        )  # fmt: skip
        images = compose(
            "extract", ["experiment=demo_grid", *common, f"extract.out_dir={tmp_path / 'images'}"]
        )
    a = extract(shards)["test"]
    b = extract(images)["test"]
    assert a.read_bytes() == b.read_bytes()
    for name in ("test_caps.txt", "test_ids.txt"):
        assert (a.parent / name).read_text() == (b.parent / name).read_text()


@pytest.mark.slow
def test_launched_ranks_resume_after_one_is_killed(tmp_path: Path) -> None:
    """Two ``gpo-extract`` processes launched as torchrun would (RANK / WORLD_SIZE); rank 1 is
    SIGKILLed midway, rank 0 gives up in one line; rerunning both gives the one-process file."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    common = [
        "experiment=demo_grid",
        f"paths.data_dir={tmp_path / 'data'}",
        "++data.demo.n_train=8",
        "++data.demo.n_dev=8",
        "++data.demo.n_test=60",
        "extract.splits=[test]",
        "extract.batch_size=1",
        "extract.flush_every=1",
        "extract.num_threads=1",
        "extract.progress=false",
    ]
    # Not a setting of the extraction, so it may differ per rank. Rank 0 gives up 12 s after rank
    # 1 stops moving (the wait this test sits through); rank 1 waits up to 60 s for rank 0 to
    # start (it never sits through that: rank 0 starts with it).
    wait_s = {0: 12, 1: 60}

    def launch(out: str, rank: int, world: int, run: str) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0"}
        args = [*common, f"extract.rank_wait_s={wait_s[rank]}",
                f"extract.out_dir={tmp_path / out}", f"hydra.run.dir={tmp_path / run}"]  # fmt: skip
        return subprocess.Popen(
            [sys.executable, "-m", "gpo_lit.extract", *args],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    one = launch("one", 0, 1, "r1")
    assert one.wait(300) == 0, one.stderr.read()[-2000:]
    ref = (tmp_path / "one" / "test_ims.npy").read_bytes()

    ranks = [launch("two", r, 2, "r2") for r in (0, 1)]
    record = tmp_path / "two" / "test_ims.progress.1of2.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and ranks[1].poll() is None:
        try:
            if json.loads(record.read_text())["done"] > 35:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGKILL)
    assert ranks[1].wait(60) == -signal.SIGKILL, ranks[1].stderr.read()[-2000:]
    assert ranks[0].wait(300) == 2
    err = ranks[0].stderr.read().strip().splitlines()
    assert "expected the other 1 rank(s) to finish their rows" in err[-1]
    done = json.loads(record.read_text())["done"]
    assert 35 < done < 60 and not (tmp_path / "two" / "test_ims.npy").exists()

    again = [launch("two", r, 2, f"r3-{r}") for r in (0, 1)]
    assert [p.wait(300) for p in again] == [0, 0], again[0].stderr.read()[-2000:]
    assert (tmp_path / "two" / "test_ims.npy").read_bytes() == ref


_LAUNCH_ENV = (
    "LOCAL_WORLD_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
)


@pytest.mark.parametrize(
    ("env", "launched", "world", "want"),
    [
        ({}, False, 4, 4),  # extract.devices=4 spawned here: all four share this machine
        ({"LOCAL_WORLD_SIZE": "4"}, True, 8, 4),  # torchrun, 2 nodes x 4
        ({"SLURM_PROCID": "5", "SLURM_TASKS_PER_NODE": "4(x2)"}, True, 8, 4),
        ({"SLURM_PROCID": "0", "SLURM_TASKS_PER_NODE": "2,1"}, True, 3, 2),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS_PER_NODE": "2"}, True, 8, 2),
        ({}, True, 3, 3),  # a launch that says nothing: assume one machine
    ],
)
def test_extract_threads_divide_this_machines_cores_among_its_ranks(
    monkeypatch, env, launched, world, want
) -> None:
    from gpo_lit import extract as ex

    for key in _LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ex.os, "cpu_count", lambda: 16)
    assert ex.ranks_on_this_machine(world, launched) == want
    assert ex.rank_threads(world, launched) == 16 // want
    monkeypatch.setattr(ex.os, "cpu_count", lambda: 2)
    assert ex.rank_threads(world, launched) == max(1, 2 // want)
