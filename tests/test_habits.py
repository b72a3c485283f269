"""The lightning-hydra-template habits: debug modes, limited batches, seed=null, tags, early
stopping, eval ckpt_path=, the printed config, the run's log file, and sweeps that optimise the
validation rsum (never a test metric)."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ENV, POOL, WORDS, compose_cfg, tiny_model, write_job
from omegaconf import OmegaConf

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics import evaluate
from gpo_lit.train import train

ROOT = Path(__file__).resolve().parents[1]
# The tiny demo of tests/test_train_eval.py: 240 / 60 / 80 scenes × 5 captions, evaluation
# batches of 50 (so a limited evaluation's subset is easy to work out by hand).
TINY = [
    "experiment=demo",
    "++data.demo.n_train=240",
    "++data.demo.n_dev=60",
    "++data.demo.n_test=80",
    "data.batch_size=32",
    "data.eval_batch_size=50",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "print_config=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")  # the demo is generated there once, by the first run


def tiny_cfg(run_dir: Path, data_dir: Path, *overrides: str):
    return compose_cfg(
        "train", *TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={run_dir}", *overrides
    )


def csv_column(run_dir: Path, name: str) -> list[float]:
    """Every logged value of metric ``name`` in the run's csv/metrics.csv, in order."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


# ---- evaluation on limited batches --------------------------------------------------------------
class FakeTrainer:
    world_size = 1
    limit_val_batches = 1.0
    limit_test_batches = 2  # an int: a number of batches

    def __init__(self, split) -> None:
        self.datamodule = SimpleNamespace(eval_split=lambda stage: split)


def feed(model, embed) -> None:
    """Hand ``[[(idx, emb), ...] images, [...] captions]`` to the model's evaluation metric."""
    for which, batches in enumerate(embed):
        for idx, emb in batches:
            model.eval_embeddings.update(which, idx, emb)


def test_a_limited_evaluation_ranks_exactly_the_embedded_images_and_captions() -> None:
    """6 images × 2 captions; images 0-3 and captions 0-4 embedded. Kept: captions 0-4 (caption 4
    is image 2's) and images 0-2 (image 3 has no embedded caption) — compared with the metrics of
    those embeddings sliced by hand."""
    model = tiny_model()
    split = SimpleNamespace(n_images=6, n_captions=12, cap2img=np.repeat(np.arange(6), 2))
    model._trainer = FakeTrainer(split)  # noqa: SLF001 - world size, limits, the split
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    cap = F.normalize(torch.randn(12, 4, generator=g), dim=-1)
    embed = [[(torch.arange(4), img[:4])], [(torch.tensor([3, 0, 1, 2, 4]), cap[[3, 0, 1, 2, 4]])]]
    feed(model, embed)
    expected = evaluate(img[:3], cap[:5], torch.tensor([0, 0, 1, 1, 2]), protocol="full")
    assert model._finish_eval("test") == {"full": {**expected, "n_images": 3, "n_captions": 5}}
    # A fold protocol needs the whole split: the subset is ranked at once (and says its size).
    model.eval_cfg = {**model.eval_cfg, "test_protocols": ["coco_1k"]}
    feed(model, embed)
    assert model._finish_eval("test")["coco_1k"] == {**expected, "n_images": 3, "n_captions": 5}
    # Without a limit a partial evaluation is a bug, not a subset.
    model._trainer.limit_test_batches = 1.0
    feed(model, embed)
    with pytest.raises(RuntimeError, match="4 of 6 images and 5 of 12 captions"):
        model._finish_eval("test")


def test_fast_dev_run_trains_and_tests(tmp_path: Path, data_dir: Path) -> None:
    """debug=fdr: one batch of each split. The test batch holds images 0-49 and captions 0-49
    (the captions of images 0-9): the metrics are those of 10 images and 50 captions, and the
    embeddings gpo-train saves (save_embeddings=true) are those 10 and 50."""
    result = train(tiny_cfg(tmp_path, data_dir, "debug=fdr", "save_embeddings=true"))
    assert result.test["full"]["n_images"] == 10 and result.test["full"]["n_captions"] == 50
    assert json.loads((tmp_path / "metrics.json").read_text()) == result.test
    # save_embeddings=true: what was ranked, which re-evaluates to the same numbers
    from gpo_lit.metrics import load_embeddings

    img, cap, cap2img = load_embeddings(tmp_path / "embeddings.npz")
    assert img.shape[0] == 10 and cap.shape[0] == 50
    again = {**evaluate(img, cap, cap2img, protocol="full"), "n_images": 10, "n_captions": 50}
    assert again == result.test["full"]
    assert not list(tmp_path.glob("checkpoints/best-*.ckpt"))  # fast_dev_run keeps no best
    assert result.best_val_rsum is not None and 0 < result.best_val_rsum <= 600


def test_limited_batches_rank_the_embedded_subset(tmp_path: Path, data_dir: Path) -> None:
    """debug=limit: 2 evaluation batches of 50 = all 60 dev / 80 test images but only captions
    0-99, those of images 0-19: validation and test rank 20 images and 100 captions."""
    result = train(tiny_cfg(tmp_path, data_dir, "debug=limit", "trainer.max_epochs=1"))
    assert result.test["full"]["n_images"] == 20 and result.test["full"]["n_captions"] == 100
    assert csv_column(tmp_path, "val/n_images") == [20.0]
    assert csv_column(tmp_path, "val/n_captions") == [100.0]
    assert result.best_val_rsum == pytest.approx(csv_column(tmp_path, "val/rsum")[0])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt"))


@pytest.mark.slow
def test_overfit_batches(tmp_path: Path, data_dir: Path) -> None:
    """debug=overfit: the same 3 (unshuffled) training batches every epoch, checkpoints kept;
    validation sees 3 dev batches: 150 captions, those of 30 images."""
    train(tiny_cfg(tmp_path, data_dir, "debug=overfit", "trainer.max_epochs=2"))
    assert csv_column(tmp_path, "val/n_images") == [30.0, 30.0]
    assert list((tmp_path / "checkpoints").glob("best-*.ckpt"))


def test_profiler_debug_mode(tmp_path: Path, data_dir: Path, capfd, caplog) -> None:
    """debug=profiler: Lightning's simple profiler reports when fit ends (through its logger,
    which reaches the run's log file in a Hydra job)."""
    with caplog.at_level(logging.INFO):
        train(tiny_cfg(tmp_path, data_dir, "debug=profiler", "trainer.limit_train_batches=2",
                       "test_after_fit=false"))  # fmt: skip
    out, err = capfd.readouterr()
    assert "FIT Profiler Report" in out + err + caplog.text


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("default", {"max_epochs": 1, "accelerator": "cpu", "detect_anomaly": True}),
        ("fdr", {"fast_dev_run": True, "detect_anomaly": True}),
        ("overfit", {"overfit_batches": 3, "max_epochs": 20}),
        ("limit", {"limit_train_batches": 5, "limit_val_batches": 2, "limit_test_batches": 2}),
        ("profiler", {"profiler": "simple", "max_epochs": 1}),
        ("fast", {"limit_train_batches": 5, "max_epochs": 1}),
    ],
)
def test_debug_modes_compose(mode: str, expected: dict) -> None:
    cfg = compose_cfg("train", "experiment=demo", f"debug={mode}")
    assert {k: cfg.trainer.get(k) for k in expected} == expected
    if mode != "fast":
        assert cfg.task_name == "debug" and cfg.data.num_workers == 0


# ---- early stopping, the objective ---------------------------------------------------------------
def test_early_stopping_on_val_rsum(tmp_path: Path, data_dir: Path) -> None:
    """patience 1 with an improvement threshold no epoch can reach: the first validation sets the
    best, the second does not improve on it, training stops after 2 of 4 epochs. The objective a
    sweep gets is the best of the validation rsums logged."""
    assert "early_stopping" not in compose_cfg("train", "experiment=demo").callbacks  # off
    cfg = tiny_cfg(
        tmp_path,
        data_dir,
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1000",
        "trainer.max_epochs=4",
        "test_after_fit=false",
    )
    result = train(cfg)
    val = csv_column(tmp_path, "val/rsum")
    assert len(val) == 2
    assert result.best_val_rsum == pytest.approx(max(val)) and result.test == {}


# ---- seed=null, tags, the printed config, train.log, warnings ------------------------------------
NOISE = ("litlogger", "LeafSpec", "multiple `ModelCheckpoint`", "`weights_only` was not set")


@pytest.mark.slow
def test_run_log_seed_null_tags_and_no_noise(tmp_path: Path, data_dir: Path) -> None:
    """A run with seed=null and tags, through the entry point: the drawn seed is logged and stored
    (.hydra/config.yaml, the checkpoint's run config) and repeats the run exactly; the config tree
    is printed; train.log holds the run's log; none of the known noise is printed."""
    run_dir = tmp_path / "run"
    args = [a for a in TINY if a != "print_config=false"]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpo_lit.train",
            *args,
            "seed=null",
            "tags=[smoke,habits]",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={run_dir}",
        ],  # fmt: skip
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    output = res.stdout + res.stderr
    for noise in NOISE:
        assert noise not in output
    assert "config\n├── data" in res.stdout and "└── " in res.stdout  # the Rich tree
    seed = OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed
    assert isinstance(seed, int)
    log = (run_dir / "train.log").read_text()
    assert f"seed=null: seed {seed} (drawn); repeat this run with seed={seed}" in log
    assert "Seed set to" in log and "tags: smoke, habits" in log
    assert "best val/rsum:" in log and "test metrics of" in log
    real = "smaller than the logging interval"  # a real warning (3 batches, logging every 10)
    assert real in res.stderr and real in log
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    stored = torch.load(best, map_location="cpu", weights_only=True)["gpo_lit_config"]
    assert stored["seed"] == seed and stored["tags"] == ["smoke", "habits"]
    # The stored seed repeats the run.
    again = train(tiny_cfg(tmp_path / "again", data_dir, f"seed={seed}"))
    assert again.test == json.loads((run_dir / "metrics.json").read_text())


def test_known_noise_is_silenced_and_nothing_else(caplog) -> None:
    """The two filters match their own message and origin only."""
    import warnings

    from gpo_lit.console import quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one log filter
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert sum(getattr(f, "name", "") == "gpo_lit.quiet" for f in rank_zero.filters) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()  # in front of "always"
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use …", FutureWarning, 1)
        warnings.warn("something else is deprecated", FutureWarning, 1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    tip = "💡 Tip: For seamless cloud logging, try installing [litlogger](https://…)"
    assert not rank_zero.filter(logging.makeLogRecord({"msg": tip, "name": rank_zero.name}))
    assert rank_zero.filter(logging.makeLogRecord({"msg": "GPU available: False"}))


def test_config_tree_printed_unless_turned_off(capsys) -> None:
    from gpo_lit.cli import report_errors

    task = report_errors(lambda cfg: "done")
    cfg = compose_cfg("train", "experiment=demo", "paths.output_dir=unused")
    assert task(cfg) == "done"
    out = capsys.readouterr().out
    assert out.startswith("config\n") and "├── data" in out and "├── model" in out
    assert "gpo_lit.data.datamodule.RetrievalDataModule" in out  # the YAML inside
    cfg = compose_cfg("train", "experiment=demo", "paths.output_dir=unused", "print_config=false")
    assert task(cfg) == "done" and capsys.readouterr().out == ""


def test_run_tags_lead_the_wandb_tags() -> None:
    from gpo_lit.wandb_utils import wandb_settings_from_hydra

    cfg = OmegaConf.create({"name": "demo", "seed": 0, "tags": ["smoke", "x" * 65, "smoke"]})
    assert wandb_settings_from_hydra(cfg)["tags"] == ["smoke"]  # no repeats, none too long


def test_report_lists_the_tags(tmp_path: Path) -> None:
    from gpo_lit import report as rp

    for num, tags in enumerate((["a", "b"], ["b", "c"])):
        job = write_job(tmp_path, num, ["experiment=demo"], num, POOL["max"], base=30.0)
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        cfg.tags = tags
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    assert "\nTags: `a`, `b`, `c`\n" in rp.build_report(tmp_path).markdown


# ---- eval ckpt_path= -----------------------------------------------------------------------------
def test_eval_ckpt_path_is_an_alias_of_ckpt() -> None:
    from gpo_lit.eval import checkpoints

    def cfg(**kw):
        return OmegaConf.create({"ckpt": None, "ckpt_path": None, **kw})

    assert checkpoints(cfg(ckpt_path="a.ckpt")) == ["a.ckpt"]
    assert checkpoints(cfg(ckpt="a.ckpt")) == ["a.ckpt"]
    assert checkpoints(cfg(ckpt="a.ckpt", ckpt_path="a.ckpt")) == ["a.ckpt"]
    assert checkpoints(cfg(ckpt_path=["a.ckpt", "b.ckpt"])) == ["a.ckpt", "b.ckpt"]
    with pytest.raises(GpoLitError, match="ckpt_path: expected the same checkpoint"):
        checkpoints(cfg(ckpt="a.ckpt", ckpt_path="b.ckpt"))
    with pytest.raises(GpoLitError, match="found none"):
        checkpoints(cfg())
    assert checkpoints(cfg(ckpt="", ckpt_path="a.ckpt")) == ["a.ckpt"]  # make eval ckpt_path=…
    composed = compose_cfg("eval", "ckpt_path=x.ckpt", "paths.output_dir=unused")
    assert checkpoints(composed) == ["x.ckpt"] and composed.print_config is True


# ---- an Optuna search on the validation rsum -----------------------------------------------------
@pytest.mark.slow
def test_make_sweep_optuna_search_optimises_validation_rsum(tmp_path: Path, data_dir: Path):
    """`make sweep EXP=demo hparams_search=pooling_optuna`, 3 debug-sized trials: the best value
    Optuna records is the best validation rsum of the trials (read from their CSV logs), GPO's
    temperature is searched exactly where GPO is drawn, and `make report` reads the sweep."""
    sweep = tmp_path / "sweep"
    overrides = [a for a in TINY if a != "experiment=demo"] + [
        "hydra.sweeper.n_trials=3",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    res = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "sweep",
            "EXP=demo",
            "hparams_search=pooling_optuna",
            f"PY={sys.executable}",
            *overrides,
        ],  # fmt: skip
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3
    best_val = []
    for job in jobs:
        best_val.append(max(csv_column(job, "val/rsum")))
        assert (job / "metrics.json").is_file()  # tested, but the test is not the objective
        overrides_of = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
        for modality in ("visual", "text"):
            (pool,) = [o for o in overrides_of if o.startswith(f"model/pooling@model.{modality}")]
            searched = any(
                o.startswith(f"model.{modality}_pooling.temperature=") for o in overrides_of
            )
            assert searched == pool.endswith("=gpo")
    found = OmegaConf.load(sweep / "optimization_results.yaml")
    assert found.best_value == pytest.approx(max(best_val), abs=1e-4)
    report = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "report",
            f"SWEEP_DIR={sweep}",
            f"PY={sys.executable}",
        ],  # fmt: skip
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Optuna search (optimization_results.yaml): best validation rsum" in report.stdout
    assert (sweep / "report" / "rsum.png").is_file()


# ---- threads and progress ------------------------------------------------------------------------
def test_eval_uses_the_runs_num_threads(tmp_path: Path, monkeypatch) -> None:
    """gpo-eval sets torch's threads as the training run did (its stored num_threads), unless
    num_threads= is given; read before any data is opened."""
    import gpo_lit.eval as ev

    model = tiny_model()
    ckpt = tmp_path / "m.ckpt"
    config = {"num_threads": 3, "data": {"root": str(tmp_path / "nodata")}}
    hparams = dict(model.hparams) | {"vocab": WORDS}
    torch.save(
        {"hyper_parameters": hparams, "state_dict": model.state_dict(), "gpo_lit_config": config},
        ckpt,
    )
    calls = []

    class Stop(Exception):
        pass

    def record(n: int) -> None:
        calls.append(n)
        raise Stop

    monkeypatch.setattr(ev.torch, "set_num_threads", record)
    base = {"data_root": None, "split": None, "protocols": None, "num_workers": 0}
    for given, expected in ((None, 3), (2, 2)):
        with pytest.raises(Stop):
            ev.evaluate_one(str(ckpt), OmegaConf.create({**base, "num_threads": given}),
                            tmp_path / "out", save_embeddings=False)  # fmt: skip
        assert calls[-1] == expected
    assert compose_cfg("train", "experiment=demo_video").num_threads == 1  # as experiment=demo


def test_demo_generators_show_progress(tmp_path: Path, capsys) -> None:
    from gpo_lit.data.demo.images import generate_demo_images
    from gpo_lit.data.demo.regions import generate_demo

    generate_demo(tmp_path / "regions", n_train=4, n_dev=2, n_test=3, feat_dim=6)
    err = capsys.readouterr().err
    assert "demo data: scenes" in err and "4/4" in err and "3/3" in err
    generate_demo_images(tmp_path / "images", n_train=3, n_dev=2, n_test=2, image_size=16)
    err = capsys.readouterr().err
    assert "demo images: train" in err and "3/3" in err and "demo images: test" in err
