"""bench/scale_model.py: its counts against hand-worked figures, its scaling arithmetic."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scale_model", ROOT / "bench" / "scale_model.py")
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)


def test_counts_a_linear_layer_by_hand() -> None:
    import torch

    flops, act, params = scale.count(lambda: nn.Linear(3, 4), lambda: (torch.randn(5, 3),))
    assert flops == 3 * 2 * 5 * 3 * 4  # forward 2·B·in·out, backward twice that
    assert params == 3 * 4 + 4
    assert act == 5 * 3 * 4  # the input, saved for the weight gradient (fp32); weights excluded


def test_scaling_arithmetic() -> None:
    flops, act, params, batch, peak, mfu = 1e12, 10**6, 10**8, 128, 100e12, 0.5
    one = scale.estimate(flops, act, params, batch, 1, peak, mfu)
    eight = scale.estimate(flops, act, params, batch, 8, peak, mfu)
    assert one[0] == pytest.approx(1e12 * 128 / 50e12)  # no all-reduce on one GPU
    ring = 2 * 7 / 8 * 4e8 / scale.INTRA_BW
    assert eight[0] == pytest.approx(1e12 * 16 / 50e12 + ring)
    assert one[1] == 16 * 10**8 + 128 * 10**6 + 4 * 128 * 128
    assert eight[2] == 127 and eight[3] == 4 * 128 * 128  # gathered negatives, similarity bytes
    assert scale.allreduce_s(4e8, 64) == pytest.approx(2 * 63 / 64 * 4e8 / scale.INTER_BW)
    assert math.floor(scale.EPOCH_PAIRS["COCO"] / 128) == 4425


@pytest.mark.slow
def test_script_prints_one_row_per_recipe_and_gpu_count(capsys) -> None:
    scale.main(["--only", "region + BERT", "--gpu", "h100"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| region + BERT |")]
    assert [r.split("|")[5].strip() for r in rows] == ["1", "8", "64"]
    gflops = [float(r.split("|")[2]) for r in rows]
    # BERT-base over 32 tokens dominates: ~85 M weights outside the embeddings, 2 FLOPs each per
    # token, × 3 for forward + backward ≈ 16 GFLOPs (+ attention and the region MLP)
    assert 15 < gflops[0] < 20
