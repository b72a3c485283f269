"""PCMEppLoss against a per-pair loop in float64 (values and gradients), its targets, and its test
similarity through the exact ranker (REFERENCE.md §12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpo_lit.errors import GpoLitError
from gpo_lit.losses import PairEmbeddings, PCMEppLoss, StepInfo, match_targets
from gpo_lit.metrics import evaluate

EPS = 1e-4


def inputs(b: int, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu_i = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    mu_c = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    lv_i = 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64) - 1.5
    lv_c = 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64) - 1.5
    return mu_i, mu_c, lv_i, lv_c


def bce(x, t):
    p = 1 / (1 + torch.exp(-x))
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p))


def loop_pcmepp(mu_i, mu_c, lv_i, lv_c, ids, a, b, alpha, beta, eps=EPS, lam=None, mix_ids=None):
    """The definition pair by pair: d(i, j), logit −a·d + b, smoothed (soft) targets, 2·mean BCE,
    pseudo-positives per image query (rows) and per caption query (columns), KL per modality."""
    n = mu_i.shape[0]
    sigma = lv_i is not None

    def target(i, j):
        own = 1.0 if ids[i] == ids[j] else 0.0
        if lam is None:
            t = own
        else:
            other = 1.0 if mix_ids[i] == ids[j] else 0.0
            t = lam[i] * own + (1 - lam[i]) * other
        return eps + (1 - 2 * eps) * t

    def logit(i, j):
        d = ((mu_i[i] - mu_c[j]) ** 2).sum()
        if sigma:
            d = d + torch.exp(lv_i[i]).sum() + torch.exp(lv_c[j]).sum()
        return -a * d + b

    x = [[logit(i, j) for j in range(n)] for i in range(n)]
    t = [[target(i, j) for j in range(n)] for i in range(n)]
    match = sum(bce(x[i][j], t[i][j]) for i in range(n) for j in range(n)) / n**2
    total = 2 * match

    def first_max(values):
        best = max(values)
        return next(k for k, v in enumerate(values) if v == best), best

    pp_rows = 0
    for i in range(n):  # image i queries the captions
        g, best = first_max([float(t[i][j]) for j in range(n)])
        for j in range(n):
            tt = best if float(x[i][j].detach()) >= float(x[i][g].detach()) else t[i][j]
            pp_rows = pp_rows + bce(x[i][j], tt)
    pp_cols = 0
    for j in range(n):  # caption j queries the images
        g, best = first_max([float(t[i][j]) for i in range(n)])
        for i in range(n):
            tt = best if float(x[i][j].detach()) >= float(x[g][j].detach()) else t[i][j]
            pp_cols = pp_cols + bce(x[i][j], tt)
    total = total + alpha * (pp_rows + pp_cols) / n**2
    if sigma:
        d = mu_i.shape[1]

        def kl(mu, lv):
            terms = [
                -0.5 * (1 + lv[r, k] - mu[r, k] ** 2 - torch.exp(lv[r, k]))
                for r in range(n)
                for k in range(d)
            ]
            return sum(terms) / (n * d)

        total = total + beta * (kl(mu_i, lv_i) + kl(mu_c, lv_c))
    return total


def run_both(mu_i, mu_c, lv_i, lv_c, ids, lam=None, mix_ids=None, **kwargs):
    """(loss value and grads) from PCMEppLoss and from the loop, on fresh leaf copies."""
    sigma = lv_i is not None
    loss_fn = PCMEppLoss(uncertainty=sigma, **kwargs).double()
    with torch.no_grad():  # away from a = b = 5 so the scalars' gradients are tested too
        loss_fn.negative_scale.fill_(2.5)
        loss_fn.shift.fill_(1.5)
    leaves = [
        t.clone().requires_grad_() if t is not None else None for t in (mu_i, mu_c, lv_i, lv_c)
    ]
    got = loss_fn(PairEmbeddings(leaves[0], leaves[1], ids, leaves[2], leaves[3], lam, mix_ids))[0]
    got.backward()
    ref = [t.clone().requires_grad_() if t is not None else None for t in (mu_i, mu_c, lv_i, lv_c)]
    a = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    want = loop_pcmepp(
        *ref,
        ids.tolist(),
        a,
        b,
        kwargs.get("pseudo_positive", 0.1),
        kwargs.get("kl_weight", 1e-4),
        lam=None if lam is None else lam.tolist(),
        mix_ids=None if mix_ids is None else mix_ids.tolist(),
    )
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for x, y in zip(leaves, ref, strict=True):
        if x is not None:
            torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_fn.negative_scale.grad[0], a.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_fn.shift.grad[0], b.grad, atol=1e-6, rtol=0)
    return got


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_with_sigma(seed: int) -> None:
    mu_i, mu_c, lv_i, lv_c = inputs(6, seed=seed)
    run_both(mu_i, mu_c, lv_i, lv_c, torch.arange(6))


def test_matches_loop_same_image_ids_and_big_weights() -> None:
    # Two captions of image 0 (rows 0, 2) and of image 1 (rows 1, 5): more than one positive per
    # row, so "the labelled positive" is the first of them. Large α and β weigh those terms.
    mu_i, mu_c, lv_i, lv_c = inputs(6, seed=2)
    ids = torch.tensor([0, 1, 0, 2, 3, 1])
    mu_i, lv_i = mu_i[ids], lv_i[ids]  # rows sharing an id are the same image
    run_both(mu_i, mu_c, lv_i, lv_c, ids, pseudo_positive=0.7, kl_weight=0.3)


def test_exact_tie_with_the_positive_is_a_pseudo_positive() -> None:
    # Caption 3 is a copy of caption 0: its logit against image 0 ties the positive's exactly,
    # and "at least the positive's logit" relabels it.
    mu_i, mu_c, lv_i, lv_c = inputs(5, seed=9)
    mu_c[3], lv_c[3] = mu_c[0], lv_c[0]
    run_both(mu_i, mu_c, lv_i, lv_c, torch.arange(5), pseudo_positive=1.0)


def test_matches_loop_with_mixed_images() -> None:
    mu_i, mu_c, lv_i, lv_c = inputs(6, seed=4)
    ids = torch.arange(6)
    lam = torch.tensor([1.0, 0.3, 1.0, 0.8, 0.55, 1.0], dtype=torch.float64)
    mix_ids = ids.flip(0)
    run_both(mu_i, mu_c, lv_i, lv_c, ids, lam=lam, mix_ids=mix_ids)


def test_mu_only_matches_loop() -> None:
    mu_i, mu_c, _, _ = inputs(6, seed=5)
    got = run_both(mu_i, mu_c, None, None, torch.arange(6))
    assert PCMEppLoss(uncertainty=False).uses_uncertainty is False
    assert got > 0


def test_pseudo_positives_off_and_kl_guard() -> None:
    mu_i, mu_c, lv_i, lv_c = inputs(5, seed=6)
    run_both(mu_i, mu_c, lv_i, lv_c, torch.arange(5), pseudo_positive=0.0)
    # A KL above kl_max is dropped for the step (the released code's guard): huge σ²
    huge = torch.full_like(lv_i, 12.0)  # σ² = e^12: KL per dim ≈ 8e4
    loss_fn = PCMEppLoss(kl_weight=1.0).double()
    _, parts = loss_fn(PairEmbeddings(mu_i, mu_c, torch.arange(5), huge, lv_c))
    kl_c = -0.5 * (1 + lv_c - mu_c**2 - lv_c.exp()).mean()
    torch.testing.assert_close(parts["kl"], kl_c)  # the image term is gone, the caption one kept


def test_targets_by_hand() -> None:
    # 4 pairs; pairs 0 and 2 share image 7. Image 1 is mixed 0.3 of itself + 0.7 of image 9
    # (pair 3's image); image 3 mixes in image 7 (pairs 0 and 2).
    ids = torch.tensor([7, 8, 7, 9])
    lam = torch.tensor([1.0, 0.3, 1.0, 0.6])
    mix_ids = torch.tensor([9, 9, 8, 7])
    z = torch.zeros(4, 2)
    t = match_targets(PairEmbeddings(z, z, ids, mix_lam=lam, mix_ids=mix_ids))
    want = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.0],
            [0.0, 0.3, 0.0, 0.7],
            [1.0, 0.0, 1.0, 0.0],
            [0.4, 0.0, 0.4, 0.6],
        ]
    )
    torch.testing.assert_close(t, want)
    torch.testing.assert_close(
        match_targets(PairEmbeddings(z, z, ids)), (ids[:, None] == ids).float()
    )


def test_retrieval_vectors_give_minus_d_exactly() -> None:
    mu_i, mu_c, lv_i, lv_c = inputs(7, seed=7)
    loss_fn = PCMEppLoss()
    vi = loss_fn.retrieval_vectors(mu_i, lv_i, "img")
    vc = loss_fn.retrieval_vectors(mu_c, lv_c, "cap")
    assert vi.shape == vc.shape == (7, 7)
    minus_d = torch.tensor(
        [
            [
                -float(((mu_i[i] - mu_c[j]) ** 2).sum() + lv_i[i].exp().sum() + lv_c[j].exp().sum())
                for j in range(7)
            ]
            for i in range(7)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(vi @ vc.t(), minus_d, atol=1e-12, rtol=0)
    # μ-only (no σ): −‖μ_i − μ_j‖²; test_similarity=mean: the plain dot product
    mu_only = PCMEppLoss(uncertainty=False)
    got = (
        mu_only.retrieval_vectors(mu_i, None, "img")
        @ mu_only.retrieval_vectors(mu_c, None, "cap").t()
    )
    torch.testing.assert_close(got, -(torch.cdist(mu_i, mu_c) ** 2), atol=1e-12, rtol=0)
    mean = PCMEppLoss(test_similarity="mean")
    assert torch.equal(mean.retrieval_vectors(mu_i, lv_i, "img"), mu_i)


def brute_force_recalls(sims: torch.Tensor, cap2img: list[int]) -> dict[str, float]:
    """R@1/5/10 both ways from a full similarity matrix, candidates strictly above the GT."""
    n_img, n_cap = sims.shape
    i2t, t2i = [], []
    for i in range(n_img):
        best = max(float(sims[i, j]) for j in range(n_cap) if cap2img[j] == i)
        i2t.append(sum(1 for j in range(n_cap) if float(sims[i, j]) > best))
    for j in range(n_cap):
        gt = float(sims[cap2img[j], j])
        t2i.append(sum(1 for i in range(n_img) if float(sims[i, j]) > gt))
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = 100.0 * sum(r < k for r in i2t) / n_img
        out[f"t2i_r{k}"] = 100.0 * sum(r < k for r in t2i) / n_cap
    return out


def test_exact_ranker_on_retrieval_vectors_ranks_by_minus_d() -> None:
    # σ varies a lot between captions, so ranking by −d differs from ranking by μ·μ.
    g = torch.Generator().manual_seed(8)
    n_img, per = 12, 3
    mu_i = F.normalize(torch.randn(n_img, 4, generator=g, dtype=torch.float64), dim=1)
    cap2img = [i for i in range(n_img) for _ in range(per)]
    mu_c = F.normalize(
        mu_i[cap2img] + 0.8 * torch.randn(n_img * per, 4, generator=g, dtype=torch.float64), dim=1
    )
    lv_i = torch.randn(n_img, 4, generator=g, dtype=torch.float64) - 1.0
    lv_c = 1.5 * torch.randn(n_img * per, 4, generator=g, dtype=torch.float64) - 1.0
    loss_fn = PCMEppLoss()
    vi, vc = (
        loss_fn.retrieval_vectors(mu_i, lv_i, "img"),
        loss_fn.retrieval_vectors(mu_c, lv_c, "cap"),
    )
    minus_d = -(
        torch.cdist(mu_i, mu_c) ** 2 + lv_i.exp().sum(1)[:, None] + lv_c.exp().sum(1)[None, :]
    )
    got = evaluate(vi, vc, torch.tensor(cap2img))
    want = brute_force_recalls(minus_d, cap2img)
    assert {k: got[k] for k in want} == pytest.approx(want)
    by_mean = brute_force_recalls(mu_i @ mu_c.t(), cap2img)
    assert by_mean != want  # the σ terms changed the ranking: the test is not vacuous


def test_training_loss_logs_and_needs_logvar() -> None:
    mu_i, mu_c, lv_i, lv_c = inputs(4)
    out = PCMEppLoss().training_loss(
        PairEmbeddings(mu_i.float(), mu_c.float(), torch.arange(4), lv_i.float(), lv_c.float()),
        StepInfo(),
    )
    assert out.logs["negative_pool"] == 3.0 and out.logs["negative_scale"] == 5.0
    assert {"loss_match", "loss_pseudo_positive", "loss_kl", "shift"} <= out.logs.keys()
    with pytest.raises(GpoLitError, match="log σ²"):
        PCMEppLoss()(PairEmbeddings(mu_i, mu_c, torch.arange(4)))


def test_initial_logit_of_identical_points_is_b() -> None:
    # d = 0 + Σσ² terms: with σ² → 0 the logit is b; a and b start at 5 (REFERENCE)
    loss_fn = PCMEppLoss()
    mu = F.normalize(torch.ones(1, 3), dim=1)
    tiny = torch.full((1, 3), -50.0)
    assert float(loss_fn.logits(mu, tiny.exp(), mu, tiny.exp()).detach()) == pytest.approx(5.0)
    two = torch.zeros(1, 3)  # σ² = 1 in 3 dims each: d = 6
    assert float(loss_fn.logits(mu, two.exp(), mu, two.exp()).detach()) == pytest.approx(5 - 5 * 6)
    assert math.isclose(float(loss_fn.negative_scale.detach()), 5.0)


def test_bad_options_are_one_line() -> None:
    for kwargs, key in [
        ({"label_smoothing": 0.5}, "loss.label_smoothing"),
        ({"test_similarity": "kl"}, "loss.test_similarity"),
        ({"mask_same_image": False}, "loss.mask_same_image"),
    ]:
        with pytest.raises(GpoLitError, match=key) as info:
            PCMEppLoss(**kwargs)
        assert "\n" not in str(info.value)


def test_pseudo_positive_start_epoch_leaves_the_term_out_before_it() -> None:
    # Before the start epoch the loss is PCME++ without the α term (the loop with α = 0); from it
    # on it is the released loss (the loop with α); the relabelled pairs per query are counted.
    mu_i, mu_c, lv_i, lv_c = inputs(6, seed=3)
    ids = torch.arange(6)
    batch = PairEmbeddings(mu_i, mu_c, ids, lv_i, lv_c)
    late = PCMEppLoss(pseudo_positive=0.5, pseudo_positive_start_epoch=2).double()
    a, b = late.negative_scale.detach()[0], late.shift.detach()[0]
    without = loop_pcmepp(mu_i, mu_c, lv_i, lv_c, ids.tolist(), a, b, 0.0, 1e-4)
    with_pp = loop_pcmepp(mu_i, mu_c, lv_i, lv_c, ids.tolist(), a, b, 0.5, 1e-4)
    assert not torch.isclose(without, with_pp)  # the term matters on these inputs
    for epoch, want in ((0, without), (1, without), (2, with_pp), (5, with_pp)):
        out = late.training_loss(batch, StepInfo(epoch=epoch))
        torch.testing.assert_close(out.value, want, atol=1e-9, rtol=0)
        assert ("loss_pseudo_positive" in out.logs) is (epoch >= 2)
    # relabelled pairs: logit ≥ the positive's, other than the positive, by rows and by columns
    x = late.logits(mu_i, lv_i.exp(), mu_c, lv_c.exp()).detach()
    pos = x.diagonal()
    n_rows = sum(int(x[i, j] >= pos[i]) for i in range(6) for j in range(6) if j != i)
    n_cols = sum(int(x[i, j] >= pos[j]) for i in range(6) for j in range(6) if i != j)
    got = late.training_loss(batch, StepInfo(epoch=2)).logs["pseudo_positives_per_query"]
    assert float(got) == pytest.approx((n_rows + n_cols) / 12) and n_rows + n_cols > 0
    released = PCMEppLoss(pseudo_positive=0.5).double()  # start epoch 0: from the first step
    torch.testing.assert_close(
        released.training_loss(batch, StepInfo(epoch=0)).value, with_pp, atol=1e-9, rtol=0
    )


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_pseudo_positive_start_epoch_must_be_a_count(bad) -> None:
    with pytest.raises(GpoLitError, match="loss.pseudo_positive_start_epoch: expected an integer"):
        PCMEppLoss(pseudo_positive_start_epoch=bad)
