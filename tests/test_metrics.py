"""Retrieval metrics against independent references (REFERENCE §6).

Two references from the full similarity matrix: the authors' way (a per-query ``argsort``; i2t
rank = best position of the image's ground-truth captions, t2i rank = position of the caption's
image), unambiguous on continuous random data (no ties), and a brute-force count per query of the
candidates that are not ground truth and score ≥ (pessimistic) or > (optimistic) the ground truth,
which also defines the answer under ties. Ties are covered by hand-worked examples too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import naive_metrics, naive_ranks, tiny_model

import gpo_lit
import gpo_lit.metrics.ranks as ranks_mod
from gpo_lit.errors import GpoLitError
from gpo_lit.metrics import (
    PROTOCOLS,
    Protocol,
    evaluate,
    folds,
    load_embeddings,
    recall_metrics,
    retrieval_ranks,
    save_embeddings,
)
from gpo_lit.metrics.__main__ import main as cli_main

# ---------------------------------------------------------------------------------------------
# references and data


def argsort_ranks(sims: np.ndarray, cap2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Authors'-style ranks from the full matrix sims [n_img, n_cap] by per-query argsort."""
    n_img, n_cap = sims.shape
    i2t = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in np.flatnonzero(cap2img == i))
    t2i = np.empty(n_cap, dtype=np.int64)
    for j in range(n_cap):
        order = np.argsort(sims[:, j])[::-1]
        t2i[j] = np.where(order == cap2img[j])[0][0]
    return i2t, t2i


def random_data(n_img: int, d: int = 16, seed: int = 0, dtype=np.float64):
    """Uneven captions per image (1–7), shuffled so cap2img is not contiguous."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 8, size=n_img)
    cap2img = rng.permutation(np.repeat(np.arange(n_img), counts))
    img = rng.standard_normal((n_img, d)).astype(dtype)
    cap = rng.standard_normal((len(cap2img), d)).astype(dtype)
    return img, cap, cap2img


def assert_close_dicts(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


# ---------------------------------------------------------------------------------------------
# ranks


TIES = ("pessimistic", "optimistic")


@pytest.mark.parametrize("shard_size", [1, 3, 16, 37, 1000])
def test_ranks_match_naive_argsort(shard_size: int) -> None:
    # Tie-free data: both tie rules, the brute-force count and the authors' argsort all agree.
    img, cap, cap2img = random_data(37)
    sims = img @ cap.T
    want_i2t, want_t2i = argsort_ranks(sims, cap2img)
    for ties in TIES:
        for ref, w in zip(naive_ranks(sims, cap2img, ties), (want_i2t, want_t2i), strict=True):
            np.testing.assert_array_equal(ref, w)
        i2t, t2i = retrieval_ranks(
            torch.from_numpy(img), torch.from_numpy(cap), cap2img, shard_size, ties=ties
        )
        assert i2t.dtype == t2i.dtype == torch.int64
        np.testing.assert_array_equal(i2t.numpy(), want_i2t)
        np.testing.assert_array_equal(t2i.numpy(), want_t2i)


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("band", [0.0, 0.05])
def test_ranks_same_on_a_busy_and_an_idle_machine(
    monkeypatch: pytest.MonkeyPatch, busy: bool, band: float
) -> None:
    # Idle: each shard's groups are counted in turn on every intra-op thread; busy: one Python
    # thread per intra-op thread takes the next group as it finishes (groups of 5 rows, tiles of
    # 2 here, so every shard has several). The same exact ranks, ties included, with band entries
    # gathered by both threads (band widened by 0.05) and, for identical embeddings, the band's
    # budget overflowing into the recount from both threads.
    monkeypatch.setattr(ranks_mod, "machine_busy", lambda: busy)
    img, cap, cap2img = random_data(300, d=8, seed=5)
    img[7] = img[3]  # exact ties between images
    n_cap = len(cap2img)
    monkeypatch.setattr(ranks_mod, "GROUP_BYTES", 5 * n_cap * 8)
    monkeypatch.setattr(ranks_mod, "TILE_BYTES", 2 * n_cap * 8)
    real = ranks_mod._gt_estimate
    monkeypatch.setattr(
        ranks_mod, "_gt_estimate", lambda p, u: (real(p, u)[0], real(p, u)[1] + band)
    )
    shared: list[int] = []
    real_share = ranks_mod._share
    monkeypatch.setattr(
        ranks_mod, "_share", lambda items, *a: (shared.append(len(items)), real_share(items, *a))
    )
    calls = _spy_recount(monkeypatch)
    same = (np.full_like(img, 0.5), np.full_like(cap, 0.5))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for data in ((img, cap), same):
            sims = data[0] @ data[1].T
            for ties in TIES:
                got = retrieval_ranks(*map(torch.from_numpy, data), cap2img, 64, ties)
                for g, w in zip(got, naive_ranks(sims, cap2img, ties), strict=True):
                    np.testing.assert_array_equal(g.numpy(), w)
    finally:
        torch.set_num_threads(before)
    assert shared == ([13] * 4 + [9]) * 4 if busy else shared == []  # 4 shards of 64, one of 44
    assert calls  # identical embeddings: the band outgrew its budget


def test_shard_byte_cap_shrinks_shards_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # A shard holds at most SHARD_BYTES of buffers (on the CPU its float64 similarities, 8 bytes
    # an entry): a cap of 3 rows' worth must give shards of 3 images, ranks unchanged.
    img, cap, cap2img = random_data(37)
    want = naive_ranks(img @ cap.T, cap2img)
    monkeypatch.setattr(ranks_mod, "SHARD_BYTES", 3 * len(cap2img) * 8 + 7)
    shapes: list[int] = []
    real_mm = torch.mm
    monkeypatch.setattr(
        ranks_mod.torch, "mm", lambda a, b, **k: (shapes.append(a.shape[0]), real_mm(a, b, **k))[1]
    )
    i2t, t2i = retrieval_ranks(torch.from_numpy(img), torch.from_numpy(cap), cap2img, 1000)
    np.testing.assert_array_equal(i2t.numpy(), want[0])
    np.testing.assert_array_equal(t2i.numpy(), want[1])
    assert max(shapes) == 3 and len(shapes) >= 13


@pytest.mark.parametrize("tile_rows", [1, 3, 1000])
@pytest.mark.parametrize("count_limit", [2**24, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiles_and_count_types_give_the_same_exact_ranks(
    monkeypatch: pytest.MonkeyPatch, tile_rows: int, count_limit: int, dtype
) -> None:
    # The comparisons run over tiles of whole rows (TILE_BYTES) and count in the similarities'
    # float type, or float64 where float32 sums could pass 2**24: tiles of 1, 3 and all rows of a
    # shard, each count type, ties (duplicate images and captions) included, both tie rules.
    img, cap, cap2img = random_data(41, d=8, seed=6, dtype=dtype)
    # Quarter-integer features: every product and sum is exact in either float type, so equal
    # similarities are equal whatever the BLAS's summation order (MKL's float64 product rounds
    # the last row of a 5-row shard differently from its other rows on AVX-512 machines, which
    # split ties here), and ties are many.
    img, cap = np.round(img * 4) / 4, np.round(cap * 4) / 4
    img[9] = img[2]
    cap[5] = cap[11]
    sims = img.astype(np.float64) @ cap.astype(np.float64).T
    itemsize = 8 if count_limit == 2 else np.dtype(dtype).itemsize
    monkeypatch.setattr(ranks_mod, "TILE_BYTES", tile_rows * len(cap2img) * itemsize)
    monkeypatch.setattr(ranks_mod, "FLOAT32_COUNTS", count_limit)
    made: list[tuple[int, torch.dtype]] = []
    real_tiles = ranks_mod._Tiles

    class Spy(real_tiles):  # type: ignore[misc,valid-type]
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append((self.rows, self.buf.dtype))

    monkeypatch.setattr(ranks_mod, "_Tiles", Spy)
    for ties in TIES:
        for shard_size in (5, 41):
            got = retrieval_ranks(img, cap, cap2img, shard_size, ties=ties)
            for g, w in zip(got, naive_ranks(sims, cap2img, ties), strict=True):
                np.testing.assert_array_equal(g.numpy(), w, err_msg=f"{ties} {shard_size}")
    want_dtype = torch.float64 if (count_limit == 2 or dtype == np.float64) else torch.float32
    assert {d for _, d in made} == {want_dtype}
    assert min(r for r, _ in made) == min(tile_rows, 5)


@pytest.mark.parametrize("chunk", [1, 7, 10**6])
def test_gt_estimate_in_chunks_is_the_rowwise_dot(monkeypatch: pytest.MonkeyPatch, chunk) -> None:
    # The estimate gathers each caption's image row into one reused buffer, GT_CHUNK_BYTES at a
    # time: chunks of 1 and 7 captions (the last one short) give the plain row-wise dot and
    # Σ|a_i b_i| that a chunk holding every caption gives, and the ranks stay exact.
    img, cap, cap2img = random_data(30, d=8, seed=8)
    monkeypatch.setattr(ranks_mod, "GT_CHUNK_BYTES", chunk * 8 * 8)  # d = 8, float64
    p = ranks_mod.prepare_embeddings(torch.from_numpy(img), torch.from_numpy(cap), cap2img)
    g, delta = ranks_mod._gt_estimate(p, 2.0**-53)
    prod = torch.from_numpy(img)[torch.as_tensor(cap2img)] * torch.from_numpy(cap)
    torch.testing.assert_close(g, prod.sum(dim=1), rtol=0, atol=1e-6)
    ratio = delta / prod.abs().sum(dim=1)
    assert float(ratio.max() - ratio.min()) < 1e-6 * float(ratio.max())  # one factor for all
    want = naive_ranks(img @ cap.T, cap2img)
    got = retrieval_ranks(torch.from_numpy(img), torch.from_numpy(cap), cap2img, 7)
    for gg, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(gg.numpy(), w)


def test_band_entries_gathered_in_chunks_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # Near-ties: the estimate's band is widened (by 0.05 against similarities of spread ~3) so
    # shards hold entries in it other than their GT, fetched a column at a time
    # (BAND_GATHER_BYTES = 1) and compared with the exact GT at the end; no recount.
    calls = _spy_recount(monkeypatch)
    img, cap, cap2img = random_data(30, d=8, seed=7)
    cap[8] = cap[3]  # exact ties too (between captions of different images)
    want = naive_ranks(img @ cap.T, cap2img)
    real = ranks_mod._gt_estimate
    monkeypatch.setattr(ranks_mod, "BAND_GATHER_BYTES", 1)
    spans: list[int] = []
    real_band = ranks_mod._band_entries

    def band(sims, s0, cols, *a):
        spans.append(cols.numel())
        return real_band(sims, s0, cols, *a)

    monkeypatch.setattr(ranks_mod, "_band_entries", band)
    retrieval_ranks(img, cap, cap2img, 7, ties="pessimistic")
    # Only entries other than the GT's own call for a gather: with the estimate's narrow band
    # on tie-free columns, none; the GT entries (always in the band) are taken out of its count.
    assert spans == []
    monkeypatch.setattr(
        ranks_mod, "_gt_estimate", lambda p, u: (real(p, u)[0], real(p, u)[1] + 0.05)
    )
    for ties in TIES:
        got = retrieval_ranks(img, cap, cap2img, 7, ties=ties)
        for g, w in zip(got, naive_ranks(img @ cap.T, cap2img, ties), strict=True):
            np.testing.assert_array_equal(g.numpy(), w)
    assert spans and max(spans) > 1 and not calls
    assert [g.tolist() for g in retrieval_ranks(img, cap, cap2img, 7)] == [w.tolist() for w in want]


def test_ranks_float32_and_numpy_inputs() -> None:
    img, cap, cap2img = random_data(50, d=32, seed=1, dtype=np.float32)
    want = argsort_ranks(img.astype(np.float64) @ cap.astype(np.float64).T, cap2img)
    got = retrieval_ranks(img, cap, cap2img.tolist(), shard_size=8)  # numpy + a plain list
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)


def tie_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Duplicate images (i2 = i0) and duplicate captions (c1 = c3 across images, c4 = c0), 2-D
    embeddings with exactly representable similarities in any summation order:

    ```
                  c0   c1   c2   c3   c4   c5       cap2img = [0, 0, 1, 1, 2, 3]
       i0 (1, 0) [ 1   .5    0   .5    1    0 ]    c0 = c4 = (1, 0), c1 = c3 = (.5, .5),
       i1 (0, 1) [ 0   .5    1   .5    0    1 ]    c2 = c5 = (0, 1)
       i2 (1, 0) [ 1   .5    0   .5    1    0 ]
       i3 (1, 1) [ 1    1    1    1    1    1 ]
    ```
    """
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    cap = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    return img, cap, torch.tensor([0, 0, 1, 1, 2, 3])


# Worked by hand from the matrix in tie_example (≥: pessimistic, >: optimistic):
#   i2t  i0: best GT c0 = 1; others c2 0, c3 .5, c4 1 (tie), c5 0   → 1 | 0  (GT c1 never counts)
#        i1: best GT c2 = 1; others c0 0, c1 .5, c4 0, c5 1 (tie)   → 1 | 0
#        i2: GT c4 = 1;      others c0 1 (tie), c1, c3 .5, c2, c5 0  → 1 | 0
#        i3: GT c5 = 1;      the 5 others all 1 (ties)               → 5 | 0
#   t2i  c0: GT i0 = 1;  i1 0, i2 1 (tie), i3 1 (tie)                → 2 | 0
#        c1: GT i0 = .5; i1 .5, i2 .5 (ties), i3 1 (above)           → 3 | 1
#        c2: GT i1 = 1;  i0 0, i2 0, i3 1 (tie)                      → 1 | 0
#        c3: GT i1 = .5; i0 .5, i2 .5 (ties), i3 1 (above)           → 3 | 1
#        c4: GT i2 = 1;  i0 1 (tie), i1 0, i3 1 (tie)                → 2 | 0
#        c5: GT i3 = 1;  i0 0, i1 1 (tie), i2 0                      → 1 | 0
TIE_RANKS = {
    "pessimistic": ([1, 1, 1, 5], [2, 3, 1, 3, 2, 1]),
    "optimistic": ([0, 0, 0, 0], [0, 1, 0, 1, 0, 0]),
}
TIE_METRICS = {
    # i2t [1, 1, 1, 5]: R@1 0, R@5 3/4, R@10 all; median 1 → medr 2; mean 2 → meanr 3.
    # t2i [2, 3, 1, 3, 2, 1]: R@1 0, R@5 all; median 2 → medr 3; mean 2 → meanr 3.
    "pessimistic": {
        "i2t_r1": 0.0, "i2t_r5": 75.0, "i2t_r10": 100.0, "i2t_medr": 2.0, "i2t_meanr": 3.0,
        "t2i_r1": 0.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 3.0, "t2i_meanr": 3.0,
        "rsum": 375.0,
    },
    # i2t all 0; t2i [0, 1, 0, 1, 0, 0]: R@1 4/6, median 0 → medr 1, mean 1/3 → meanr 4/3.
    "optimistic": {
        "i2t_r1": 100.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 1.0, "i2t_meanr": 1.0,
        "t2i_r1": 400 / 6, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 1.0, "t2i_meanr": 4 / 3,
        "rsum": 300 + 400 / 6 + 200,
    },
}  # fmt: skip


@pytest.mark.parametrize("path", ["single pass", "reduced precision", "bad estimate", "ulp high"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ties_hand_worked(monkeypatch: pytest.MonkeyPatch, path: str, dtype) -> None:
    img, cap, cap2img = tie_example()
    img, cap = img.to(dtype), cap.to(dtype)
    real = ranks_mod._gt_estimate
    if path == "reduced precision":  # every column counted again in the second pass
        monkeypatch.setattr(ranks_mod, "_unit_roundoff", lambda dtype: 2.0**-6)
    elif path == "bad estimate":  # odd columns' GT estimate off its bound: only they recount

        def estimate(p, u):
            g, delta = real(p, u)
            return g + 0.3 * (torch.arange(p.n_cap) % 2), delta

        monkeypatch.setattr(ranks_mod, "_gt_estimate", estimate)
    elif path == "ulp high":  # band [g + 1 ulp, g + 1 ulp]: entries equal to g (ties) fall
        # below it, so the exact GT just outside the band must send every column to the recount

        def estimate(p, u):
            g, _ = real(p, u)
            return torch.nextafter(g, torch.full_like(g, torch.inf)), torch.zeros_like(g)

        monkeypatch.setattr(ranks_mod, "_gt_estimate", estimate)
    sims = (img @ cap.T).double().numpy()
    for ties in TIES:
        want = TIE_RANKS[ties]
        for ref, w in zip(naive_ranks(sims, cap2img.numpy(), ties), want, strict=True):
            assert ref.tolist() == w  # the brute-force reference agrees with the hand count
        for shard_size in (1, 2, 3, 4):
            i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size, ties=ties)
            assert (i2t.tolist(), t2i.tolist()) == want, (ties, shard_size)
        assert evaluate(img, cap, cap2img, ties=ties) == pytest.approx(TIE_METRICS[ties])
    assert evaluate(img, cap, cap2img) == pytest.approx(TIE_METRICS["pessimistic"])  # default


def test_near_ties_one_ulp_apart_are_exact() -> None:
    # float32, exact arithmetic:          c0             c1        c2     c3   cap2img [1, 2, 0, 3]
    #   i0 = (2^-23, 1)          [ 0.5 + 2^-24       2^-23      1     -2^-23    ]
    #   i1 = (0, 1)              [ 0.5               0          1      0        ]
    #   i2 = (1, 0)              [ 0.5               1          0     -1        ]
    #   i3 = (1 - 2^-24, 0)      [ 0.5 - 2^-25       1 - 2^-24  0     -1 + 2^-24 ]
    # c0's GT i1 = 0.5: i0 one ulp above (counts), i2 equal (a tie), i3 one ulp below (never):
    # rank 2 pessimistic, 1 optimistic, no epsilon. c2's GT i0 = 1 ties with i1: 1 | 0.
    # c3's GT i3 = -1 + 2^-24: i0, i1 above → 2 | 2. i2t: only i1 (c2 above its 0.5) and
    # i3 (3 above) rank > 0. With one image per shard, i0's entries are seen before the exact
    # GT values exist (kept in the band, resolved at the end).
    img = torch.tensor([[2.0**-23, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0 - 2.0**-24, 0.0]])
    cap = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cap2img = torch.tensor([1, 2, 0, 3])
    want = {"pessimistic": [2, 0, 1, 2], "optimistic": [1, 0, 0, 2]}
    for ties in TIES:
        for shard_size in (1, 2, 4):
            i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size, ties=ties)
            assert i2t.tolist() == [0, 1, 0, 3]
            assert t2i.tolist() == want[ties], (ties, shard_size)


def _spy_recount(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ranks_mod._recount
    monkeypatch.setattr(ranks_mod, "_recount", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_identical_embeddings_rank_last(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every similarity ties exactly (0.5·0.5·4 = 1): pessimistic, every query ranks behind every
    # other candidate (all recalls 0); optimistic, all ranks 0. With one image per shard the
    # near-tie band overflows its memory budget: the columns are recounted.
    calls = _spy_recount(monkeypatch)
    _, _, cap2img = random_data(40)
    counts = np.bincount(cap2img)
    img = torch.full((40, 4), 0.5)
    cap = torch.full((len(cap2img), 4), 0.5)
    for shard_size in (1, 7, 64):
        i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size)
        np.testing.assert_array_equal(i2t.numpy(), len(cap2img) - counts)  # other images' caps
        assert (t2i == 39).all()
        i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size, ties="optimistic")
        assert not i2t.any() and not t2i.any()
    assert calls, "the overflow path was not exercised"
    assert evaluate(img, cap, cap2img)["rsum"] == 0.0
    m = evaluate(img, cap, cap2img, ties="optimistic")
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


@pytest.mark.parametrize(
    ("protocol", "n_img"), [("full", 100), ("f30k_1k", 1000), ("coco_5k", 5000), ("coco_1k", 5000)]
)
def test_collapsed_model_scores_no_better_than_chance(protocol: str, n_img: int) -> None:
    # A collapsed model (all embeddings equal, 5 captions per image) can only guess: with n
    # candidates of which g are ground truth, a random tie-break gives R@1 = 100·g/n on average.
    # Ties count against it: R@1 ≤ that bound both ways, rsum ~0 (strict counting gave 600).
    n_fold = 1000 if protocol == "coco_1k" else n_img  # images ranked together
    cap2img = np.arange(5 * n_img) // 5
    m = evaluate(np.ones((n_img, 8), np.float32), np.ones((5 * n_img, 8), np.float32), cap2img,
                 protocol)  # fmt: skip
    assert m["i2t_r1"] <= 100 * 5 / (5 * n_fold) and m["t2i_r1"] <= 100 * 1 / n_fold
    assert m["rsum"] < 10
    assert m["i2t_medr"] == 5 * n_fold - 5 + 1 and m["t2i_medr"] == n_fold  # ranked last


def test_second_pass_paths_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    img, cap, cap2img = random_data(30, seed=2)
    want = naive_ranks(img @ cap.T, cap2img)
    # (a) reduced matmul precision (TF32/bf16): counts against the exact GT in a second pass.
    monkeypatch.setattr(ranks_mod, "_unit_roundoff", lambda dtype: 2.0**-8)
    for g, w in zip(retrieval_ranks(img, cap, cap2img, 4), want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
    monkeypatch.undo()
    # (b) a GT estimate off by more than its bound: detected, those columns are recounted.
    real = ranks_mod._gt_estimate
    monkeypatch.setattr(
        ranks_mod, "_gt_estimate", lambda p, u: (real(p, u)[0] + 0.3, torch.zeros(p.n_cap))
    )
    for g, w in zip(retrieval_ranks(img, cap, cap2img, 4), want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)


def test_ensemble_equals_naive_on_averaged_similarities() -> None:
    img_a, cap_a, cap2img = random_data(25, d=8, seed=3)
    rng = np.random.default_rng(4)
    img_b = rng.standard_normal((25, 12))  # a second model with another width
    cap_b = rng.standard_normal((len(cap2img), 12))
    sims = (img_a @ cap_a.T + img_b @ cap_b.T) / 2
    want = naive_ranks(sims, cap2img)
    got = retrieval_ranks([img_a, img_b], [cap_a, cap_b], cap2img, shard_size=6)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
    assert_close_dicts(
        evaluate([img_a, img_b], [cap_a, cap_b], cap2img), naive_metrics(sims, cap2img)
    )


def test_ensemble_with_ties_averages_before_ranking() -> None:
    # Member a sees S + u vᵀ, member b sees S − u vᵀ (S: tie_example's matrix; u, v multiples of
    # 1/8, so every product and sum is exact): neither member ties like S, their mean is S exactly,
    # so the ensemble must give tie_example's hand-worked ranks under both rules.
    img, cap, cap2img = tie_example()
    u = torch.tensor([[1.0], [2.0], [3.0], [4.0]]) / 8
    v = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]) / 8
    imgs = [torch.cat([img, u], 1), torch.cat([img, -u], 1)]
    caps = [torch.cat([cap, v], 1), torch.cat([cap, v], 1)]
    for ties in TIES:
        for shard_size in (1, 3):
            got = retrieval_ranks(imgs, caps, cap2img, shard_size, ties=ties)
            assert tuple(t.tolist() for t in got) == TIE_RANKS[ties]
        assert evaluate(imgs, caps, cap2img, ties=ties) == pytest.approx(TIE_METRICS[ties])
        member = retrieval_ranks(imgs[0], caps[0], cap2img, ties=ties)
        sims_a = (imgs[0] @ caps[0].T).double().numpy()
        want_a = naive_ranks(sims_a, cap2img.numpy(), ties)
        assert tuple(t.tolist() for t in member) == tuple(w.tolist() for w in want_a)
        assert tuple(t.tolist() for t in member) != TIE_RANKS[ties]  # the mean is what counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_naive() -> None:
    img, cap, cap2img = random_data(60, seed=5)
    want = naive_ranks(img @ cap.T, cap2img)
    got = retrieval_ranks(
        torch.from_numpy(img).cuda(), torch.from_numpy(cap).cuda(), cap2img, shard_size=16
    )
    for g, w in zip(got, want, strict=True):
        assert g.is_cuda
        np.testing.assert_array_equal(g.cpu().numpy(), w)
    img, cap, cap2img = (t.cuda() for t in tie_example())
    for ties in TIES:
        for shard_size in (1, 3):
            got = retrieval_ranks(img, cap, cap2img, shard_size, ties=ties)
            assert tuple(t.tolist() for t in got) == TIE_RANKS[ties]
    m = evaluate(torch.ones(200, 8).cuda(), torch.ones(1000, 8).cuda(), torch.arange(1000) // 5)
    assert m["rsum"] == 0.0 and m["t2i_medr"] == 200.0  # collapsed: the recount path on CUDA


# ---------------------------------------------------------------------------------------------
# recall formulas and protocols


def test_recall_formulas_hand_worked() -> None:
    m = recall_metrics(torch.tensor([0, 1, 2, 3]), np.array([0, 0, 4, 9, 10]))
    assert m == {
        "i2t_r1": 25.0,
        "i2t_r5": 100.0,
        "i2t_r10": 100.0,
        "i2t_medr": 2.0,  # floor(median [0, 1, 2, 3] = 1.5) + 1
        "i2t_meanr": 2.5,  # mean 1.5 + 1
        "t2i_r1": 40.0,
        "t2i_r5": 60.0,
        "t2i_r10": 80.0,
        "t2i_medr": 5.0,  # median 4 + 1
        "t2i_meanr": 5.6,  # mean 23/5 + 1
        "rsum": 405.0,
    }
    assert all(type(v) is float for v in m.values())


def test_full_protocol_equals_naive() -> None:
    img, cap, cap2img = random_data(40, seed=6)
    want = naive_metrics(img @ cap.T, cap2img)
    assert_close_dicts(evaluate(img, cap, cap2img, "full", shard_size=9), want)
    # f30k_1k / coco_5k rank the same way on their own sizes only (tests/test_coco_protocols.py)


def test_fold_protocol_is_mean_of_naive_per_fold() -> None:
    img, cap, cap2img = random_data(40, seed=7)  # shuffled: a fold's captions are scattered
    per_fold = []
    for f in range(5):
        sel = np.flatnonzero((cap2img >= 8 * f) & (cap2img < 8 * f + 8))
        sims = img[8 * f : 8 * f + 8] @ cap[sel].T
        per_fold.append(naive_metrics(sims, cap2img[sel] - 8 * f))
    want = {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}
    assert_close_dicts(evaluate(img, cap, cap2img, folds(5, 8), shard_size=3), want)
    assert PROTOCOLS["coco_1k"] == Protocol("coco_1k", 5, 1000)


# ---------------------------------------------------------------------------------------------
# errors: one line, naming what was expected and found


def _err(fn, *args, **kw) -> str:
    with pytest.raises(GpoLitError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_errors_on_bad_input_are_one_line() -> None:
    img, cap, cap2img = random_data(10, d=4)
    bad = cap2img.copy()
    bad[3] = 13
    assert "expected indices in [0, 10), found max 13" in _err(retrieval_ranks, img, cap, bad)
    bad[3] = -1
    assert "found min -1" in _err(retrieval_ranks, img, cap, bad)
    no_cap = np.where(cap2img == 4, 5, cap2img)
    assert "first: image 4" in _err(retrieval_ranks, img, cap, no_cap)
    assert "shape" in _err(retrieval_ranks, img, cap, cap2img[:-1])
    assert "embedding width 4" in _err(retrieval_ranks, img, cap[:, :3], cap2img)
    assert "2-D" in _err(retrieval_ranks, img[0], cap, cap2img)
    nan = img.copy()
    nan[7, 1] = np.nan
    assert "img: expected finite values" in _err(retrieval_ranks, nan, cap, cap2img)
    assert "ensemble" in _err(retrieval_ranks, [img, img], [cap], cap2img)
    assert "integer" in _err(retrieval_ranks, img, cap, cap2img.astype(np.float32))
    assert "shard_size" in _err(retrieval_ranks, img, cap, cap2img, 0)
    msg = _err(evaluate, img, cap, cap2img, "coco_2k")
    assert "full" in msg and "coco_1k" in msg and "coco_2k" in msg
    assert "expected 5000 images" in _err(evaluate, img, cap, cap2img, "coco_1k")
    msg = _err(evaluate, img, cap, cap2img, ties="worst")
    assert msg == "ties: expected pessimistic or optimistic, found 'worst'"
    assert "ties: expected" in _err(retrieval_ranks, img, cap, cap2img, ties=None)
    assert "rank" in _err(recall_metrics, [], [0])


# ---------------------------------------------------------------------------------------------
# files and the command line


def test_npz_round_trip_and_file_errors(tmp_path: Path) -> None:
    img, cap, cap2img = random_data(12, d=8, dtype=np.float32)
    path = save_embeddings(tmp_path / "emb.npz", torch.from_numpy(img), cap, cap2img)
    got = load_embeddings(path)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.int64]
    for g, w in zip(got, (img, cap, cap2img), strict=True):
        np.testing.assert_array_equal(g.numpy(), w)

    assert "no such file" in _err(load_embeddings, tmp_path / "missing.npz")
    np.savez(tmp_path / "keys.npz", img=img, cap=cap)
    assert "found cap, img" in _err(load_embeddings, tmp_path / "keys.npz")
    np.savez(tmp_path / "obj.npz", img=img, cap=cap, cap2img=np.array([object()] * len(cap2img)))
    assert "obj.npz" in _err(load_embeddings, tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert _err(load_embeddings, tmp_path / "junk.npz").endswith(
        "junk.npz: expected an embeddings .npz archive, found a file that is not a zip archive "
        "(it starts with b'not ')"
    )  # not "pickled data": numpy's guess for any file that is neither .npy nor zip
    (tmp_path / "empty.npz").write_bytes(b"")
    assert _err(load_embeddings, tmp_path / "empty.npz").endswith("found an empty file")
    (tmp_path / "dir.npz").mkdir()
    assert _err(load_embeddings, tmp_path / "dir.npz").endswith("found a folder")
    np.savez(tmp_path / "shape.npz", img=img, cap=cap[:, :4], cap2img=cap2img)
    assert "shape.npz: cap: expected embedding width 8" in _err(
        load_embeddings, tmp_path / "shape.npz"
    )
    assert "bad.npz: cap2img" in _err(save_embeddings, tmp_path / "bad.npz", img, cap, cap2img + 1)


def test_cli_table_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, cap, cap2img = random_data(40, d=8, seed=8, dtype=np.float32)
    a = save_embeddings(tmp_path / "a.npz", img, cap, cap2img)
    b = save_embeddings(tmp_path / "b.npz", img[:, ::-1] * 2, cap, cap2img)
    out = tmp_path / "m.json"
    assert cli_main([str(a), str(b), "--protocol", "full", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| full |" in stdout and "RSUM" in stdout
    want = evaluate([img, img[:, ::-1] * 2], [cap, cap], cap2img)
    assert_close_dicts(json.loads(out.read_text())["full"], want)

    assert cli_main([str(a), "--protocol", "coco_1k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected 5000 images" in err

    # --ties: the hand-worked tie example, strict counting on request, pessimistic by default
    ties = save_embeddings(tmp_path / "ties.npz", *tie_example())
    for extra, rule in (([], "pessimistic"), (["--ties", "optimistic"], "optimistic")):
        assert cli_main([str(ties), *extra, "--json", str(tmp_path / f"{rule}.json")]) == 0
        assert f"ties {rule}" in capsys.readouterr().out
        got = json.loads((tmp_path / f"{rule}.json").read_text())["full"]
        assert got == pytest.approx(TIE_METRICS[rule])
    assert cli_main([str(ties), "--ties", "strict"]) == 2
    err = capsys.readouterr().err
    assert err == "error: ties: expected pessimistic or optimistic, found 'strict'\n"

    # the module entry point itself, in a fresh interpreter
    src = str(Path(gpo_lit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "gpo_lit.metrics", str(a), "--protocol", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "coco_1k" in proc.stderr


def test_model_takes_ties_from_the_evaluation_config() -> None:
    from gpo_lit.errors import user_error

    assert tiny_model().eval_cfg["ties"] == "pessimistic"
    assert tiny_model("evaluation.ties=optimistic").eval_cfg["ties"] == "optimistic"
    with pytest.raises(Exception) as info:  # at construction, not after the first epoch
        tiny_model("evaluation.ties=strict")
    msg = str(user_error(info.value))  # what the entry points print (Hydra wraps it)
    assert msg == "ties: expected pessimistic or optimistic, found 'strict'"


@pytest.mark.parametrize("members", [2, 3, 5, 7])
def test_ensemble_of_copies_scores_as_the_model_ties_included(members: int) -> None:
    # M copies of one model average to that model's similarities exactly: the same ranks, exact
    # ties (against the query) included, whatever M (1/M is inexact unless M is a power of 2).
    img = np.array([[0.0, 2.0, 0.0], [2.0, 2.0, 2.0]], np.float32)
    cap = np.array([[3.0, -1.0, -3.0], [2.0, 3.0, 0.0]], np.float32)  # caption 0: -2 ties -2
    c2i = np.array([0, 1])
    one = retrieval_ranks(img, cap, c2i)
    assert one[1].tolist() == [1, 0]  # the tie counts against caption 0
    many = retrieval_ranks([img] * members, [cap] * members, c2i)
    assert [r.tolist() for r in many] == [r.tolist() for r in one]


def test_ensemble_ranks_match_a_brute_force_mean_on_tie_heavy_members() -> None:
    # Three different ±1 models (integer similarities, many exact ties) against the pessimistic
    # ranks of their mean similarity matrix computed in float64.
    rng = np.random.default_rng(3)
    imgs = [rng.choice([-1.0, 1.0], size=(30, 6)).astype(np.float32) for _ in range(3)]
    caps = [rng.choice([-1.0, 1.0], size=(150, 6)).astype(np.float32) for _ in range(3)]
    c2i = np.arange(150) // 5
    mean = (
        sum(i.astype(np.float64) @ c.astype(np.float64).T for i, c in zip(imgs, caps, strict=True))
        / 3
    )
    t2i = [int((mean[:, j] >= mean[c2i[j], j]).sum()) - 1 for j in range(150)]
    i2t = []
    for i in range(30):
        best = mean[i, c2i == i].max()
        i2t.append(int((mean[i, c2i != i] >= best).sum()))
    got = retrieval_ranks(imgs, caps, c2i)
    assert got[0].tolist() == i2t and got[1].tolist() == t2i


def test_embeddings_whose_products_could_overflow_are_one_line() -> None:
    # Finite embeddings whose negative products overflow (inf - inf = NaN) would never count a
    # NaN candidate against a query: refused up front. Zero-width embeddings likewise.
    img = np.array([[1e20, 1e20, 0, 0], [0, 0, 1e20, 1e20]], np.float32)
    cap = np.array([[1, 1, 1e20, -1e20], [1e20, -1e20, 1, 1]], np.float32)
    with pytest.raises(GpoLitError, match=r"^img/cap: expected embeddings whose inner products"):
        evaluate(img, cap, np.array([0, 1]))
    with pytest.raises(GpoLitError, match=r"^img: expected a 2-D array \[n_img, d\] with d >= 1"):
        evaluate(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.float32), [0, 1, 2])
