"""SCAN precomp reader: good trees, the repeated-rows layout, max_images, pickling, every bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import make_precomp_tree

from gpo_lit.data.formats.npy import read_npy_header
from gpo_lit.data.formats.precomp import PrecompSplit
from gpo_lit.errors import GpoLitError


def bad(fn, *names: str) -> str:
    """Run ``fn``, expect a one-line GpoLitError naming every one of ``names``; return the message."""
    with pytest.raises(GpoLitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg
    return msg


def test_good_tree(tmp_path: Path) -> None:
    ims = make_precomp_tree(tmp_path, n=4, k=5)
    s = PrecompSplit(tmp_path, "train")
    assert (s.n_images, s.n_captions, s.captions_per_image) == (4, 20, 5)
    assert (s.n_regions, s.feat_dim) == (3, 2)
    assert s.path == tmp_path / "train_ims.npy"
    assert s.cap2img.dtype == np.int64
    np.testing.assert_array_equal(s.cap2img, np.arange(20) // 5)
    assert s.image_ids == ["img0", "img1", "img2", "img3"]
    assert s.caption(7) == "caption 7 of image 1" == s.captions[7]
    assert not s.repeated
    x = s.image(np.int64(2))
    assert x.dtype == np.float32 and x.shape == (3, 2)
    np.testing.assert_array_equal(x, ims[2])
    x[:] = -1  # a copy: the next read is unaffected
    np.testing.assert_array_equal(s.image(2), ims[2])
    with pytest.raises(IndexError):
        s.image(4)
    with pytest.raises(IndexError):
        s.caption(20)
    assert "4 images" in repr(s)


def test_no_ids_and_other_k(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=3, k=2, ids=False)
    s = PrecompSplit(tmp_path, "train")
    assert s.image_ids is None and s.captions_per_image == 2
    np.testing.assert_array_equal(s.cap2img, [0, 0, 1, 1, 2, 2])


def test_crlf_bom_and_npy_v2(tmp_path: Path) -> None:
    ims = np.ones((2, 3, 4), np.float32)
    with open(tmp_path / "dev_ims.npy", "wb") as f:
        np.lib.format.write_array(f, ims, version=(2, 0))
    (tmp_path / "dev_caps.txt").write_bytes(b"\xef\xbb\xbfa b\r\nc d\r\ne f\r\ng h\r\n")
    s = PrecompSplit(tmp_path, "dev")
    assert s.captions == ["a b", "c d", "e f", "g h"] and s.n_images == 2
    assert read_npy_header(tmp_path / "dev_ims.npy")[0] == (2, 3, 4)


def test_repeated_rows_detected_from_ids(tmp_path: Path) -> None:
    ims = make_precomp_tree(tmp_path, n=4, k=5, repeated=True)
    s = PrecompSplit(tmp_path, "train")
    assert s.repeated and (s.n_images, s.n_captions) == (4, 20)
    np.testing.assert_array_equal(s.cap2img, np.arange(20) // 5)
    assert s.image_ids == ["img0", "img1", "img2", "img3"]
    for i in range(4):
        np.testing.assert_array_equal(s.image(i), ims[i])


def test_repeated_rows_detected_from_features_or_forced(tmp_path: Path) -> None:
    ims = make_precomp_tree(tmp_path, n=4, k=5, repeated=True, ids=False)
    s = PrecompSplit(tmp_path, "train")
    assert s.repeated and s.n_images == 4
    np.testing.assert_array_equal(s.image(3), ims[3])
    assert PrecompSplit(tmp_path, "train", repeated_images=True).n_images == 4
    plain = PrecompSplit(tmp_path, "train", repeated_images=False)
    assert not plain.repeated and plain.n_images == 20 and plain.captions_per_image == 1


def test_one_caption_per_image_is_not_repeated(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=10, k=1)  # rows == captions, distinct ids
    s = PrecompSplit(tmp_path, "train")
    assert not s.repeated and s.n_images == 10


def test_forced_repeated_needs_one_caption_per_row(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=4, k=5)
    bad(lambda: PrecompSplit(tmp_path, "train", repeated_images=True), "train_caps.txt")


def test_max_images(tmp_path: Path) -> None:
    ims = make_precomp_tree(tmp_path, n=6, k=5)
    s = PrecompSplit(tmp_path, "train", max_images=2)
    assert (s.n_images, s.n_captions) == (2, 10)
    assert s.captions[-1] == "caption 9 of image 1" and s.image_ids == ["img0", "img1"]
    np.testing.assert_array_equal(s.image(1), ims[1])
    with pytest.raises(IndexError):
        s.image(2)
    assert PrecompSplit(tmp_path, "train", max_images=100).n_images == 6
    bad(lambda: PrecompSplit(tmp_path, "train", max_images=0), "max_images")
    make_precomp_tree(tmp_path / "rep", n=4, repeated=True)
    r = PrecompSplit(tmp_path / "rep", "train", max_images=3)
    assert (r.n_images, r.n_captions, len(r.image_ids)) == (3, 15, 3)


def test_pickle_drops_the_memmap(tmp_path: Path) -> None:
    ims = np.random.default_rng(0).random((64, 36, 64), dtype=np.float32)  # 590 KB
    np.save(tmp_path / "test_ims.npy", ims)
    (tmp_path / "test_caps.txt").write_text("".join(f"c {j}\n" for j in range(64 * 5)))
    s = PrecompSplit(tmp_path, "test")
    np.testing.assert_array_equal(s.image(5), ims[5])  # opens the map
    blob = pickle.dumps(s)
    assert len(blob) < 20_000
    t = pickle.loads(blob)
    np.testing.assert_array_equal(t.image(63), ims[63])
    assert t.n_captions == 320
    assert len(pickle.dumps(t)) < 20_000


# ---- bad files: one-line GpoLitError naming the file ----------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    msg = bad(lambda: PrecompSplit(tmp_path / "nowhere", "train"), "train_ims.npy")
    assert "train_caps.txt" in msg  # says what the folder must hold
    make_precomp_tree(tmp_path)
    (tmp_path / "train_caps.txt").unlink()
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_caps.txt")
    bad(lambda: PrecompSplit(tmp_path, "dev"), "dev_ims.npy")


@pytest.mark.parametrize(
    "content",
    [b"not a numpy file at all", b"", b"\x93NUMPY\x01\x00\x10\x00{'descr': garbage"],
)
def test_not_npy(tmp_path: Path, content: bytes) -> None:
    make_precomp_tree(tmp_path)
    (tmp_path / "train_ims.npy").write_bytes(content)
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy", "expected")


def test_truncated_npy(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    p = tmp_path / "train_ims.npy"
    p.write_bytes(p.read_bytes()[:-8])
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy", "truncated")


def test_wrong_dtype(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((4, 3, 2), np.float64))
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy", "float32", "float64")


@pytest.mark.parametrize("items", [[{"a": 1}] * 4, [None] * 1000])  # the pickle > or < n × 8 bytes
def test_object_array_is_refused_without_unpickling(tmp_path: Path, items: list) -> None:
    make_precomp_tree(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.array(items, dtype=object), allow_pickle=True)
    msg = bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy", "dtype object", "pickled")
    assert "truncated" not in msg


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 2, 1)])
def test_wrong_ndim(tmp_path: Path, shape: tuple[int, ...]) -> None:
    make_precomp_tree(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros(shape, np.float32))
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy", "3-d", str(shape))


def test_zero_rows(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    np.save(tmp_path / "train_ims.npy", np.zeros((0, 3, 2), np.float32))
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_ims.npy")


def test_captions_not_utf8(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    p = tmp_path / "train_caps.txt"
    p.write_bytes(p.read_bytes().replace(b"caption 3", b"capt\xe9on 3"))
    msg = bad(lambda: PrecompSplit(tmp_path, "train"), "train_caps.txt", "UTF-8")
    assert "line 4" in msg


def test_empty_caption_line(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    p = tmp_path / "train_caps.txt"
    lines = p.read_text().splitlines()
    lines[6] = "   "
    p.write_text("\n".join(lines) + "\n")
    msg = bad(lambda: PrecompSplit(tmp_path, "train"), "train_caps.txt")
    assert "line 7" in msg


def test_empty_caption_file(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path)
    (tmp_path / "train_caps.txt").write_bytes(b"")
    bad(lambda: PrecompSplit(tmp_path, "train"), "train_caps.txt", "empty")


def test_caption_count_not_a_multiple(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=4, k=5)
    with open(tmp_path / "train_caps.txt", "a") as f:
        f.write("one caption too many\n")
    msg = bad(lambda: PrecompSplit(tmp_path, "train"), "train_caps.txt")
    assert msg.endswith("expected a multiple of 4 captions (one block per image), found 21")


def test_ids_count(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=4)
    (tmp_path / "train_ids.txt").write_text("a\nb\nc\n")
    msg = bad(lambda: PrecompSplit(tmp_path, "train"), "train_ids.txt")
    assert "expected 4 ids" in msg and msg.endswith("found 3")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path: Path, value: float) -> None:
    make_precomp_tree(tmp_path, n=4)
    ims = np.ones((4, 3, 2), np.float32)
    ims[2, 1, 0] = value
    np.save(tmp_path / "train_ims.npy", ims)
    s = PrecompSplit(tmp_path, "train")  # not checked on open (that would read the data)
    s.image(1)
    msg = bad(lambda: s.image(2), "train_ims.npy", "row 2")
    assert "1 NaN/inf" in msg
    assert not np.isfinite(PrecompSplit(tmp_path, "train", check_finite=False).image(2)).all()


def test_non_finite_row_of_repeated_layout(tmp_path: Path) -> None:
    make_precomp_tree(tmp_path, n=4, repeated=True)
    rows = np.load(tmp_path / "train_ims.npy")
    rows[15:20] = np.nan  # image 3
    np.save(tmp_path / "train_ims.npy", rows)
    bad(lambda: PrecompSplit(tmp_path, "train").image(3), "train_ims.npy", "row 15")


# ---- the positioned-read row path --------------------------------------------------------------


def _random_tree(root: Path, n: int = 50, regions: int = 7, dim: int = 16) -> np.ndarray:
    ims = np.random.default_rng(1).standard_normal((n, regions, dim)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "train_ims.npy", ims)
    (root / "train_caps.txt").write_text("".join(f"a photo {j % 7}\n" for j in range(n * 5)))
    return ims


def test_read_rows_equals_np_load(tmp_path: Path) -> None:
    ims = _random_tree(tmp_path)
    s = PrecompSplit(tmp_path, "train")
    full = np.load(tmp_path / "train_ims.npy")
    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, 50, 20), [49], [0, 1, 2, 49, 48, 3, 3], np.arange(50), []):
        np.testing.assert_array_equal(s.read_rows(rows), full[np.asarray(rows, dtype=int)])
    for i in (*rng.integers(0, 50, 5), 49):
        keep = rng.random(7) < 0.6
        keep[0] = True
        np.testing.assert_array_equal(s.image(i, keep=keep), ims[i][keep])
        np.testing.assert_array_equal(s.image(i, keep=np.flatnonzero(keep)), ims[i][keep])


def test_dropping_by_index_matches_drop_regions(tmp_path: Path) -> None:
    """PairDataset copies out only the kept regions, drawn exactly as drop_regions draws them."""
    from gpo_lit.data.augment import drop_regions
    from gpo_lit.data.datasets import Augment, PairDataset
    from gpo_lit.data.tokenize import VocabTokenizer
    from gpo_lit.data.vocab import Vocabulary

    ims = _random_tree(tmp_path)
    s = PrecompSplit(tmp_path, "train")
    tok = VocabTokenizer(Vocabulary.build(s.captions, min_count=1))
    ds = PairDataset(s, tok, Augment(region_keep_prob=0.5, word_prob=0.0), seed=3)
    for index, epoch in [(0, 0), (17, 2), (249, 5)]:
        rng = np.random.default_rng((3, epoch, index))
        want = drop_regions(ims[index // 5], rng, p_keep=0.5)
        np.testing.assert_array_equal(ds[index, epoch]["img"].numpy(), want)


def test_reads_only_the_requested_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _random_tree(tmp_path, n=40, regions=36, dim=64)
    s = PrecompSplit(tmp_path, "train")
    asked: list[int] = []
    real = os.preadv

    def counting(fd, buffers, offset):
        asked.append(sum(len(memoryview(b)) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    row = 36 * 64 * 4
    s.image(39)
    assert asked == [row]
    asked.clear()
    s.read_rows([3, 4, 5, 20, 7])  # runs [3..5], [20], [7]: three reads, five rows
    assert asked == [3 * row, row, row]


def test_cold_cache_reads_about_the_sample_size(tmp_path: Path) -> None:
    """After evicting the file from the page cache, random rows cost about their own bytes
    (kernel read-ahead made a memory map read 25x)."""
    import os

    io = Path("/proc/self/io")
    if not hasattr(os, "posix_fadvise") or not io.exists():
        pytest.skip("needs Linux /proc/self/io and posix_fadvise")
    _random_tree(tmp_path, n=64, regions=36, dim=256)  # 36 KB rows, 2.4 MB
    path = tmp_path / "train_ims.npy"
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    s = PrecompSplit(tmp_path, "train")

    def read_bytes() -> int:
        return int(
            next(ln for ln in io.read_text().splitlines() if ln.startswith("read_bytes:")).split()[
                1
            ]
        )

    rows = [5, 40, 17, 60, 2, 33]
    before = read_bytes()
    s.read_rows(rows)
    got = read_bytes() - before
    page = os.sysconf("SC_PAGE_SIZE")
    if got == 0:
        pytest.skip("this file system does not count read_bytes (tmpfs, overlay cache)")
    assert got <= 1.5 * len(rows) * s._row_bytes + len(rows) * page


@pytest.mark.slow  # ~15 s: two worker processes on a loaded 2-core machine
def test_workers_give_the_same_batches(tmp_path: Path) -> None:
    """Two persistent workers over two epochs yield exactly the batches of the main process: the
    epoch reaches the workers through the sampler's (index, epoch) pairs."""
    import torch

    from gpo_lit.data.datamodule import RetrievalDataModule
    from gpo_lit.data.tokenize import VocabTokenizer
    from gpo_lit.data.vocab import Vocabulary

    _random_tree(tmp_path)

    def batches(workers: int) -> list[dict]:
        dm = RetrievalDataModule(str(tmp_path), num_workers=workers, batch_size=32, seed=4)
        split = dm.split("train")
        dm.set_tokenizer(VocabTokenizer(Vocabulary.build(split.captions, min_count=1)))
        dm._batches_done_this_epoch = lambda n: 0  # no trainer: nothing to skip
        loader = dm.train_dataloader()
        assert loader.persistent_workers == (workers > 0) and not loader.pin_memory
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out += list(loader)
        return out

    a, b = batches(0), batches(2)
    assert len(a) == len(b) == 2 * (250 // 32)
    assert not torch.equal(a[0]["img"], a[len(a) // 2]["img"])  # the epochs differ
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k
