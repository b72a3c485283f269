"""Batch padding with reads straight into the batch and reused batch memory (data/collate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpo_lit.data.collate import BatchBuffers, Collate, pad_sets
from gpo_lit.data.datasets import Augment, PairDataset
from gpo_lit.data.formats.precomp import PrecompSplit
from gpo_lit.data.tokenize import VocabTokenizer
from gpo_lit.data.vocab import Vocabulary


def _brute_pad(sets: list[np.ndarray]) -> np.ndarray:
    n = max(len(s) for s in sets)
    out = np.zeros((len(sets), n, sets[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(sets):
        out[i, : len(s)] = s
    return out


def _write_split(root: Path, rows: int = 12, regions: int = 6, dim: int = 5) -> np.ndarray:
    feats = np.random.default_rng(0).standard_normal((rows, regions, dim)).astype(np.float32)
    np.save(root / "train_ims.npy", feats)
    (root / "train_caps.txt").write_text("".join(f"a red ball {i}\n" for i in range(rows)))
    return feats


def test_pad_sets_matches_brute_force_and_reuses_only_free_memory() -> None:
    rng = np.random.default_rng(1)
    sets = [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 1, 5, 2)]
    buffers = BatchBuffers(size=2)
    first, lengths = pad_sets([torch.from_numpy(s) for s in sets], buffers)
    np.testing.assert_array_equal(first.numpy(), _brute_pad(sets))
    assert lengths.tolist() == [3, 1, 5, 2]
    # while the first batch is held, a second one never shares its memory
    first[:] = 7.0
    second, _ = pad_sets([torch.from_numpy(s) for s in sets], buffers)
    assert second.data_ptr() != first.data_ptr()
    assert (first == 7.0).all()  # untouched by the second batch
    np.testing.assert_array_equal(second.numpy(), _brute_pad(sets))  # padding zeroed again
    view = second[:, :1]  # a view keeps the memory in use too
    ptr = first.data_ptr()
    del first, second
    third, _ = pad_sets([torch.from_numpy(s) for s in sets], buffers)
    assert third.data_ptr() == ptr  # the released buffer is reused
    assert third.data_ptr() != view.data_ptr()
    np.testing.assert_array_equal(third.numpy(), _brute_pad(sets))


def test_deferred_regions_give_the_same_batches(tmp_path: Path) -> None:
    """Training items read by the collate equal per-item tensors padded (augmentation
    included), and bool masks and index lists select the same rows as numpy indexing."""
    feats = _write_split(tmp_path)
    split = PrecompSplit(tmp_path, "train")
    tok = VocabTokenizer(Vocabulary.build(split.captions, min_count=1))
    collate = Collate(tok.pad_id)
    batches = []
    for deferred in (False, True):
        ds = PairDataset(split, tok, Augment(region_keep_prob=0.5), seed=3, deferred=deferred)
        batches.append(collate([ds[i, 1] for i in range(len(ds))]))
    a, b = batches
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert (a["img_len"] < 6).any()  # regions were dropped
    keep = np.array([True, False, True, True, False, False])
    np.testing.assert_array_equal(split.image(4, keep=keep), feats[4][keep])
    np.testing.assert_array_equal(split.image(4, keep=np.array([5, 0, 0])), feats[4][[5, 0, 0]])
    np.testing.assert_array_equal(split.deferred_image(7).numpy(), feats[7])
    with pytest.raises(ValueError, match="C-contiguous float32"):  # never a silent temporary
        split.image_into(0, np.empty((6, 10), dtype=np.float32)[:, ::2])


def test_worker_batches_are_built_in_shared_memory(tmp_path: Path) -> None:
    _write_split(tmp_path)
    split = PrecompSplit(tmp_path, "train")
    tok = VocabTokenizer(Vocabulary.build(split.captions, min_count=1))
    ds = PairDataset(split, tok, Augment(region_keep_prob=0.5), deferred=True)
    items = [ds[i] for i in range(4)]
    want = Collate(tok.pad_id)(items)
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=Collate(tok.pad_id))
    got = next(iter(loader))
    assert got["img"].is_shared()
    torch.testing.assert_close(got["img"], want["img"], rtol=0, atol=0)


def test_buffers_from_an_inference_mode_batch_are_writable_afterwards() -> None:
    """Lightning evaluates under torch.inference_mode: a pooled buffer handed out there must be
    an ordinary tensor that the next training batch can be written into."""
    buffers = BatchBuffers()
    sets = [torch.ones(3, 2), torch.ones(1, 2)]
    with torch.inference_mode():
        out, _ = pad_sets(sets, buffers)
        assert not out.is_inference()
    del out
    again, lengths = pad_sets([torch.full((2, 2), 2.0), torch.full((3, 2), 3.0)], buffers)
    assert lengths.tolist() == [2, 3]
    assert again[0, :2].eq(2).all() and again[0, 2].eq(0).all() and again[1].eq(3).all()
