"""Feature extraction (``make features``): precomp files that reproduce the on-the-fly grid path,
resumable after an interruption, never clobbering finished files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_BACKBONE,
    TINY_GRID_DEMO,
    check_round_trip,
    compose_cfg,
    run,
    task_error,
    train_here,
    untrained_rsum,
)
from hydra.utils import instantiate

from gpo_lit.data.formats.images import ImageSplit
from gpo_lit.encoders.grid import GridEncoder
from gpo_lit.errors import GpoLitError
from gpo_lit.extract import extract
from gpo_lit.feature_writer import extract_split
from gpo_lit.train import build_vocab

TINY = TINY_BACKBONE


def test_round_trip_precomputed_cells_give_the_on_the_fly_embeddings(tmp_path: Path) -> None:
    check_round_trip(tmp_path, (), (), cells=16, dim=192)  # 4×4 cells at 64 px


def test_interrupted_extraction_resumes_where_it_stopped(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    kw = {"settings": {"backbone": TINY}, "batch_size": 2, "flush_every": 1, "progress": False}
    ref = np.load(extract_split(encoder, tree_split, tmp_path / "ref", **kw))

    calls: list[int] = []
    grid = encoder.grid

    def dying_grid(x, pool_grid=None):
        calls.append(len(x))
        if len(calls) == 4:  # the probe + 2 batches done, the third dies
            raise KeyboardInterrupt
        return grid(x, pool_grid)

    out = tmp_path / "out"
    encoder.grid = dying_grid
    with pytest.raises(KeyboardInterrupt):
        extract_split(encoder, tree_split, out, **kw)
    state = json.loads((out / "test_ims.progress.json").read_text())
    assert state["done"] == 4 and not (out / "test_ims.npy").exists()

    calls.clear()
    encoder.grid = lambda x, pool_grid=None: calls.append(len(x)) or grid(x, pool_grid)
    path = extract_split(encoder, tree_split, out, **kw)
    assert calls == [1, 2, 2, 1]  # probe, then only images 4..8
    np.testing.assert_array_equal(np.load(path), ref)
    assert sorted(p.name for p in out.iterdir()) == [
        "test_caps.txt",
        "test_ids.txt",
        "test_ims.npy",
    ]


def interrupted_after_the_probe(
    encoder: GridEncoder, split: ImageSplit, out: Path, settings: dict
) -> None:
    """An extraction into ``out`` stopped by Ctrl-C after its one-image probe, before any batch:
    the partial file and its first progress record are left."""
    grid = encoder.grid

    def dies_after_the_probe(x, pool_grid=None):
        if len(x) > 1:
            raise KeyboardInterrupt
        return grid(x, pool_grid)

    encoder.grid = dies_after_the_probe
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_split(encoder, split, out, settings=settings, progress=False)
    finally:
        encoder.grid = grid


def test_resume_with_other_settings_and_finished_files_are_refused(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    out = tmp_path / "out"
    interrupted_after_the_probe(encoder, tree_split, out, {"pool_grid": None})
    with pytest.raises(GpoLitError, match=r"test_ims\.partial\.npy: expected an interrupted"):
        extract_split(encoder, tree_split, out, settings={"pool_grid": 2}, progress=False)

    done = extract_split(encoder, tree_split, tmp_path / "done", settings={}, progress=False)
    before = done.read_bytes()
    with pytest.raises(GpoLitError, match=r"test_ims\.npy: expected a new file"):
        extract_split(encoder, tree_split, tmp_path / "done", settings={}, progress=False)
    assert done.read_bytes() == before


def test_pool_grid_averages_blocks_of_cells(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    split = ImageSplit(tree_split.root, "test", image_size=128)  # 4×4 cells at stride 32
    full = np.load(extract_split(encoder, split, tmp_path / "a", settings={}, progress=False))
    pooled = np.load(
        extract_split(encoder, split, tmp_path / "b", settings={}, pool_grid=2, progress=False)
    )
    n, c = full.shape[0], full.shape[2]
    assert full.shape[1] == 16 and pooled.shape == (n, 4, c)
    blocks = full.reshape(n, 2, 2, 2, 2, c).mean(axis=(2, 4)).reshape(n, 4, c)  # row-major
    np.testing.assert_allclose(pooled, blocks, rtol=1e-5, atol=1e-6)


def test_damaged_resume_files_are_one_line_errors(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    """A torn or edited progress record vouches for nothing; a truncated partial file is named."""
    out = tmp_path / "out"
    interrupted_after_the_probe(encoder, tree_split, out, {})
    record, partial = out / "test_ims.progress.json", out / "test_ims.partial.npy"
    good = record.read_text()
    for damaged in ("[1, 2]", '{"done": "abc"}', good[:-5], "\xff"):
        record.write_text(damaged)
        with pytest.raises(GpoLitError, match=r"test_ims\.partial\.npy: expected an interrupted"):
            extract_split(encoder, tree_split, out, settings={}, progress=False)
    record.write_text(good)
    partial.write_bytes(partial.read_bytes()[:200])
    with pytest.raises(GpoLitError) as info:
        extract_split(encoder, tree_split, out, settings={}, progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{partial}: expected the interrupted extraction's 9 images") and (
        "found 200 bytes" in msg and "\n" not in msg
    )
    assert partial.stat().st_size == 200 and record.read_text() == good  # left as they were


def test_pool_grid_larger_than_the_feature_map_is_refused(
    tmp_path: Path, tree_split: ImageSplit, encoder: GridEncoder
) -> None:
    """Adaptive pooling to more cells than the map has would repeat cells, not pool them."""
    side = int(np.sqrt(np.load(extract_split(encoder, tree_split, tmp_path / "a", settings={},
                                             progress=False)).shape[1]))  # fmt: skip
    extract_split(encoder, tree_split, tmp_path / "b", settings={}, pool_grid=side, progress=False)
    with pytest.raises(GpoLitError, match=f"extract.pool_grid: expected at most {side} .*found "
                                          f"{side + 1}$"):  # fmt: skip
        extract_split(encoder, tree_split, tmp_path / "c", settings={}, pool_grid=side + 1,
                      progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("extract.device=foo", "extract.device: expected auto, cpu, cuda or cuda:<index>, found 'foo'"),
        ("extract.bf16=maybe", "extract.bf16: expected true or false, found 'maybe'"),
        ("extract.num_threads=-3", "extract.num_threads: expected null or a positive integer, found -3"),
        ("extract.splits=[]", "extract.splits: expected a list of distinct split names"),
        ("extract.splits=[test,test]", "extract.splits: expected a list of distinct split names"),
        ("extract.progress=2", "extract.progress: expected true or false, found 2"),
    ],
)  # fmt: skip
def test_bad_extract_values_are_one_line_before_any_work(
    tmp_path: Path, capsys, override: str, expected: str
) -> None:
    cfg = compose_cfg("extract", "experiment=demo_grid", override,
                      f"paths.data_dir={tmp_path / 'd'}")  # fmt: skip
    assert task_error(extract, cfg, capsys).startswith(f"error: {expected}")
    assert not (tmp_path / "d").exists()


def test_feature_folder_that_is_a_file_or_a_damaged_record_is_one_line(
    tmp_path: Path, capsys
) -> None:
    data = tmp_path / "d"
    args = ("extract", "experiment=demo_grid", f"paths.data_dir={data}", "extract.splits=[test]",
            "extract.max_images=4", "extract.progress=false")  # fmt: skip
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        msg = task_error(extract, compose_cfg(*args, f"extract.out_dir={out}"), capsys)
        assert msg == f"error: extract.out_dir: expected a folder, found a " \
            f"file, {tmp_path / 'file'}"  # fmt: skip
        assert not data.exists()  # refused before the demo images are rendered
    assert (tmp_path / "file").read_text() == "mine"
    out = tmp_path / "feats"
    out.mkdir()
    for record, found in (("{", "found JSONDecodeError: "), ("[]", "found a list")):
        (out / "features_meta.json").write_text(record)
        msg = task_error(extract, compose_cfg(*args, f"extract.out_dir={out}"), capsys, alone=False)
        assert msg.startswith(f"error: {out / 'features_meta.json'}: expected the JSON record")
        assert found in msg and (out / "features_meta.json").read_text() == record
        assert sorted(p.name for p in out.iterdir()) == ["features_meta.json"]


def test_extracting_a_region_experiment_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg(
        "extract",
        "experiment=demo",
        f"paths.data_dir={tmp_path / 'data'}",
        "++data.demo.n_train=20",
        "++data.demo.n_dev=10",
        "++data.demo.n_test=10",
    )
    err = task_error(extract, cfg, capsys, alone=False)
    assert "model.visual: expected a grid or ViT visual encoder" in err and "RegionEncoder" in err


@pytest.mark.slow
def test_make_features_then_train_on_them(tmp_path: Path) -> None:
    common = (*TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}")
    res = run("gpo_lit.extract", "experiment=demo_grid", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    feats = tmp_path / "data" / "demo_images" / "features" / TINY
    meta = json.loads((feats / "features_meta.json").read_text())
    assert meta["splits"] == {
        s: {"images": n, "cells": 16, "dim": 192}
        for s, n in (("train", 120), ("dev", 30), ("test", 40))
    }
    assert "model/visual=grid_precomp model.visual.in_dim=192" in res.stdout

    on_features = (
        "experiment=demo_grid_features",
        f"paths.data_dir={tmp_path / 'data'}",
        *[o for o in TINY_GRID_DEMO if not o.startswith("++data.demo")],
    )
    trained = train_here(tmp_path / "run", *on_features, "trainer.max_epochs=1")
    assert trained["full"]["rsum"] > untrained_rsum(tmp_path / "untrained", *on_features)


def test_extract_from_a_trained_checkpoint_uses_its_backbone(tmp_path: Path) -> None:
    from gpo_lit.extract import extract

    common = (*TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}", "extract.splits=[test]")
    common = (*common, "extract.progress=false")
    cfg = compose_cfg(
        "extract", "experiment=demo_grid", *common, f"extract.out_dir={tmp_path / 'a'}"
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    vocab = build_vocab(cfg, dm)
    torch.manual_seed(123)  # not the extractor's seed: another random backbone
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab).eval()
    ckpt = tmp_path / "trained.ckpt"
    torch.save(
        {
            "hyper_parameters": dict(model.hparams) | {"vocab": vocab},
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    ckpt_cfg = compose_cfg("extract", "experiment=demo_grid", *common, f"extract.ckpt={ckpt}")
    written = extract(ckpt_cfg)["test"]
    assert written.parent.name.startswith(f"{TINY}-ckpt-")  # not the untrained backbone's folder
    from_ckpt = np.load(written)
    from_config = np.load(extract(cfg)["test"])
    split = dm.split("test")
    images = torch.stack([torch.from_numpy(split.image(i)) for i in range(split.n_images)])
    with torch.no_grad():
        want = model.visual_encoder.grid(images).numpy()
    np.testing.assert_allclose(from_ckpt, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(from_config, want, atol=1e-3)
    # another split may join a folder only with the same settings
    other = compose_cfg("extract", "experiment=demo_grid", *common, f"extract.out_dir={tmp_path / 'a'}",
        "extract.splits=[dev]", "extract.pool_grid=2")  # fmt: skip
    with pytest.raises(GpoLitError, match=r"features_meta\.json: expected the settings"):
        extract(other)
    assert not (tmp_path / "a" / "dev_ims.npy").exists()
    meta = json.loads((written.parent / "features_meta.json").read_text())
    assert meta["weights"] == str(ckpt) and meta["splits"]["test"]["images"] == 40
    assert meta["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # Other weights saved under the same path are other settings: the folder (named for the
    # path) takes no split made from them, and its finished file stays as it was.
    before = written.read_bytes()
    torch.manual_seed(321)
    retrained = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab)
    torch.save(
        {"hyper_parameters": dict(model.hparams) | {"vocab": vocab},
         "state_dict": retrained.state_dict()},
        ckpt,
    )  # fmt: skip
    replaced = compose_cfg("extract", "experiment=demo_grid", *common, f"extract.ckpt={ckpt}",
        "extract.splits=[dev]")  # fmt: skip
    with pytest.raises(GpoLitError, match=r"features_meta\.json: expected the settings"):
        extract(replaced)
    assert written.read_bytes() == before and not (written.parent / "dev_ims.npy").exists()
