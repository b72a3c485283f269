"""COCO testall protocols against the eccv-caption package (REFERENCE §11), top-K lists, sizes.

The COCO-5K-shaped data sit on the package's own test ids (25,000 captions in its 5-fold order,
5 per image): each caption is its image's embedding plus noise, so ground-truth matches rank high
but not always first. Reference top-500 lists are built here by brute force (numpy, float64: no
ties), and the package's own functions score them. Those tests take ~20 s of CPU together: slow.
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
from helpers import eval_here, tiny_model

import gpo_lit
from gpo_lit.errors import GpoLitError
from gpo_lit.metrics import evaluate_protocols, format_table, save_embeddings, topk_lists
from gpo_lit.metrics.__main__ import main as cli_main
from gpo_lit.metrics.eccv import CocoIds, find_ids_dir, read_coco_ids
from gpo_lit.metrics.ranks import prepare_embeddings
from gpo_lit.metrics.topk import per_query_results

eccv_caption = pytest.importorskip("eccv_caption")


def package():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no ujson
        return eccv_caption.Metrics()


def write_cxc_annots(root: Path, per_cap_img: np.ndarray, cap_ids: np.ndarray) -> Path:
    folder = root / "cxc_annots"
    folder.mkdir(parents=True)
    (folder / "testall_ids.txt").write_text("\n".join(map(str, per_cap_img)) + "\n")
    (folder / "testall_capids.txt").write_text("\n".join(map(str, cap_ids)) + "\n")
    return folder


@pytest.fixture(scope="module")
def coco5k(tmp_path_factory):
    m = package()
    cap_ids = np.asarray(m.coco_ids, dtype=np.int64)
    per_cap_img = np.array([m.coco_gts["t2i"][int(c)][0] for c in cap_ids], dtype=np.int64)
    _, first = np.unique(per_cap_img, return_index=True)
    img_ids = per_cap_img[np.sort(first)]  # images in the order their captions come
    index = {c: i for i, c in enumerate(img_ids.tolist())}
    cap2img = np.array([index[c] for c in per_cap_img.tolist()], dtype=np.int64)
    assert (img_ids[cap2img] == per_cap_img).all() and len(img_ids) == 5000
    rng = np.random.default_rng(0)
    img = rng.standard_normal((5000, 32))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap = img[cap2img] + 0.3 * rng.standard_normal((25000, 32))
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    root = tmp_path_factory.mktemp("coco")
    write_cxc_annots(root, per_cap_img, cap_ids)
    ids = read_coco_ids(find_ids_dir(None, root / "precomp"), cap2img)
    return {
        "m": m, "img": img, "cap": cap, "cap2img": cap2img, "ids": ids, "root": root,
        "img_ids": img_ids, "cap_ids": cap_ids, "per_cap_img": per_cap_img,
    }  # fmt: skip


def brute_top(q: np.ndarray, g: np.ndarray, k: int = 500) -> np.ndarray:
    """Indices of each query's top k gallery items, best first (full products, argpartition)."""
    out = np.empty((len(q), k), dtype=np.int64)
    for c0 in range(0, len(q), 2000):
        s = q[c0 : c0 + 2000] @ g.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
        out[c0 : c0 + 2000] = np.take_along_axis(part, order, axis=1)
    return out


@pytest.fixture(scope="module")
def lists(coco5k):
    d = coco5k
    i2t, t2i = brute_top(d["img"], d["cap"]), brute_top(d["cap"], d["img"])
    return {
        "i2t_idx": i2t,
        "t2i_idx": t2i,
        "i2t": dict(zip(d["img_ids"].tolist(), d["cap_ids"][i2t].tolist(), strict=True)),
        "t2i": dict(zip(d["cap_ids"].tolist(), d["img_ids"][t2i].tolist(), strict=True)),
    }


@pytest.fixture(scope="module")
def ours(coco5k):
    d = coco5k
    protocols = ["coco_1k", "coco_5k", "eccv", "cxc"]
    return evaluate_protocols(d["img"], d["cap"], d["cap2img"], protocols, coco_ids=d["ids"])


@pytest.mark.slow  # COCO 5K x 25K lists: ~20 s of CPU
def test_topk_lists_equal_brute_force_at_coco_size(coco5k, lists) -> None:
    p = prepare_embeddings(coco5k["img"], coco5k["cap"], coco5k["cap2img"])
    np.testing.assert_array_equal(topk_lists(p, "i2t", 500).numpy(), lists["i2t_idx"])
    np.testing.assert_array_equal(topk_lists(p, "t2i", 500).numpy(), lists["t2i_idx"])


@pytest.mark.slow  # COCO 5K x 25K lists: ~20 s of CPU
def test_coco_recalls_equal_the_packages_on_the_same_lists(coco5k, lists, ours) -> None:
    got = coco5k["m"].compute_all_metrics(
        lists["i2t"], lists["t2i"], ["coco_1k_recalls", "coco_5k_recalls"], Ks=(1, 5, 10)
    )
    for proto in ("coco_1k", "coco_5k"):
        for k in (1, 5, 10):
            for d in ("i2t", "t2i"):
                want = 100.0 * got[f"{proto}_r{k}"][d]
                assert ours[proto][f"{d}_r{k}"] == pytest.approx(want, abs=1e-9), (proto, d, k)
    assert 20 < ours["coco_5k"]["t2i_r1"] < 90  # the data are neither trivial nor hopeless
    assert ours["coco_1k"]["t2i_r1"] > ours["coco_5k"]["t2i_r1"]


@pytest.mark.slow  # COCO 5K x 25K lists: ~20 s of CPU
def test_eccv_and_cxc_come_from_the_package(coco5k, lists, ours) -> None:
    with __import__("contextlib").redirect_stderr(__import__("io").StringIO()):
        got = coco5k["m"].compute_all_metrics(
            lists["i2t"],
            lists["t2i"],
            ["eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls"],
            Ks=(1, 5, 10),
        )
    assert set(ours["eccv"]) == {
        f"{d}_{m}" for d in ("i2t", "t2i") for m in ("map_at_r", "rprecision", "r1")
    }
    assert set(ours["cxc"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for d in ("i2t", "t2i"):
        for m in ("map_at_r", "rprecision", "r1"):
            assert ours["eccv"][f"{d}_{m}"] == pytest.approx(100 * got[f"eccv_{m}"][d], abs=1e-9)
        for k in (1, 5, 10):
            assert ours["cxc"][f"{d}_r{k}"] == pytest.approx(100 * got[f"cxc_r{k}"][d], abs=1e-9)
    assert 0 < ours["eccv"]["i2t_map_at_r"] < ours["eccv"]["i2t_r1"] < 100
    # CxC adds positives: its R@K can only be at least the 5K one on the same lists
    assert ours["cxc"]["t2i_r5"] >= ours["coco_5k"]["t2i_r5"]
    table = format_table(ours)
    assert "| eccv | " in table and "I2T mAP@R" in table and "| cxc | " in table


def test_ids_are_checked_against_the_split_and_the_package(coco5k, tmp_path: Path) -> None:
    d = coco5k
    # the folder holding cxc_annots/ (README), or cxc_annots/ itself
    for given in (d["root"], d["root"] / "cxc_annots"):
        again = read_coco_ids(find_ids_dir(given, None), d["cap2img"])
        assert (again.img == d["ids"].img).all() and (again.cap == d["ids"].cap).all()
    with pytest.raises(GpoLitError, match="found no .*testall_capids.txt.*VSE-infinity"):
        find_ids_dir(None, tmp_path / "precomp")
    shuffled = d["cap_ids"].copy()
    shuffled[[0, 5]] = shuffled[[5, 0]]  # caption 0 now names image 1's caption
    folder = write_cxc_annots(tmp_path / "a", d["per_cap_img"], shuffled)
    ids = read_coco_ids(folder, d["cap2img"])  # consistent files, but wrong pairs
    with pytest.raises(GpoLitError, match="paired with another image"):
        evaluate_protocols(d["img"], d["cap"], d["cap2img"], ["cxc"], coco_ids=ids)
    bad = d["per_cap_img"].copy()
    bad[1] = bad[5]
    folder = write_cxc_annots(tmp_path / "b", bad, d["cap_ids"])
    with pytest.raises(GpoLitError, match="one image id for all captions of an image"):
        read_coco_ids(folder, d["cap2img"])
    other = CocoIds(d["img_ids"], d["cap_ids"] + 1, "x")
    with pytest.raises(GpoLitError, match="25000 caption ids of the COCO 5K test split"):
        evaluate_protocols(d["img"], d["cap"], d["cap2img"], ["eccv"], coco_ids=other)
    with pytest.raises(GpoLitError, match="split's own ids file.*5000 images with another id"):
        read_coco_ids(d["root"] / "cxc_annots", d["cap2img"], [str(i + 1) for i in d["img_ids"]])
    with pytest.raises(GpoLitError, match="expected the split's COCO ids"):
        evaluate_protocols(d["img"], d["cap"], d["cap2img"], ["eccv"])


# ---------------------------------------------------------------------------------------------
# small cases: ties, sizes, the command line


def brute_order(s: np.ndarray, positive, k: int) -> np.ndarray:
    """Each row's top k: similarity desc, then positives last, then index (ties vs the query)."""
    return np.array(
        [sorted(range(s.shape[1]), key=lambda g, q=q: (-s[q, g], positive(q, g), g))[:k]
         for q in range(s.shape[0])]
    )  # fmt: skip


@pytest.mark.parametrize("k", [1, 3, 8, 200])
def test_topk_ties_count_against_the_query(k: int) -> None:
    rng = np.random.default_rng(k)
    img = rng.integers(0, 2, (30, 3)).astype(np.float32)  # massive exact ties
    cap = rng.integers(0, 2, (70, 3)).astype(np.float32)
    c2i = np.concatenate([np.arange(30), rng.integers(0, 30, 40)])
    p = prepare_embeddings(img, cap, c2i)
    s = img.astype(np.float64) @ cap.T.astype(np.float64)
    got = topk_lists(p, "i2t", k, shard_size=7).numpy()
    np.testing.assert_array_equal(got, brute_order(s, lambda q, g: c2i[g] == q, min(k, 70)))
    got = topk_lists(p, "t2i", k, shard_size=4).numpy()
    np.testing.assert_array_equal(got, brute_order(s.T, lambda q, g: c2i[q] == g, min(k, 30)))
    # other positives, a subset of queries
    pos = (np.array([0, 0, 5]), np.array([1, 2, 9]))
    got = topk_lists(p, "i2t", k, positives=pos, queries=[5, 0]).numpy()
    want = brute_order(s, lambda q, g: (q, g) in {(0, 1), (0, 2), (5, 9)}, min(k, 70))
    np.testing.assert_array_equal(got, want[[5, 0]])


def test_a_constant_model_scores_zero_not_chance() -> None:
    """All similarities equal: every ground truth is last among its ties."""
    img, cap = np.ones((4, 2), np.float32), np.ones((8, 2), np.float32)
    c2i = np.repeat(np.arange(4), 2)
    p = prepare_embeddings(img, cap, c2i)
    top = topk_lists(p, "t2i", 3).numpy()
    assert not (top == c2i[:, None]).any()
    res = per_query_results(p, k=2)
    assert res["i2t_top"].shape == (4, 2) and res["t2i_top"].shape == (8, 2)
    assert not (c2i[res["i2t_top"]] == np.arange(4)[:, None]).any()


def test_sizes_are_checked() -> None:
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((40, 4)), rng.standard_normal((80, 4))
    c2i = np.repeat(np.arange(40), 2)
    for proto, n in (("coco_5k", 5000), ("f30k_1k", 1000), ("coco_1k", 5000), ("eccv", 5000)):
        with pytest.raises(GpoLitError, match=f"protocol {proto}: expected {n} images.*found 40"):
            evaluate_protocols(img, cap, c2i, [proto])
    assert set(evaluate_protocols(img, cap, c2i, ["full"])["full"]) >= {"rsum", "i2t_r1"}


def test_cli_refuses_a_protocol_of_another_size_in_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = save_embeddings(
        tmp_path / "x.npz",
        rng.standard_normal((1000, 4)),
        rng.standard_normal((2000, 4)),
        np.repeat(np.arange(1000), 2),
    )
    src = str(Path(gpo_lit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "gpo_lit.metrics", str(path), "--protocol", "coco_5k"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "coco_5k: expected 5000 images" in proc.stderr and "found 1000" in proc.stderr
    assert (
        cli_main([str(path), "--protocol", "f30k_1k,full", "--json", str(tmp_path / "m.json")]) == 0
    )
    assert set(json.loads((tmp_path / "m.json").read_text())) == {"f30k_1k", "full"}
    assert cli_main([str(path), "--protocol", "full", "--json", str(tmp_path / "m.json")]) == 2


@pytest.mark.slow
def test_cli_eccv_and_cxc(coco5k, ours, tmp_path: Path, capsys) -> None:
    d = coco5k
    path = save_embeddings(tmp_path / "e.npz", d["img"], d["cap"], d["cap2img"])
    out = tmp_path / "m.json"
    argv = [str(path), "--protocol", "coco_5k,eccv,cxc", "--coco-ids", str(d["root"])]
    assert cli_main([*argv, "--json", str(out)]) == 0
    assert "| eccv |" in capsys.readouterr().out
    got = json.loads(out.read_text())
    for proto in ("eccv", "cxc"):  # float32 on disk: the same lists up to rare near-ties
        for key, value in ours[proto].items():
            assert got[proto][key] == pytest.approx(value, abs=0.1), (proto, key)


def test_cli_eccv_needs_the_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    path = save_embeddings(
        tmp_path / "x.npz",
        torch.randn(5000, 4, generator=torch.Generator().manual_seed(0)),
        rng.standard_normal((5000, 4)),
        np.arange(5000),
    )
    assert cli_main([str(path), "--protocol", "eccv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--coco-ids" in err


@pytest.mark.slow
def test_make_eval_with_eccv_and_cxc_on_a_coco_shaped_split(coco5k, tmp_path: Path, capsys) -> None:
    """``make eval CKPT=… protocols=[coco_1k,coco_5k,eccv,cxc]`` on a COCO-shaped precomp split
    (the package's ids; the CxC files beside precomp/ as in the authors' layout), a tiny model."""

    d = coco5k
    root = tmp_path / "coco"
    pre = root / "precomp"
    pre.mkdir(parents=True)
    rng = np.random.default_rng(5)
    np.save(pre / "testall_ims.npy", rng.standard_normal((5000, 2, 6)).astype(np.float32))
    words = ["red", "ball", "dog"]  # tiny_model knows red and ball; lengths 9-14: few duplicates
    caps = [" ".join(rng.choice(words, rng.integers(9, 15))) for _ in range(25000)]
    (pre / "testall_caps.txt").write_text("\n".join(caps) + "\n")
    (pre / "testall_ids.txt").write_text("\n".join(map(str, d["img_ids"])) + "\n")
    write_cxc_annots(root, d["per_cap_img"], d["cap_ids"])
    model = tiny_model()
    data = {"_target_": "gpo_lit.data.datamodule.RetrievalDataModule", "root": str(pre)}
    data.update(test_split="testall", eval_batch_size=2500)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "hyper_parameters": dict(model.hparams),
            "state_dict": model.state_dict(),
            "gpo_lit_config": {"data": data},
        },
        ckpt,
    )
    out = tmp_path / "eval"
    capsys.readouterr()
    eval_here(out, f"ckpt={ckpt}", "protocols=[coco_1k,coco_5k,eccv,cxc]", "save_embeddings=true")
    printed = capsys.readouterr().out  # in this process: gpo-eval's wiring is test_train_eval's
    assert "| eccv |" in printed and "| cxc |" in printed and "I2T mAP@R" in printed
    got = json.loads((out / "metrics.json").read_text())
    assert set(got) == {"coco_1k", "coco_5k", "eccv", "cxc"}
    from gpo_lit.metrics import load_embeddings

    img, cap, cap2img = load_embeddings(out / "embeddings.npz")
    want = evaluate_protocols(img, cap, cap2img, list(got), coco_ids=d["ids"])
    for proto in got:
        assert got[proto] == pytest.approx(want[proto], abs=1e-9), proto
