"""PCME++'s mixed-sample augmentation (REFERENCE.md §12): what each image becomes, and how often."""

from __future__ import annotations

import pytest
import torch

from gpo_lit.data.mixing import MixedSampleAugment
from gpo_lit.errors import GpoLitError


def classify(x: torch.Tensor, out: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor):
    """Per image: 'none', 'mixup' or 'cutmix', checking the output against each definition."""
    kinds = []
    for i in range(x.shape[0]):
        own, other = x[i], x[int(partner[i])]
        if float(lam[i]) == 1.0:
            assert torch.equal(out[i], own)
            kinds.append("none")
            continue
        from_own = (out[i] == own).all(0)  # [H, W] pixels (all channels) left as they were
        from_other = (out[i] == other).all(0)
        if bool((from_own | from_other).all()):
            # CutMix: one axis-aligned box from the partner, λ = the fraction left visible
            rows, cols = from_other.any(1).nonzero(), from_other.any(0).nonzero()
            box = torch.zeros_like(from_other)
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            assert torch.equal(box, from_other)
            assert float(lam[i]) == pytest.approx(float(from_own.float().mean()))
            kinds.append("cutmix")
        else:
            torch.testing.assert_close(out[i], lam[i] * own + (1 - lam[i]) * other)
            kinds.append("mixup")
    return kinds


def test_each_image_is_itself_a_mixup_or_a_cutmix_of_its_partner() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)  # distinct values: every pixel tells where it came from
    out, lam, partner = MixedSampleAugment(p=0.5)(x.clone())
    assert torch.equal(partner, torch.arange(63, -1, -1))
    kinds = classify(x, out, lam, partner)
    assert {"none", "mixup", "cutmix"} <= set(kinds)
    assert x.shape == out.shape and lam.shape == (64,)


def test_rates_and_lambda_distribution() -> None:
    torch.manual_seed(1)
    b = 6000
    x = torch.rand(b, 1, 8, 8)
    out, lam, partner = MixedSampleAugment()(x)  # p = 0.25, CutMix half of them, Beta(2, 2)
    kinds = classify(x, out, lam, partner)
    mixed = [k for k in kinds if k != "none"]
    assert len(mixed) / b == pytest.approx(0.25, abs=0.02)
    assert mixed.count("cutmix") / len(mixed) == pytest.approx(0.5, abs=0.04)
    mixup_lam = torch.tensor([float(lam[i]) for i, k in enumerate(kinds) if k == "mixup"])
    # Beta(2, 2): mean 1/2, variance 1/20
    assert float(mixup_lam.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(mixup_lam.var()) == pytest.approx(0.05, abs=0.008)


def test_cutmix_area_distribution_matches_the_recipe() -> None:
    """The pasted area's distribution equals an independent simulation of the recipe: side
    ``int(H·√(1−λ))``, λ ~ Beta(2, 2), centre uniform, box ``centre ± side // 2`` clipped."""
    import numpy as np

    rng = np.random.default_rng(0)
    h = w = 20
    lam0 = rng.beta(2, 2, 200_000)
    cut = (h * np.sqrt(1 - lam0)).astype(int)
    cy, cx = rng.integers(0, h, lam0.size), rng.integers(0, w, lam0.size)
    hy = np.clip(cy + cut // 2, 0, h) - np.clip(cy - cut // 2, 0, h)
    wx = np.clip(cx + cut // 2, 0, w) - np.clip(cx - cut // 2, 0, w)
    ref = hy * wx / (h * w)

    torch.manual_seed(2)
    x = torch.rand(4000, 1, h, w)
    out, lam, partner = MixedSampleAugment(p=1.0, cutmix_prob=1.0)(x)
    kinds = classify(x, out, lam, partner)
    assert set(kinds) <= {"cutmix", "none"}  # "none": an empty box (λ near 1)
    area = (1 - lam).numpy()
    assert float(area.mean()) == pytest.approx(float(ref.mean()), abs=0.01)
    for q in (0.25, 0.5, 0.75, 0.9):
        assert float(np.quantile(area, q)) == pytest.approx(float(np.quantile(ref, q)), abs=0.03)


def test_precomputed_sets_are_one_line() -> None:
    with pytest.raises(GpoLitError, match="loss.mixing.*raw images.*loss.mixing=null") as info:
        MixedSampleAugment()(torch.zeros(4, 36, 2048))
    assert "\n" not in str(info.value)


def test_bad_options_are_one_line() -> None:
    with pytest.raises(GpoLitError, match="loss.mixing.p"):
        MixedSampleAugment(p=1.5)
    with pytest.raises(GpoLitError, match="loss.mixing.alpha"):
        MixedSampleAugment(alpha=0)
