"""Weights & Biases: one offline run per job of a sweep, with metrics, θ plots and retrievals.

The end-to-end test reads the offline run files themselves: ``run-<id>.wandb`` is a LevelDB-style
log of ``wandb_internal_pb2.Record`` protobufs (wandb 0.31 no longer ships a Python reader, and
writes no ``wandb-summary.json`` offline), media under ``files/media/``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gpo_lit.callbacks import HIT, PoolingWeightsPlot, RetrievalExamples, retrieval_examples
from gpo_lit.metrics.collect import RankedEmbeddings
from gpo_lit.pooling import create_pooling
from gpo_lit.wandb_utils import instantiate_loggers, log_final_summary, wandb_settings_from_hydra

TINY_DEMO = [
    "++data.demo.n_train=240",
    "++data.demo.n_dev=60",
    "++data.demo.n_test=80",
    "data.batch_size=32",
    "data.eval_batch_size=50",
]


# -- reading an offline run -------------------------------------------------------------------
def wandb_records(path: Path) -> Iterator:
    """The records of a ``.wandb`` file: 7-byte file header (``:W&B``, magic, version), then
    32 KiB blocks of chunks (crc32 over type+payload, uint16 length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / zero padding
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad crc at {pos}"
        pos += 7 + length
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _items(items) -> dict[str, object]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_run(run_dir: Path) -> SimpleNamespace:
    """Run header, config, history keys, summary and exit code of an offline run directory."""
    (log,) = run_dir.glob("run-*.wandb")
    run = SimpleNamespace(info=None, config={}, history_keys=set(), summary={}, exit_code=None)
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.info = rec.run
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history_keys |= set(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def read_table(run_dir: Path, key: str) -> dict:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())


# -- the sweep, end to end --------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_logs_one_offline_run_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    data = tmp_path / "data"
    wb = tmp_path / "wandb_home"  # keep W&B's caches and staging out of the user's home
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(wb / "cache"),
        "WANDB_DATA_DIR": str(wb / "data"),
        "WANDB_CONFIG_DIR": str(wb / "config"),
        "WANDB_SILENT": "true",
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpo_lit.train",
            "-m",
            "experiment=demo",
            "logger=wandb",
            "callbacks=wandb",
            "model/pooling=gpo,max",
            *TINY_DEMO,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            # every caption a query: ground-truth hits (✓) certainly occur, even untrained
            "callbacks.retrieval_examples.n_queries=400",
            f"paths.data_dir={data}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]

    # Two jobs, two separate runs, each finished (an exit record), grouped by the sweep folder.
    runs = {job: sorted((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")}
    assert [len(r) for r in runs.values()] == [1, 1], runs
    assert len(list(sweep.rglob("offline-run-*"))) == 2
    read = {job: read_run(dirs[0]) for job, dirs in runs.items()}
    assert read["0"].info.run_id != read["1"].info.run_id

    caps = (data / "demo" / "test_caps.txt").read_text().splitlines()
    ids = (data / "demo" / "test_ids.txt").read_text().splitlines()
    captions_of = {name: set(caps[5 * i : 5 * i + 5]) for i, name in enumerate(ids)}

    for job, pooling in (("0", "gpo"), ("1", "max")):
        run_dir, run = runs[job][0], read[job]
        assert run.exit_code == 0
        assert run.info.run_group == "sweep" and run.info.display_name == f"demo-{job}"
        tags = set(run.info.tags)
        assert {f"model/pooling={pooling}", "experiment=demo", "trainer.max_epochs=1"} <= tags
        assert all(len(t) <= 64 for t in tags)
        assert not any(t.startswith("hydra") for t in tags)
        # The whole resolved config, not only the model's hyper-parameters.
        assert {"data", "model", "trainer", "optim", "seed"} <= set(run.config)
        assert run.config["model"]["pooling"]["name"] == pooling
        assert run.config["trainer"]["max_epochs"] == 1
        # Metrics per epoch, and the final test metrics in the summary at full precision.
        assert {"val/rsum", "val/i2t_r1", "lr-AdamW", "test/full/rsum"} <= run.history_keys
        metrics = json.loads((sweep / job / "metrics.json").read_text())["full"]
        for name, value in metrics.items():
            assert run.summary[f"test/full/{name}"] == pytest.approx(value, abs=1e-9)
        assert run.summary["test/checkpoint"].endswith(".ckpt")

        # θ against rank: a PNG and the raw values, for GPO only.
        pngs = list((run_dir / "files" / "media" / "images" / "pooling").glob("theta*.png"))
        if pooling == "gpo":
            assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            values = read_table(run_dir, "pooling/theta_values_table")
            assert values["columns"] == ["modality", "rank", "theta"]
            for modality, n in (("visual", 36), ("text", 12)):
                theta = [t for m, _, t in values["data"] if m == modality]
                assert len(theta) == n and sum(theta) == pytest.approx(1.0, abs=1e-5)
            assert "pooling/theta" in run.history_keys or "pooling/theta/path" in run.history_keys
        else:
            assert pngs == []

        # Example retrievals: top 5 per query, ✓ exactly on ground truth.
        t2i = read_table(run_dir, "retrieval/text_to_image")
        assert t2i["columns"] == ["caption", "ground truth", "rank of ground truth"] + [
            f"top {r}" for r in range(1, 6)
        ]
        assert len(t2i["data"]) == 400
        for caption, truth, rank, *top in t2i["data"]:
            assert len(top) == 5 and truth in ids and caption in captions_of[truth]
            for cell in top:
                hit = cell.startswith(HIT + " ")
                assert hit == (cell.removeprefix(HIT + " ") == truth)
            assert (rank <= 5) == any(c.startswith(HIT) for c in top)
        assert any(c.startswith(HIT) for row in t2i["data"] for c in row[3:])

        i2t = read_table(run_dir, "retrieval/image_to_text")
        assert i2t["columns"][:3] == [
            "image",
            "a ground-truth caption",
            "best rank of its captions",
        ]
        assert len(i2t["data"]) == 80
        for image, truth, rank, *top in i2t["data"]:
            assert len(top) == 5 and truth in captions_of[image]
            marked = [c.removeprefix(HIT + " ") for c in top if c.startswith(HIT)]
            assert all(c in captions_of[image] for c in marked)
            assert (rank <= 5) == bool(marked)


# -- the pieces, fast -------------------------------------------------------------------------
def test_retrieval_examples_marks_hits() -> None:
    # 3 items, 2 captions each; caption j is closest to item j // 2, except caption 5 (→ item 0).
    img = torch.eye(3, 4)
    cap = torch.tensor(
        [[1.0, 0, 0, 0]] * 2 + [[0, 1.0, 0, 0]] * 2 + [[0, 0, 1.0, 0], [1.0, 0, 0, 0]]
    )
    cap2img = np.array([0, 0, 1, 1, 2, 2])
    captions = [f"c{j}" for j in range(6)]
    out = retrieval_examples(img, cap, cap2img, captions, ["a", "b", "c"], n_queries=6, top_k=5)
    cols, rows = out["text_to_image"]
    assert cols[3:] == ["top 1", "top 2", "top 3"]  # top_k capped by the number of items
    assert rows[0][:4] == ["c0", "a", 1, f"{HIT} a"]
    # c5's ground truth c scores 0, tied with b: the tie counts against the query (rank 3)
    assert rows[5][:4] == ["c5", "c", 3, "a"]
    assert sum(c.startswith(HIT) for c in rows[5][3:]) == 1
    cols, rows = out["image_to_text"]
    assert len(cols) == 3 + 5 and [r[0] for r in rows] == ["a", "b", "c"]
    assert rows[2][1] == "c4" and rows[2][2] == 1 and rows[2][3] == f"{HIT} c4"
    assert all(len(r) == 8 for r in rows)


def test_callbacks_do_nothing_without_wandb_logger() -> None:
    class Module:
        visual_pool = create_pooling(name="gpo", dim=8).eval()
        text_pool = create_pooling(name="max", dim=8)
        evaluated = {"test": RankedEmbeddings(torch.eye(2), torch.eye(2), torch.tensor([0, 1]))}

    trainer = SimpleNamespace(
        loggers=[], sanity_checking=False, is_global_zero=True, current_epoch=0, datamodule=None
    )
    PoolingWeightsPlot().on_validation_epoch_end(trainer, Module())  # no W&B logger: no-op
    RetrievalExamples().on_test_end(trainer, Module())
    log_final_summary(trainer, {"full": {"rsum": 1.0}})
    curves = PoolingWeightsPlot(sizes={"visual": 5}).curves(trainer, Module())
    assert list(curves) == ["visual"] and curves["visual"].shape == (5,)
    assert float(curves["visual"].sum()) == pytest.approx(1.0, abs=1e-6)


def test_settings_outside_hydra_and_non_wandb_loggers(tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {
            "name": "demo",
            "seed": 3,
            "logger": {
                "csv": {
                    "_target_": "pytorch_lightning.loggers.CSVLogger",
                    "save_dir": str(tmp_path),
                }
            },
        }
    )
    settings = wandb_settings_from_hydra(cfg)
    assert settings["group"] == "demo" and settings["name"].startswith("demo-")
    assert settings["tags"] == [] and settings["config"]["seed"] == 3
    (csv,) = instantiate_loggers(cfg)
    assert type(csv).__name__ == "CSVLogger"
