"""A full disk is one line naming the file, the space needed and the space free, before or
instead of a crash (SIGBUS of a sparse memory map, a half-written checkpoint); nothing written
before is changed. The disk is never really filled: ``shutil.disk_usage`` and the writes are
made to report it."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL, TESTS_ENV, one_line_error, run

import gpo_lit.feature_writer
from gpo_lit.checkpoint_io import AtomicCheckpointIO, tensor_bytes
from gpo_lit.errors import GpoLitError
from gpo_lit.feature_writer import extract_split
from gpo_lit.files import reserve

KW = {"settings": {"backbone": "tiny"}, "batch_size": 2, "flush_every": 1, "progress": False}


def with_free(monkeypatch, free: int) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_features_need_their_whole_size_free_before_mapping(
    tmp_path: Path,
    tree_split,
    encoder,
    monkeypatch,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with_free(monkeypatch, 1000)
    with pytest.raises(GpoLitError) as err:
        extract_split(encoder, tree_split, out, **KW)
    cells, dim = encoder.grid(torch.zeros(1, 3, 32, 32)).shape[1:]
    need = 128 + 9 * cells * dim * 4  # 9 images × cells × C float32 + the .npy header
    msg = str(err.value)
    assert msg.startswith(f"{out / 'test_ims.partial.npy'}: expected {need / 1024:.1f} KiB free")
    assert f"for 9 images × {cells} cells × {dim} float32 features, found 1000 B free" in msg
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine\n").hexdigest()}


def test_features_are_allocated_on_disk_before_rows_are_written(
    tmp_path: Path, tree_split, encoder, monkeypatch
) -> None:
    grid = encoder.grid

    def dies_after_the_probe(x, pool_grid=None):
        if len(x) > 1:
            raise KeyboardInterrupt
        return grid(x, pool_grid)

    reserved: list[tuple[Path, int]] = []
    monkeypatch.setattr(
        gpo_lit.feature_writer,
        "reserve",
        lambda p, n, what: reserved.append((Path(p), n)) or reserve(p, n, what),
    )
    out = tmp_path / "out"
    encoder.grid = dies_after_the_probe
    with pytest.raises(KeyboardInterrupt):
        extract_split(encoder, tree_split, out, **KW)
    partial = out / "test_ims.partial.npy"
    assert reserved == [(partial, partial.stat().st_size)]  # all of it, before any row


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate here")
def test_reserve_allocates_a_sparse_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "sparse.npy"
    with open(path, "wb") as f:
        f.truncate(8 * 2**20)
    assert 512 * path.stat().st_blocks < 2**20  # sparse: the disk is asked for space only later
    reserve(path, 8 * 2**20, "rows")
    assert 512 * path.stat().st_blocks >= 8 * 2**20
    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(
        GpoLitError,
        match=r"sparse\.npy: expected 8\.0 MiB free disk space for rows, found the disk full",
    ):
        reserve(path, 8 * 2**20, "rows")


def test_a_full_disk_at_allocation_leaves_no_partial_file(
    tmp_path: Path, tree_split, encoder, monkeypatch
) -> None:
    out = tmp_path / "out"
    extract_split(encoder, tree_split, out, **KW)
    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    before = snapshot(out)
    with pytest.raises(
        GpoLitError, match=r"dev_ims\.partial\.npy: expected .* found the disk full"
    ):
        extract_split(encoder, type(tree_split)(tree_split.root, "dev", image_size=32), out, **KW)
    assert snapshot(out) == before  # the new partial file is gone, the finished split untouched


def test_a_resumed_extraction_needs_only_what_is_not_allocated_yet(
    tmp_path: Path,
    tree_split,
    encoder,
    monkeypatch,
) -> None:
    grid = encoder.grid
    calls: list[int] = []

    def dying_grid(x, pool_grid=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return grid(x, pool_grid)

    encoder.grid = dying_grid
    with pytest.raises(KeyboardInterrupt):
        extract_split(encoder, tree_split, tmp_path / "out", **KW)
    encoder.grid = grid
    ref = np.load(extract_split(encoder, tree_split, tmp_path / "ref", **KW))
    with_free(monkeypatch, 0)  # the whole file was allocated by the first run
    got = np.load(extract_split(encoder, tree_split, tmp_path / "out", **KW))
    np.testing.assert_array_equal(got, ref)


def checkpoint() -> dict:
    return {"state_dict": {"w": torch.ones(256, 256)}, "optimizer_states": [{"m": torch.ones(256)}]}


def test_a_checkpoint_save_needs_its_size_free_and_keeps_the_previous(
    tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"old": torch.zeros(3)}, path)
    before = snapshot(path.parent)
    with_free(monkeypatch, 4096)
    with pytest.raises(GpoLitError) as err:
        io.save_checkpoint(checkpoint(), path)
    need = tensor_bytes(checkpoint()) + 2**20
    assert tensor_bytes(checkpoint()) == 4 * (256 * 256 + 256)
    assert str(err.value).startswith(f"{path}: expected {need / 2**20:.1f} MiB free disk space")
    assert "found 4.0 KiB free" in str(err.value)
    assert snapshot(path.parent) == before  # previous checkpoint intact, no temporary left


def test_a_disk_filling_up_during_a_save_removes_the_temporary(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"old": torch.zeros(3)}, path)
    before = snapshot(tmp_path)
    real_save = torch.save

    def fills_up(obj, f):
        f.write(b"\0" * 10_000)  # part of it made it to disk
        disk_full()

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(
        GpoLitError,
        match=r"last\.ckpt: expected 1\.3 MiB free disk space .* found the disk full \(No space left on device",
    ):
        io.save_checkpoint(checkpoint(), path)
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["old"].shape == (3,)


def test_checkpoints_are_not_staged_in_tmpdir(tmp_path: Path, monkeypatch) -> None:
    staging = tmp_path / "tmpdir"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    seen: list[set[str]] = []
    real_save = torch.save

    def watching(obj, f):
        seen.append({p.name for p in (tmp_path / "ck").iterdir()})
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", watching)
    AtomicCheckpointIO().save_checkpoint(checkpoint(), tmp_path / "ck" / "a.ckpt")
    assert seen == [{f".a.ckpt.{os.getpid()}.tmp"}]  # the temporary sits beside its destination
    assert not list(staging.iterdir())


@pytest.mark.slow
def test_training_stops_in_one_line_when_the_disk_fills_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        *SMALL,
        f"paths.data_dir={tmp_path / 'data'}",
        "+callbacks.full._target_=tests.killer.DiskFullAtStep",
        "+callbacks.full.step=5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env=TESTS_ENV,
    )
    msg = one_line_error(res)
    assert msg.startswith(f"error: {run_dir / 'checkpoints' / 'last.ckpt'}: expected ")
    assert "found 1.0 KiB free" in msg
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt"]  # no temporary left beside it
    kept = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert kept["global_step"] == 4  # the save before the disk filled up, intact
