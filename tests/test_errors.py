"""Everyday mistakes end in one line (``error: <key or file>: expected …, found …``, exit 2) before
any long work, also inside DataLoader workers, and nothing already written changes.

Each case runs the entry point's own function in-process through ``report_errors`` (what the
command line runs) on a tiny generated precomp data set.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg, make_image_tree, one_line_error, run, task_error
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from gpo_lit.data.datasets import ImageDataset
from gpo_lit.data.demo.regions import generate_demo
from gpo_lit.data.formats.images import ImageSplit
from gpo_lit.data.sampling import EpochShuffleSampler
from gpo_lit.divergence import LossWatch
from gpo_lit.errors import GpoLitError
from gpo_lit.eval import evaluate_checkpoint
from gpo_lit.extract import extract
from gpo_lit.train import build_vocab, train

DIM = 16  # feature width of the tiny data set


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(root, n_train=240, n_dev=60, n_test=80, n_regions=20, feat_dim=DIM)
    return root


@pytest.fixture
def data(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny data set (tests break its files)."""
    return Path(shutil.copytree(demo_root, tmp_path / "data"))


def train_overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        "experiment=demo",
        f"data.root={data}",
        "data.demo=null",
        f"model.visual.in_dim={DIM}",
        "model.embed_dim=16",
        "model.visual.mlp_hidden=16",
        "data.batch_size=32",
        "data.eval_batch_size=50",
        "trainer.max_epochs=1",
        "++trainer.enable_progress_bar=false",
        f"paths.output_dir={run_dir}",
    ]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder that already holds an earlier run's files (a resume in place)."""
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    (d / "metrics.json").write_text('{"full": {"rsum": 1.0}}\n')
    return d


@pytest.fixture
def no_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The errors must come before training (and testing) starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the error came after the work started")

    monkeypatch.setattr(pl.Trainer, "fit", refuse)
    monkeypatch.setattr(pl.Trainer, "test", refuse)


def train_error(data: Path, run_dir: Path, capsys, *overrides: str) -> str:
    before = snapshot(run_dir)
    msg = task_error(
        train, compose_cfg("train", *train_overrides(data, run_dir), *overrides), capsys
    )
    assert snapshot(run_dir) == before  # nothing written, nothing changed
    return msg


# -- item 7: config values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "start", "found"),
    [
        ("data.batch_size=0", "data.batch_size: expected a positive integer", "found 0"),
        ("data.batch_size=-1", "data.batch_size: expected a positive integer", "found -1"),
        ("data.batch_size=abc", "data.batch_size: expected a positive integer", "found 'abc'"),
        ("optim.lr=-1", "optim.lr: expected a positive learning rate", "found -1"),
        ("seed=abc", "seed: expected null (draw one) or an integer", "found 'abc'"),
        ("trainer.max_epochs=0", "trainer.max_epochs: expected a positive number", "found 0"),
        ("evaluation.test_protocols=[nosuch]", "evaluation.test_protocols: expected", "['nosuch']"),
        ("data.eval_batch_size=0", "data.eval_batch_size: expected a positive integer", "0"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches: expected", "found 0"),
        ("data.prefetch_factor=0", "data.prefetch_factor: expected null or a positive", "0"),
        ("data.augment.region_keep_prob=0", "data.augment.region_keep_prob: expected", "found 0"),
        ("data.augment.region_keep_prob=1.5", "data.augment.region_keep_prob: expected", "1.5"),
        ("data.augment.region_keep_prob=abc", "data.augment.region_keep_prob: expect", "'abc'"),
        ("data.augment.word_prob=1.5", "data.augment.word_prob: expected a probability", "1.5"),
        ("data.augment.word_prob=-0.1", "data.augment.word_prob: expected a probability", "-0.1"),
        ("data.augment.word_mask_prob=0.95", "data.augment.word_random_prob: expected", "0.1"),
        ("tags=5", "tags: expected a list of labels", "found 5"),
    ],
)
def test_bad_config_value_is_one_line(
    data, run_dir, capsys, no_fit, override: str, start: str, found: str
) -> None:
    msg = train_error(data, run_dir, capsys, override)
    assert msg.startswith(f"error: {start}") and msg.endswith(found)


@pytest.mark.parametrize(
    ("override", "found"),
    [("trainer.devices=0", "devices=0"), ("trainer.precision=13", "Precision 13 is invalid")],
)
def test_a_trainer_setting_lightning_refuses_is_one_line(
    data, tmp_path, capsys, no_fit, override: str, found: str
) -> None:
    fresh = tmp_path / "fresh_run"
    msg = task_error(train, compose_cfg("train", *train_overrides(data, fresh), override), capsys)
    assert msg.startswith("error: trainer: expected settings Lightning's Trainer accepts, found ")
    assert found in msg


def test_bad_value_on_the_command_line_leaves_the_run_folder_alone(
    data, run_dir, capsys, monkeypatch
) -> None:
    """The entry point checks values before Hydra writes its config into the run folder."""
    from gpo_lit import train as train_module

    before = snapshot(run_dir)
    argv = ["gpo-train", *train_overrides(data, run_dir)[:-1], "data.batch_size=abc"]
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as info:
        train_module.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: data.batch_size: expected a positive integer")
        and err.count("\n") == 1
    )
    assert snapshot(run_dir) == before and not (run_dir / ".hydra").exists()


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("gpo_lit.train", ["experiment=demo", "hydra.run.dir={file}/run"]),
        ("gpo_lit.report", ["sweep_dir={file}"]),  # the report folder: <sweep_dir>/report
        ("gpo_lit.report", ["sweep_dir={tmp}", "out_dir={file}"]),
    ],
)
def test_a_run_folder_that_is_a_file_is_one_line(tmp_path: Path, capsys, monkeypatch,
                                                 module: str, args: list[str]) -> None:  # fmt: skip
    """Hydra would make the folder with a traceback; the entry point refuses it first."""
    import importlib

    file = tmp_path / "file"
    file.write_text("mine")
    argv = [a.format(file=file, tmp=tmp_path) for a in args]
    monkeypatch.setattr(sys, "argv", [module, *argv])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: hydra.run.dir: expected a folder, found a file, {file}\n"
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("set_sizes.visual=abc", "set_sizes.visual: expected null or a set size (a positive "
                                 "integer), found 'abc'"),
        ("theta_sizes.text=0", "theta_sizes.text: expected null or a set size (a positive "
                               "integer), found 0"),
        ("overwrite=maybe", "overwrite: expected true or false, found 'maybe'"),
    ],
)  # fmt: skip
def test_bad_report_values_are_one_line(tmp_path: Path, capsys, monkeypatch, override: str,
                                        expected: str) -> None:  # fmt: skip
    from gpo_lit import report

    monkeypatch.setattr(sys, "argv", ["gpo-report", f"sweep_dir={tmp_path}", override])
    with pytest.raises(SystemExit) as info:
        report.main()
    assert info.value.code == 2 and capsys.readouterr().err == f"error: {expected}\n"
    assert list(tmp_path.iterdir()) == []  # no report folder made


@pytest.mark.slow  # a subprocess: the interpolations resolve inside the Hydra job only
def test_unresolvable_interpolation_is_one_line(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        "data.root=${nosuch}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert one_line_error(res) == "error: data.root: expected a value, found Interpolation key " \
        "'nosuch' not found"  # fmt: skip


def test_batch_larger_than_the_training_split_is_refused(data, run_dir, capsys, no_fit) -> None:
    msg = train_error(data, run_dir, capsys, "data.batch_size=1201")
    assert msg == (
        f"error: data.batch_size: expected at most the 1200 training captions of "
        f"{data / 'train_ims.npy'} (every training step takes a full batch), found 1201"
    )


def test_eval_and_extract_values_are_checked_first(tmp_path: Path, capsys) -> None:
    cfg = compose_cfg("eval", f"ckpt={tmp_path / 'a.ckpt'}", "protocols=[nosuch]",
                      f"paths.output_dir={tmp_path / 'e'}")  # fmt: skip
    msg = task_error(evaluate_checkpoint, cfg, capsys)
    assert msg.startswith("error: protocols: expected null or a list of protocol names")
    cfg = compose_cfg("extract", "experiment=demo_grid", "extract.batch_size=0",
                      f"paths.data_dir={tmp_path / 'd'}")  # fmt: skip
    assert task_error(extract, cfg, capsys) == (
        "error: extract.batch_size: expected a positive integer, found 0"
    )
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


# -- item 3: every split checked before the first step -------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def nan_row(path: Path, row: int) -> None:
    a = np.load(path)
    a[row, 2, 3] = np.nan
    np.save(path, a)


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (lambda d: (d / "dev_ims.npy").unlink(), "dev_ims.npy: expected a file"),
        (lambda d: truncate(d / "test_ims.npy"), "test_ims.npy: expected 102400 bytes of data"),
        (lambda d: nan_row(d / "test_ims.npy", 71), "test_ims.npy: expected finite features in row 71"),
        (lambda d: nan_row(d / "dev_ims.npy", 3), "dev_ims.npy: expected finite features in row 3"),
        (lambda d: np.save(d / "dev_ims.npy", np.zeros((60, 20, 8), np.float32)),
         f"dev_ims.npy: expected features of width {DIM} (as "),
        (lambda d: np.save(d / "test_ims.npy", np.zeros((80, 20, 8), np.float32)),
         f"test_ims.npy: expected features of width {DIM} (as "),
    ],
)  # fmt: skip
def test_bad_dev_or_test_split_is_found_before_training(
    data, run_dir, capsys, no_fit, breaks, expected: str
) -> None:
    breaks(data)
    msg = train_error(data, run_dir, capsys)
    assert msg.startswith(f"error: {data}/{expected}"), msg


def test_feature_width_other_than_the_model_blames_the_config(data, run_dir, capsys, no_fit):
    msg = train_error(data, run_dir, capsys, "model.visual.in_dim=32")
    assert msg == (
        f"error: model.visual.in_dim: expected {DIM} (the feature width of "
        f"{data / 'train_ims.npy'}), found 32"
    )


def test_fold_protocol_on_too_few_images_is_found_before_training(data, run_dir, capsys, no_fit):
    msg = train_error(data, run_dir, capsys, "evaluation.test_protocols=[coco_1k]")
    assert msg == (
        "error: protocol coco_1k: expected 5000 images (5 folds × 1000), found 80 in the test "
        f"split {data / 'test_ims.npy'} (protocol full ranks a split of any size)"
    )


def test_untested_run_does_not_read_the_test_split(data, run_dir) -> None:
    (data / "test_ims.npy").unlink()
    over = ["test_after_fit=false", "trainer.limit_train_batches=2", "logger=none"]
    assert train(compose_cfg("train", *train_overrides(data, run_dir), *over)).test == {}


def fake_checkpoint(data: Path, tmp_path: Path) -> Path:
    """A checkpoint of an untrained tiny model trained on ``data`` (its run config included)."""
    cfg = compose_cfg("train", *train_overrides(data, tmp_path / "unused"))
    dm = instantiate(cfg.data)
    vocab = build_vocab(cfg, dm)
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab)
    path = tmp_path / "model.ckpt"
    torch.save(
        {
            "hyper_parameters": dict(model.hparams) | {"vocab": vocab},
            "state_dict": model.state_dict(),
            "gpo_lit_config": OmegaConf.to_container(cfg, resolve=True),
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "split=dev",
            f"dev_ims.npy: expected features of width {DIM} (the model.visual.in_dim of ",
        ),
        (
            "protocols=[coco_1k]",
            "protocol coco_1k: expected 5000 images (5 folds × 1000), found 80 in split 'test' of",
        ),
    ],
)
def test_eval_checks_its_split_before_embedding(
    data, tmp_path, capsys, no_fit, override: str, expected: str
) -> None:
    ckpt = fake_checkpoint(data, tmp_path)
    np.save(data / "dev_ims.npy", np.zeros((60, 20, 8), np.float32))
    out = tmp_path / "eval"
    cfg = compose_cfg("eval", f"ckpt={ckpt}", override, f"paths.output_dir={out}")
    msg = task_error(evaluate_checkpoint, cfg, capsys)
    assert expected in msg and str(data) in msg
    assert not out.exists()


# -- item 7: files -------------------------------------------------------------------------------


def test_object_dtype_split_says_so(data, run_dir, capsys, no_fit) -> None:
    np.save(data / "dev_ims.npy", np.array([None] * 60, dtype=object), allow_pickle=True)
    msg = train_error(data, run_dir, capsys)
    assert msg == (
        f"error: {data / 'dev_ims.npy'}: expected an array of numbers (read without "
        "unpickling), found dtype object (pickled Python objects)"
    )


@pytest.mark.parametrize("name", ["test_caps.txt", "dev_ims.npy"])
def test_folder_instead_of_a_file_says_so(data, run_dir, capsys, no_fit, name: str) -> None:
    (data / name).unlink()
    (data / name).mkdir()
    msg = train_error(data, run_dir, capsys)
    assert msg.startswith(f"error: {data / name}: expected a file (") and msg.endswith(
        "found a folder"
    )


def bomb_png(path: Path, side: int = 20_000) -> None:
    """A valid PNG header announcing side² pixels (over PIL's limit) with a one-row body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" + b"\x00" * (side // 8))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_decompression_bomb_is_a_bad_image(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "d")
    strict = ImageSplit(root, "train", image_size=16)
    bomb_png(Path(strict.files[1]))  # the name says .jpg; PIL goes by the content
    with pytest.raises(Image.DecompressionBombError):
        Image.open(strict.files[1])  # it is one for PIL
    with pytest.raises(GpoLitError) as info:
        strict.image(1)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{strict.files[1]}: expected a readable image")
    assert "DecompressionBombError: Image size (400000000 pixels) exceeds limit" in msg
    lenient = ImageSplit(root, "train", image_size=16, skip_bad=True)
    assert np.array_equal(lenient.image(1), np.zeros((3, 16, 16), np.float32))
    assert lenient.train_image(1, np.random.default_rng(0)).shape == (3, 16, 16)
    assert lenient.n_bad == 2 and lenient.image(0).any()


# -- item 2: errors inside DataLoader workers ----------------------------------------------------


@pytest.mark.parametrize(
    ("breaks", "found"),
    [
        (lambda p: p.write_bytes(b"not an image"), "UnidentifiedImageError"),
        (bomb_png, "DecompressionBombError: Image size (400000000 pixels) exceeds limit of "),
    ],
)
def test_bad_image_in_a_worker_is_one_line(tmp_path: Path, capsys, breaks, found: str) -> None:
    root = make_image_tree(tmp_path / "d", n=6)
    split = ImageSplit(root, "train", image_size=16)
    breaks(Path(split.files[4]))

    def embed_all(_cfg) -> None:
        for _ in DataLoader(ImageDataset(split), batch_size=2, num_workers=2):
            pass

    msg = task_error(embed_all, None, capsys)
    assert msg.startswith(
        f"error: {split.files[4]}: expected a readable image (id {split.image_ids[4]}), found "
        f"{found}"
    )
    assert msg.endswith("(data.reader.skip_bad=true replaces bad images by the mean image)")


def first_training_image(n_captions: int = 1200, k: int = 5) -> int:
    """The image of the first training caption of epoch 0 (seed 0): read in the first batch."""
    index, _ = next(iter(EpochShuffleSampler(n_captions, seed=0)))
    return index // k


def test_nan_row_read_in_a_training_worker_is_one_line(data, run_dir, capsys) -> None:
    """A split too large to scan up front (here: scan_finite_bytes=0) is checked as read."""
    row = first_training_image()
    nan_row(data / "train_ims.npy", row)
    over = ["data.num_workers=2", "data.scan_finite_bytes=0", "logger=none"]
    (run_dir / "metrics.json").unlink()  # else refused up front: test metrics are never replaced
    before = snapshot(run_dir)
    msg = task_error(train, compose_cfg("train", *train_overrides(data, run_dir), *over), capsys)
    assert msg == (
        f"error: {data / 'train_ims.npy'}: expected finite features in row {row}, found 1 NaN/inf "
        "values"
    )
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_nan_row_in_a_worker_is_one_line_on_the_command_line(data, tmp_path) -> None:
    row = first_training_image()
    nan_row(data / "train_ims.npy", row)
    res = run(
        "gpo_lit.train",
        *train_overrides(data, tmp_path / "unused")[:-1],
        "data.num_workers=2",
        "data.scan_finite_bytes=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert one_line_error(res) == (
        f"error: {data / 'train_ims.npy'}: expected finite features in row {row}, found 1 NaN/inf "
        "values"
    )
    assert "Traceback" not in res.stderr and "DataLoader worker" not in res.stderr


# -- item 7: a diverging learning rate -----------------------------------------------------------


def test_diverging_lr_says_so_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys) -> None:
    run_dir = tmp_path / "fresh_run"
    steps = "callbacks.last_checkpoint.train_time_interval=null"  # steps instead of minutes
    over = ["optim.lr=1e6", steps, "callbacks.last_checkpoint.every_n_train_steps=1", "logger=none"]
    cfg = compose_cfg("train", *train_overrides(data, run_dir), *over)
    msg = task_error(train, cfg, capsys)
    head = (
        "error: optim.lr: expected a learning rate at which the training loss stays finite (try "
        "a lower optim.lr), found 1000000.0: "
    )
    assert msg.startswith(head), msg
    step = int(msg.split(" step ")[1].split()[0])
    assert msg[len(head) :] in (
        f"the loss diverged to NaN/inf at step {step} (epoch 0)",
        f"the weights became NaN/inf by step {step} (epoch 0); no checkpoint was written from them",
    )
    # every step saved last.ckpt until the divergence was seen: the last one is good
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < last["global_step"] <= step
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert not list((run_dir / "checkpoints").glob("best-*"))


def test_loss_watch_remembers_the_first_non_finite_step() -> None:
    watch = LossWatch(lr=0.5)
    watch.check()  # nothing seen yet
    for step in range(3):
        watch.update(torch.tensor(1.0 + step), step, epoch=0)
    watch.check()
    watch.check_weights({"w": torch.ones(3), "n": torch.tensor([1, 2])}, 3, 0)
    watch.update(torch.tensor(float("nan")), 3, epoch=1)
    watch.update(torch.tensor(float("inf")), 4, epoch=1)
    watch.update(torch.tensor(2.0), 5, epoch=2)
    with pytest.raises(
        GpoLitError, match=r"found 0.5: the loss diverged to NaN/inf at step 3 \(epoch 1\)$"
    ):
        watch.check()
    fresh = LossWatch(lr=0.5)
    with pytest.raises(GpoLitError, match=r"weights became NaN/inf by step 9 \(epoch 2\)"):
        fresh.check_weights({"w": torch.tensor([1.0, float("-inf")])}, 9, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_watch_does_not_sync_per_step() -> None:
    watch = LossWatch(lr=0.5)
    losses = torch.tensor([1.0, float("nan"), 2.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device → host wait raises
    try:
        for step in range(3):
            watch.update(losses[step], step, epoch=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(GpoLitError, match="at step 1 "):
        watch.check()
