"""Retrieval metrics against independent references (REFERENCE §6).

The reference ranks are computed the way the authors' evaluation code does: the full similarity
matrix, then a per-query ``argsort``; i2t rank = best position of the image's ground-truth
captions, t2i rank = position of the caption's image. Continuous random data (no ties) makes that
reference unambiguous; ties are covered by hand-worked examples.
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


def naive_ranks(sims: np.ndarray, cap2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def naive_metrics(sims: np.ndarray, cap2img: np.ndarray) -> dict[str, float]:
    """R@1/5/10, medr, meanr, rsum written out independently of ``recall_metrics``."""
    out: dict[str, float] = {}
    for name, r in zip(("i2t", "t2i"), naive_ranks(sims, cap2img), strict=True):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.count_nonzero(r < k) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


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


@pytest.mark.parametrize("shard_size", [1, 3, 16, 37, 1000])
def test_ranks_match_naive_argsort(shard_size: int) -> None:
    img, cap, cap2img = random_data(37)
    want_i2t, want_t2i = naive_ranks(img @ cap.T, cap2img)
    i2t, t2i = retrieval_ranks(torch.from_numpy(img), torch.from_numpy(cap), cap2img, shard_size)
    assert i2t.dtype == t2i.dtype == torch.int64
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)


def test_ranks_float32_and_numpy_inputs() -> None:
    img, cap, cap2img = random_data(50, d=32, seed=1, dtype=np.float32)
    want = naive_ranks(img.astype(np.float64) @ cap.astype(np.float64).T, cap2img)
    got = retrieval_ranks(img, cap, cap2img.tolist(), shard_size=8)  # numpy + a plain list
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.numpy(), w)


def test_ties_count_in_the_querys_favour() -> None:
    # 2-D embeddings with exactly representable similarities:
    #          c0   c1   c2   c3          cap2img = [0, 1, 2, 2]
    #   i0  [ 1.0  0.5  0.5  0.0 ]
    #   i1  [ 0.0  0.5  0.5  1.0 ]
    #   i2  [ 1.0  0.5  0.5  0.0 ]
    # i2t: i0 best GT c0=1 → none above → 0; i1 GT c1=.5 → c3 above, c2 ties → 1;
    #      i2 best GT max(c2, c3)=.5 → c0 above, c1 ties → 1.
    # t2i: c0 (GT i0=1) i2 ties → 0; c1, c2 all tie at .5 → 0; c3 (GT i2=0) → i1 above → 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    cap = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    cap2img = torch.tensor([0, 1, 2, 2])
    for shard_size in (1, 2, 3):
        i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size)
        assert i2t.tolist() == [0, 1, 1]
        assert t2i.tolist() == [0, 0, 0, 1]


def test_near_tie_one_ulp_above_counts() -> None:
    # float32, exact arithmetic:        c0          c1      c2       cap2img = [1, 2, 0]
    #   i0 = (2^-23, 1)          [ 0.5 + 2^-24   2^-23    1.0 ]
    #   i1 = (0, 1)              [ 0.5           0.0      1.0 ]
    #   i2 = (1, 0)              [ 0.5           1.0      0.0 ]
    # c0's ground truth i1 = 0.5 is beaten by i0 by one ulp: rank 1, no epsilon. With one image
    # per shard, i0's entry is seen before the exact GT value exists (kept, resolved at the end).
    img = torch.tensor([[2.0**-23, 1.0], [0.0, 1.0], [1.0, 0.0]])
    cap = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    for shard_size in (1, 2, 3):
        i2t, t2i = retrieval_ranks(img, cap, torch.tensor([1, 2, 0]), shard_size)
        assert i2t.tolist() == [0, 1, 0]
        assert t2i.tolist() == [1, 0, 0]


def test_identical_embeddings_all_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every similarity ties exactly (0.5·0.5·4 = 1): all ranks 0, every recall 100. With one image
    # per shard the near-tie band overflows its memory budget: the columns are recounted.
    calls = []
    real = ranks_mod._recount
    monkeypatch.setattr(ranks_mod, "_recount", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _, _, cap2img = random_data(40)
    img = torch.full((40, 4), 0.5)
    cap = torch.full((len(cap2img), 4), 0.5)
    for shard_size in (1, 7, 64):
        i2t, t2i = retrieval_ranks(img, cap, cap2img, shard_size)
        assert not i2t.any() and not t2i.any()
    assert calls, "the overflow path was not exercised"
    m = evaluate(img, cap, cap2img)
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0


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
    assert "junk.npz" in _err(load_embeddings, tmp_path / "junk.npz")
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
