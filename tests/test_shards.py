"""Webdataset tar shards (ShardSplit): format, bad samples, exact splitting over ranks × workers,
per-(seed, epoch) order, mid-epoch resume, one-line errors, and training on them."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line_error, run
from PIL import Image
from torch.utils.data import DataLoader

from gpo_lit.data.collate import Collate
from gpo_lit.data.datasets import Augment, PairDataset
from gpo_lit.data.demo.images import generate_demo_images
from gpo_lit.data.demo.shards import generate_demo_shards
from gpo_lit.data.formats.shards import ShardSplit, sample_key, write_shards
from gpo_lit.data.sampling import EpochShuffleSampler, ResumableDataLoader
from gpo_lit.data.tokenize import CaptionTokenizer
from gpo_lit.errors import GpoLitError, MissingFileError, one_line

wds = pytest.importorskip("webdataset")

SMALL = {"n_train": 24, "n_dev": 6, "n_test": 6, "image_size": 32, "samples_per_shard": 5}


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_shards(tmp_path_factory.mktemp("shards") / "demo", **SMALL)


class Words(CaptionTokenizer):
    """Word ids by hash: enough for loaders (no vocabulary needed)."""

    def __init__(self) -> None:
        self.pad_id, self.mask_id, self.vocab_size = 0, 1, 50
        self.perturb_specials_default = False

    def encode(self, text: str):
        ids = [2 + hash(w) % 48 for w in text.split()]
        return ids, list(range(len(ids)))


def test_sample_key_is_webdatasets_convention() -> None:
    assert sample_key("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert sample_key("x.seg.PNG") == ("x", "seg.png")
    assert sample_key("noext") == ("noext", "")


def test_reads_what_webdataset_writes_and_skips_bad_samples(tmp_path: Path, caplog) -> None:
    good = [(f"s{i:03d}", (30 * i, 200 - 20 * i, 90)) for i in range(5)]
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:  # the ecosystem's own writer
        w.write({"__key__": good[0][0], "jpg": jpeg(good[0][1]), "txt": "a red ball"})
        w.write({"__key__": good[1][0], "png": png(good[1][1]),
                 "json": {"caption": "from json", "url": "u"}})  # fmt: skip
        w.write({"__key__": "nocap", "jpg": jpeg((1, 2, 3)), "json": {"url": "u"}})
        w.write({"__key__": "noimg", "txt": "orphan caption", "json": {"status": "failed"}})
        w.write({"__key__": "garbage", "jpg": b"not an image at all" * 10, "txt": "bad"})
        w.write({"__key__": "emptycap", "jpg": jpeg((5, 5, 5)), "txt": "  "})
    with wds.TarWriter(str(tmp_path / "train-000001.tar")) as w:
        w.write({"__key__": good[2][0], "webp": b"", "jpg": jpeg(good[2][1]),
                 "json": {"captions": ["one", "two"]}, "txt": "ignored: json lists captions"})  # fmt: skip
        w.write({"__key__": "badjson", "jpg": jpeg((9, 9, 9)), "json": b"{not json"})
        for key, c in good[3:]:
            w.write({"__key__": key, "jpg": jpeg(c), "txt": f"caption of {key}"})
    with caplog.at_level(logging.INFO, logger="gpo_lit.data.formats.shards"):
        split = ShardSplit(tmp_path, "train", image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert split.image_ids == [k for k, _ in good]
    assert split.captions == ["a red ball", "from json", "one", "two", "caption of s003",
                              "caption of s004"]  # fmt: skip
    assert split.cap2img.tolist() == [0, 1, 2, 2, 3, 4]
    sk = split.skipped
    assert (sk.no_image, sk.no_caption, sk.bad_json, sk.bad_header) == (1, 2, 1, 1)
    [summary] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "5 samples, 6 captions in 2 shards; skipped 5 bad samples" in summary
    assert "1 without an image, 2 without a caption, 1 unreadable JSON, 1 unrecognised" in summary
    # pixels: the evaluation view is the image resized to 16×16, scaled to [0, 1]
    for i, (_, colour) in enumerate(good):
        x = split.image(i)
        assert x.shape == (3, 16, 16) and x.dtype == np.float32
        np.testing.assert_allclose(x.mean(axis=(1, 2)), np.array(colour) / 255, atol=0.03)


def test_non_string_captions_are_no_captions_and_repeated_keys_are_refused(
    tmp_path: Path,
) -> None:
    """``"captions": [null]`` is not the caption "None"; a key in two shards (a shard copied
    under another name) would make one image two candidates of every query."""
    with wds.TarWriter(str(tmp_path / "test-000000.tar")) as w:
        w.write({"__key__": "a", "jpg": jpeg((10, 20, 30)), "json": {"captions": ["a cat", None]}})
        w.write({"__key__": "b", "jpg": jpeg((30, 20, 10)), "json": {"captions": [7]}})
        w.write({"__key__": "c", "jpg": jpeg((90, 90, 90)), "txt": "a dog"})
    split = ShardSplit(tmp_path, "test", image_size=16)
    assert split.image_ids == ["c"] and split.captions == ["a dog"]
    assert split.skipped.no_caption == 2
    (tmp_path / "test-000001.tar").write_bytes((tmp_path / "test-000000.tar").read_bytes())
    with pytest.raises(GpoLitError) as info:
        ShardSplit(tmp_path, "test", image_size=16)
    assert str(info.value) == (
        f"{tmp_path / 'test-000001.tar'}: expected sample keys unique across the split's shards, "
        f"found key 'c' again (first in {tmp_path / 'test-000000.tar'})"
    )


def test_demo_shards_hold_the_demo_images_and_captions(tmp_path: Path, demo_shards) -> None:
    small = {k: v for k, v in SMALL.items() if k != "samples_per_shard"}
    images = generate_demo_images(tmp_path / "images", **small)
    for split, n in [("train", 24), ("dev", 6)]:
        shards = ShardSplit(demo_shards, split, image_size=32)
        assert len(shards.shards) == -(-n // 5) and shards.n_images == n
        assert (
            shards.captions
            == (images / "precomp" / f"{split}_caps.txt").read_text().split("\n")[:-1]
        )
        assert shards.cap2img.tolist() == [j // 5 for j in range(5 * n)]
        for i in (0, n - 1):
            key = shards.image_ids[i]
            assert shards.image_bytes(i) == (images / "images" / f"{key}.jpg").read_bytes()
    first = ShardSplit(demo_shards, "train", max_images=7)  # spans two shards
    assert first.image_ids == [f"demo-train-{i:05d}" for i in range(7)] and first.n_captions == 35
    again = generate_demo_shards(demo_shards, **SMALL)  # generate-once: nothing rewritten
    assert again == demo_shards
    with pytest.raises(GpoLitError, match="expected a demo with"):
        generate_demo_shards(demo_shards, **{**SMALL, "n_train": 25})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"mine")
    with pytest.raises(GpoLitError, match="no tar shards without"):
        generate_demo_shards(foreign, **SMALL)
    assert (foreign / "train-000000.tar").read_bytes() == b"mine"


def test_write_shards_never_overwrites(tmp_path: Path) -> None:
    sample = [("k0", jpeg((1, 2, 3)), "jpg", ["c"])]
    write_shards(sample, tmp_path / "x-%06d.tar", 1)
    before = (tmp_path / "x-000000.tar").read_bytes()
    with pytest.raises(GpoLitError, match="x-000000.tar: expected a new file"):
        write_shards(sample, tmp_path / "x-%06d.tar", 1)
    assert (tmp_path / "x-000000.tar").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar"]  # no temporary left


def seen(split: ShardSplit, epoch: int, rank: int, world: int, workers: int) -> list[int]:
    sampler = EpochShuffleSampler(split.n_captions, seed=7, rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    ds = PairDataset(split, Words(), Augment(region_keep_prob=None, word_prob=0.0), seed=7)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True,
                        collate_fn=Collate(0), num_workers=workers)  # fmt: skip
    return [j for batch in loader for j in batch["cap_idx"].tolist()]


def test_two_ranks_two_workers_see_every_sample_once_in_a_seeded_order(demo_shards) -> None:
    split = ShardSplit(demo_shards, "train", image_size=32)  # 120 captions in 5 shards
    epochs = {}
    for epoch in (0, 1):
        per_rank = [seen(split, epoch, r, 2, workers=2) for r in (0, 1)]
        assert [len(p) for p in per_rank] == [60, 60]  # equal batches per rank: no DDP hang
        both = per_rank[0] + per_rank[1]
        assert sorted(both) == list(range(120))  # every caption once, none twice
        assert per_rank == [seen(split, epoch, r, 2, workers=0) for r in (0, 1)]  # workers agree
        epochs[epoch] = both
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    assert epochs[0] != list(range(120))  # shuffled across shards


def test_mid_epoch_resume_skips_exactly_the_batches_done(demo_shards) -> None:
    split = ShardSplit(demo_shards, "train", image_size=32)
    ds = PairDataset(split, Words(), Augment(region_keep_prob=None, word_prob=0.2), seed=3)

    def loader(done: int) -> ResumableDataLoader:
        return ResumableDataLoader(ds, batches_done=lambda n: done, batch_size=8,
                                   sampler=EpochShuffleSampler(len(ds), seed=3),
                                   drop_last=True, collate_fn=Collate(0), num_workers=2)  # fmt: skip

    full = loader(0)
    full.sampler.set_epoch(2)
    uninterrupted = list(full)
    resumed = loader(5)
    resumed.load_state_dict({"epoch": 2})  # what Lightning does on restoring a mid-epoch ckpt
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 5
    for a, b in zip(rest, uninterrupted[5:], strict=True):
        assert torch.equal(a["cap_idx"], b["cap_idx"])
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["cap"], b["cap"])  # same crops


def corrupt_body_shard(tmp_path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)  # ~40 KB: half of it is past the header
    data = buf.getvalue()
    write_shards([("ok", jpeg((1, 200, 1)), "jpg", ["fine"]),
                  ("cut", data[: len(data) // 2], "jpg", ["header fine, body cut"])],
                 tmp_path / "train-%06d.tar", 10)  # fmt: skip
    return tmp_path


def test_image_corrupt_past_its_header_is_one_line_or_the_mean_image(tmp_path: Path) -> None:
    root = corrupt_body_shard(tmp_path)
    split = ShardSplit(root, "train", image_size=16)
    assert split.n_images == 2  # the header is fine: found only when decoded
    with pytest.raises(GpoLitError) as err:
        split.image(1)
    assert str(err.value).startswith(f"{root / 'train-000000.tar'}:cut: expected a readable image")
    ds = PairDataset(split, Words(), Augment(region_keep_prob=None, word_prob=0.0))
    loader = DataLoader(ds, batch_size=2, collate_fn=Collate(0), num_workers=1)
    with pytest.raises(GpoLitError) as err:
        next(iter(loader))
    assert "\n" not in one_line(err.value) and ":cut: expected a readable image" in one_line(
        err.value
    )
    lenient = ShardSplit(root, "train", image_size=16, skip_bad=True)
    assert not lenient.image(1).any() and lenient.n_bad == 1  # the mean image: 0 normalised
    assert lenient.image(0).any()


def test_malformed_shard_paths_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as err:
        ShardSplit(tmp_path / "nowhere", "train")
    assert str(err.value) == (
        f"{tmp_path / 'nowhere' / 'train-*.tar'}: expected webdataset tar shards of the train "
        "split (<key>.jpg|png|webp + <key>.txt|json per sample), found no matching file"
    )
    (tmp_path / "train-000000.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(GpoLitError, match=r"train-000000.tar: expected an uncompressed tar shard"):
        ShardSplit(tmp_path, "train")
    with tarfile.open(tmp_path / "gz-000000.tar", "w:gz") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(GpoLitError, match="expected an uncompressed tar shard, found ReadError"):
        ShardSplit(tmp_path, "gz")
    only_text = tmp_path / "t"
    assert write_shards([], only_text / "train-%06d.tar", 1) == []
    only_text.mkdir()
    with tarfile.open(only_text / "train-000000.tar", "w") as t:
        info = tarfile.TarInfo("k.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(GpoLitError, match="at least one sample with an image and a caption"):
        ShardSplit(only_text, "train")


@pytest.mark.slow
def test_train_with_a_bad_shard_path_is_one_line(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=demo_shards",
        f"data.root={tmp_path / 'missing'}",
        "data.demo=null",
        "data.reader.image_size=64",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert msg.startswith(f"error: {tmp_path / 'missing' / 'train-*.tar'}: expected webdataset")


@pytest.mark.slow
def test_training_on_shards_beats_the_untrained_model_of_the_same_seed(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gpo_lit.cli import CONF_DIR
    from gpo_lit.train import build_vocab, train

    overrides = [
        "experiment=demo_shards",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "++data.demo.n_train=80",
        "++data.demo.n_dev=20",
        "++data.demo.n_test=40",
        "++data.demo.samples_per_shard=25",
        "++data.demo.image_size=32",
        "data.batch_size=40",
        "data.eval_batch_size=40",
        "model.embed_dim=64",
        "trainer.max_epochs=3",
        "logger=[]",
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides)
    pl.seed_everything(cfg.seed, workers=True)  # as train() does before building the model
    dm = instantiate(cfg.data)
    dm.prepare_data()
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=build_vocab(cfg, dm))
    dm.set_tokenizer(model.tokenizer)
    tester = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    untrained = tester.test(model, datamodule=dm, verbose=False)[0]["test/full/rsum"]
    trained = train(cfg).test["full"]["rsum"]
    assert trained > untrained + 20, (trained, untrained)


def test_demo_shards_command_line(tmp_path: Path, capsys) -> None:
    from gpo_lit.data.demo.shards import main

    args = ["--root", str(tmp_path), "--n-train", "3", "--n-dev", "1", "--n-test", "1"]
    assert main([*args, "--image-size", "16", "--samples-per-shard", "2"]) == 0
    capsys.readouterr()  # the first run's progress bars
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "dev-000000.tar", "test-000000.tar", "train-000000.tar", "train-000001.tar"]  # fmt: skip
    assert main([*args, "--image-size", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: demo_shards image_size: expected at least")


@pytest.mark.slow
def test_any_grid_experiment_reads_shards_with_data_shards(demo_shards, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gpo_lit.cli import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=f30k_wsl", "data=shards", f"data.root={demo_shards}",
                                f"paths.output_dir={tmp_path}"])  # fmt: skip
    dm = instantiate(cfg.data)
    split = dm.split("dev")
    assert isinstance(split, ShardSplit) and split.n_images == 6 and split.image_size == 512
