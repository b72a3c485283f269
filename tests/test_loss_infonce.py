"""InfoNCELoss against a per-pair loop in float64 (values and gradients), REFERENCE.md §12."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpo_lit.errors import GpoLitError
from gpo_lit.losses import InfoNCELoss, PairEmbeddings, StepInfo


def embeddings(b: int, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    cap = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return img, cap


def loop_infonce(img, cap, s, ids=None):
    """Term by term: −log softmax of the positive, per image over captions and per caption over
    images (same-image captions/images left out when ``ids`` is given), mean per direction, then
    the mean of the two directions."""
    b = img.shape[0]

    def keep(i, j):
        return ids is None or i == j or ids[i] != ids[j]

    img_terms, cap_terms = [], []
    for i in range(b):
        logits = {j: s * torch.dot(img[i], cap[j]) for j in range(b) if keep(i, j)}
        img_terms.append(-(logits[i] - torch.log(sum(torch.exp(v) for v in logits.values()))))
    for j in range(b):
        logits = {i: s * torch.dot(cap[j], img[i]) for i in range(b) if keep(j, i)}
        cap_terms.append(-(logits[j] - torch.log(sum(torch.exp(v) for v in logits.values()))))
    return (sum(img_terms) / b + sum(cap_terms) / b) / 2


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["linear", "log"])
def test_value_and_gradients_match_loop(seed: int, kind: str) -> None:
    img, cap = embeddings(7, seed=seed)
    init = 1.0 if kind == "linear" else 1 / 0.07
    loss_fn = InfoNCELoss(scale=kind, init_scale=init).double()
    a_img, a_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    got = loss_fn(PairEmbeddings(a_img, a_cap, torch.arange(7)))
    got.backward()

    b_img, b_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    theta = torch.tensor(math.log(init) if kind == "log" else init, dtype=torch.float64)
    theta.requires_grad_()
    s = theta.exp() if kind == "log" else theta
    want = loop_infonce(b_img, b_cap, s)
    want.backward()
    assert got.shape == ()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_img.grad, b_img.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_cap.grad, b_cap.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_fn.scale_param.grad[0], theta.grad, atol=1e-6, rtol=0)


def test_mask_same_image_matches_loop() -> None:
    img, cap = embeddings(8, seed=3)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0])
    loss_fn = InfoNCELoss(init_scale=3.0, mask_same_image=True).double()
    a_img, a_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    got = loss_fn(PairEmbeddings(a_img, a_cap, ids))
    got.backward()
    b_img, b_cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    want = loop_infonce(b_img, b_cap, torch.tensor(3.0, dtype=torch.float64), ids.tolist())
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_img.grad, b_img.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_cap.grad, b_cap.grad, atol=1e-6, rtol=0)
    unmasked = InfoNCELoss(init_scale=3.0).double()(PairEmbeddings(img, cap, ids))
    torch.testing.assert_close(unmasked, loop_infonce(img, cap, 3.0), atol=1e-6, rtol=0)
    assert got < unmasked  # fewer negatives in every denominator that had a same-image one


def test_clip_scale_is_clamped_to_100_and_at_least_1() -> None:
    loss_fn = InfoNCELoss(scale="log", init_scale=1 / 0.07, max_scale=100.0)
    assert float(loss_fn.logit_scale().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        loss_fn.scale_param.fill_(math.log(500.0))  # as if an optimiser step overshot
    assert float(loss_fn.logit_scale().detach()) == pytest.approx(100.0)
    assert float(loss_fn.scale_param.detach()) == pytest.approx(
        math.log(100.0)
    )  # the parameter itself
    with torch.no_grad():
        loss_fn.scale_param.fill_(-2.0)
    assert float(loss_fn.logit_scale().detach()) == pytest.approx(1.0)
    # PCME++'s parameterisation: the multiplier itself, unclamped
    pcme = InfoNCELoss()
    assert float(pcme.logit_scale().detach()) == 1.0
    with torch.no_grad():
        pcme.scale_param.fill_(500.0)
    assert float(pcme.logit_scale().detach()) == 500.0


def test_training_loss_logs_scale_and_pool() -> None:
    img, cap = embeddings(5)
    out = InfoNCELoss(init_scale=2.0).training_loss(
        PairEmbeddings(img.float(), cap.float(), torch.arange(5)), StepInfo()
    )
    assert out.logs["negative_pool"] == 4.0 and out.logs["logit_scale"] == 2.0
    assert out.value.requires_grad  # through the learnable scale


def test_bad_options_are_one_line() -> None:
    for kwargs, key in [
        ({"scale": "exp"}, "loss.scale"),
        ({"init_scale": 0.0}, "loss.init_scale"),
        ({"init_scale": 20.0, "max_scale": 10.0}, "loss.max_scale"),
    ]:
        with pytest.raises(GpoLitError, match=key) as info:
            InfoNCELoss(**kwargs)
        assert "\n" not in str(info.value)


def test_fixed_scale_is_a_buffer() -> None:
    loss_fn = InfoNCELoss(init_scale=10.0, learnable=False)
    assert list(loss_fn.parameters()) == [] and "scale_param" in loss_fn.state_dict()
