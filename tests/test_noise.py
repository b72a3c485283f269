"""Noisy correspondences (``data.noise_ratio``, REFERENCE §12): exactly ⌊r·N⌋ training pairs
mismatched, deterministic from the seed, evaluation data untouched."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_DEMO, make_precomp_tree, run

from gpo_lit.data.datamodule import RetrievalDataModule
from gpo_lit.data.noise import mismatched_fraction, noisy_caption_map
from gpo_lit.data.tokenize import VocabTokenizer
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError


def five_each(n_images: int) -> np.ndarray:
    return np.arange(5 * n_images) // 5


@pytest.mark.parametrize(("n_images", "ratio"), [(97, 0.2), (40, 0.5), (13, 1.0), (6, 0.35)])
def test_exactly_floor_r_n_pairs_are_mismatched(n_images: int, ratio: float) -> None:
    cap2img = five_each(n_images)
    n = len(cap2img)
    mapping = noisy_caption_map(cap2img, ratio, seed=0)
    assert sorted(mapping.tolist()) == list(range(n))  # the captions are only moved around
    moved = mapping != np.arange(n)
    wrong = sum(cap2img[mapping[j]] != cap2img[j] for j in range(n))  # counted one by one
    assert wrong == moved.sum() == math.floor(ratio * n)
    assert mismatched_fraction(cap2img, mapping) == pytest.approx(wrong / n)


def test_deterministic_from_the_seed_and_spread_over_the_split() -> None:
    cap2img = five_each(1000)
    a = noisy_caption_map(cap2img, 0.5, seed=3)
    assert np.array_equal(a, noisy_caption_map(cap2img, 0.5, seed=3))
    assert not np.array_equal(a, noisy_caption_map(cap2img, 0.5, seed=4))
    moved = np.flatnonzero(a != np.arange(len(a)))
    # chosen slots lie all over the split, and a caption's new image is unrelated to its old one
    assert moved.min() < 50 and moved.max() > len(a) - 50
    assert abs(np.corrcoef(cap2img[moved], cap2img[a[moved]])[0, 1]) < 0.1
    assert np.array_equal(noisy_caption_map(cap2img, 0.0, seed=3), np.arange(len(a)))


def test_plain_permutation_as_pcmepp_leaves_some_pairs_right() -> None:
    cap2img = five_each(97)
    plain = noisy_caption_map(cap2img, 1.0, seed=0, derangement=False)
    assert sorted(plain.tolist()) == list(range(len(cap2img)))
    # ~5 of 485 slots get a caption of their own image by chance (each with probability 5/485)
    assert 0 < (cap2img[plain] == cap2img).sum() < 20


def test_impossible_or_bad_ratios_are_one_line() -> None:
    with pytest.raises(GpoLitError, match=r"data.noise_ratio: expected ⌊r·N⌋ = 2 captions") as e:
        noisy_caption_map(np.zeros(5, dtype=np.int64), 0.4, seed=0)  # one image: nowhere to go
    assert "\n" not in str(e.value)
    with pytest.raises(GpoLitError, match=r"data.noise_ratio: expected a fraction in \[0, 1\]"):
        RetrievalDataModule("unused", noise_ratio=1.5)


def shown_pairs(dm: RetrievalDataModule, split_name: str = "train") -> list[tuple[int, int]]:
    """(image of the slot, image the shown caption was written for) per training item, read
    back from the caption text ``caption j of image i``."""
    words = dm.tokenizer.vocab.idx2word
    pairs = []
    dataset = dm.train_dataloader().dataset
    for j in range(len(dataset)):
        item = dataset[(j, 0)]
        text = " ".join(words[t] for t in item["cap"][1:-1])
        pairs.append((item["img_idx"], int(re.search(r"image (\d+)", text).group(1))))
    return pairs


def datamodule(root: Path, ratio: float, seed: int = 0) -> RetrievalDataModule:
    augment = {"region_keep_prob": None, "word_prob": 0.0}
    dm = RetrievalDataModule(str(root), noise_ratio=ratio, augment=augment, seed=seed)
    captions = [f"caption {j} of image {i}" for j in range(60) for i in range(12)]
    dm.set_tokenizer(VocabTokenizer(Vocabulary.build(captions, min_count=1)))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_mismatches_training_pairs_only(tmp_path: Path) -> None:
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        make_precomp_tree(tmp_path, n=n, split=split)
    clean, noisy = datamodule(tmp_path, 0.0), datamodule(tmp_path, 0.2)
    assert all(a == b for a, b in shown_pairs(clean))
    pairs = shown_pairs(noisy)
    assert sum(a != b for a, b in pairs) == 12 == int(0.2 * 60)  # exactly 20 % of 60 pairs
    assert [a for a, _ in pairs] == [a for a, _ in shown_pairs(clean)]  # images untouched
    assert noisy.noise_mismatched == pytest.approx(0.2)
    assert pairs == shown_pairs(datamodule(tmp_path, 0.2))  # the same seed: the same noise
    assert pairs != shown_pairs(datamodule(tmp_path, 0.2, seed=1))
    for stage in ("val_dataloader", "test_dataloader"):
        for a, b in zip(getattr(clean, stage)(), getattr(noisy, stage)(), strict=True):
            items = [(x["idx"], x.get("cap"), None if "img" not in x else x["img"].tolist())
                     for x in a.dataset]  # fmt: skip
            assert items == [(x["idx"], x.get("cap"), None if "img" not in x else x["img"].tolist())
                             for x in b.dataset]  # fmt: skip


@pytest.mark.slow
def test_training_logs_the_mismatched_fraction(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *TINY_DEMO,
        "data.noise_ratio=0.2",
        "trainer.max_epochs=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = "data.noise_ratio=0.2: 240 of 1200 training captions (20.00 %) shown with another image"
    assert line in res.stdout + res.stderr and line in (run_dir / "train.log").read_text()
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("train/noise_mismatched")
    assert [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]] == [0.2]
    assert json.loads((run_dir / "metrics.json").read_text())["full"]["rsum"] > 0


def test_evaluation_never_reads_the_training_split(tmp_path: Path) -> None:
    make_precomp_tree(
        tmp_path, n=4, split="test"
    )  # no train split here, as on an evaluation machine
    dm = RetrievalDataModule(str(tmp_path), noise_ratio=0.2)
    dm.set_tokenizer(VocabTokenizer(Vocabulary.build(["caption of image"], min_count=1)))
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_dataloader()[1].dataset) == 20
