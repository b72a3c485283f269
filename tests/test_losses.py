"""TripletLoss against an explicit double loop over (i, j) (REFERENCE.md §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpo_lit.losses import TripletLoss

MARGIN = 0.2


def loop_loss(img, cap, hardest, margin=MARGIN, img_ids=None):
    """The definition, term by term: caption retrieval [α + S_ij − S_ii]₊, image retrieval
    [α + S_ij − S_jj]₊, over negatives j ≠ i (and, with img_ids, of a different image)."""
    b = img.shape[0]
    s = [[img[i] @ cap[j] for j in range(b)] for i in range(b)]

    def negative(i, j):
        return i != j and (img_ids is None or img_ids[i] != img_ids[j])

    zero = img.new_zeros(())
    cap_terms = [
        [(margin + s[i][j] - s[i][i]).clamp(min=0) if negative(i, j) else zero for j in range(b)]
        for i in range(b)
    ]
    img_terms = [
        [(margin + s[i][j] - s[j][j]).clamp(min=0) if negative(i, j) else zero for j in range(b)]
        for i in range(b)
    ]
    if hardest:
        total = sum(torch.stack(cap_terms[i]).max() for i in range(b))
        return total + sum(torch.stack([img_terms[i][j] for i in range(b)]).max() for j in range(b))
    return sum(sum(row) for row in cap_terms) + sum(sum(row) for row in img_terms)


def embeddings(b, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    cap = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return img, cap


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop(hardest, seed):
    img, cap = embeddings(7, seed=seed)
    got = TripletLoss(margin=MARGIN)(img, cap, hardest=hardest)
    assert got.shape == ()
    torch.testing.assert_close(got, loop_loss(img, cap, hardest))


def test_hand_worked_2x2():
    # Unnormalised vectors chosen for round scores (the loss itself does not normalise).
    img = torch.tensor([[1.0, 0.0], [0.3, 0.9]])
    cap = torch.tensor([[1.0, 0.9], [0.5, 1 / 3]])
    s = img @ cap.t()
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.5], [1.11, 0.45]]))
    # caption retrieval: row 0: [.2 + .5 - 1]₊ = 0; row 1: [.2 + 1.11 - .45]₊ = .86
    # image retrieval:   col 0: [.2 + 1.11 - 1]₊ = .31; col 1: [.2 + .5 - .45]₊ = .25
    loss = TripletLoss(margin=0.2)
    torch.testing.assert_close(loss(img, cap, hardest=False), torch.tensor(0.86 + 0.31 + 0.25))
    # with one negative per query, hardest == all
    torch.testing.assert_close(loss(img, cap, hardest=True), torch.tensor(0.86 + 0.31 + 0.25))


def test_hardest_picks_max_per_query():
    # 3×3: row 0 has two violating negatives; hardest keeps only the larger.
    s = torch.tensor([[0.5, 0.6, 0.4], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    img, cap = s, torch.eye(3)  # img @ I = s
    # caption retrieval rows: max(.3, .1)=.3, 0, 0; image retrieval cols: col0 max(-.3,-.3)->0,
    # col1 [.2+.6-1]₊=0, col2 [.2+.4-1]₊=0
    torch.testing.assert_close(TripletLoss()(img, cap, hardest=True), torch.tensor(0.3))
    torch.testing.assert_close(TripletLoss()(img, cap, hardest=False), torch.tensor(0.4))


def test_diagonal_excluded():
    # Identical embeddings: every score equals the positive, so each off-diagonal term is exactly α;
    # a diagonal term would also be α. All negatives: 2 · B(B−1) · α, not 2 · B² · α.
    b = 5
    img = cap = F.normalize(torch.ones(b, 4), dim=1)
    torch.testing.assert_close(
        TripletLoss()(img, cap, hardest=False), torch.tensor(2 * b * (b - 1) * MARGIN)
    )
    torch.testing.assert_close(TripletLoss()(img, cap, hardest=True), torch.tensor(2 * b * MARGIN))
    # B = 1: no negatives at all
    assert TripletLoss()(img[:1], cap[:1]).item() == 0.0


@pytest.mark.parametrize("hardest", [True, False])
def test_mask_same_image_matches_loop(hardest):
    img, cap = embeddings(8, seed=3)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0])
    img = img[ids]  # rows that share an id are the same image
    got = TripletLoss(mask_same_image=True)(img, cap, img_ids=ids, hardest=hardest)
    torch.testing.assert_close(got, loop_loss(img, cap, hardest, img_ids=ids.tolist()))
    unmasked = TripletLoss()(img, cap, img_ids=ids, hardest=hardest)  # off by default: ids ignored
    torch.testing.assert_close(unmasked, loop_loss(img, cap, hardest))
    assert got < unmasked


def test_mask_same_image_needs_ids():
    img, cap = embeddings(3)
    with pytest.raises(ValueError, match="img_ids"):
        TripletLoss(mask_same_image=True)(img, cap)
    with pytest.raises(ValueError, match="img_ids"):
        TripletLoss(mask_same_image=True)(img, cap, img_ids=torch.tensor([0, 1]))


def test_sum_reduction_scales_with_batch():
    # Two copies of a batch in orthogonal subspaces: cross-copy scores are 0, which violate nothing
    # when every positive is >= α. The loss of the doubled batch is then exactly twice the loss.
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
    cap = F.normalize(img + 0.5 * torch.randn(6, 3, generator=g, dtype=torch.float64), dim=1)
    assert (img * cap).sum(1).min() >= MARGIN
    z = torch.zeros_like(img)
    big_img = torch.cat([torch.cat([img, z], 1), torch.cat([z, img], 1)])
    big_cap = torch.cat([torch.cat([cap, z], 1), torch.cat([z, cap], 1)])
    for hardest in (True, False):
        one = TripletLoss()(img, cap, hardest=hardest)
        two = TripletLoss()(big_img, big_cap, hardest=hardest)
        assert one > 0
        torch.testing.assert_close(two, 2 * one)  # a sum, not a mean


@pytest.mark.parametrize("hardest", [True, False])
def test_gradient_matches_loop(hardest):
    img, cap = embeddings(6, seed=5)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    for mask in (False, True):
        a_img, a_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
        b_img, b_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
        TripletLoss(mask_same_image=mask)(a_img, a_cap, img_ids=ids, hardest=hardest).backward()
        loop_loss(b_img, b_cap, hardest, img_ids=ids.tolist() if mask else None).backward()
        torch.testing.assert_close(a_img.grad, b_img.grad)
        torch.testing.assert_close(a_cap.grad, b_cap.grad)


def test_hardest_for_epoch():
    loss = TripletLoss()
    assert [loss.hardest_for_epoch(e) for e in range(3)] == [False, True, True]
    assert TripletLoss(all_negatives_epochs=0).hardest_for_epoch(0)
    assert [TripletLoss(all_negatives_epochs=2).hardest_for_epoch(e) for e in range(3)] == [
        False,
        False,
        True,
    ]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        TripletLoss()(torch.zeros(3, 4), torch.zeros(2, 4))


def test_gather_is_identity_in_one_process():
    torch.manual_seed(0)
    img, cap = torch.randn(6, 4), torch.randn(6, 4)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    plain = TripletLoss(mask_same_image=True)(img, cap, ids)
    assert torch.equal(TripletLoss(mask_same_image=True, gather=True)(img, cap, ids), plain)
    assert TripletLoss(gather=True).negative_pool(6) == 5
