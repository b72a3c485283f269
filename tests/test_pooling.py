"""Pooling operators against brute-force per-sample references (REFERENCE §1, §9)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import POOLING_CONF, B, D, N, make_batch, pe_ref
from omegaconf import OmegaConf

from gpo_lit.errors import GpoLitError
from gpo_lit.pooling import (
    GPO,
    Pooling,
    available_poolings,
    create_pooling,
    positional_encoding,
    sorted_weighted_sum,
    valid_mask,
)


# ---- brute-force references: one sample at a time, on its valid slice only ----------------------
def ref_max(x, lengths):
    return torch.stack([x[i, : int(n)].max(dim=0).values for i, n in enumerate(lengths)])


def ref_mean(x, lengths):
    return torch.stack([x[i, : int(n)].mean(dim=0) for i, n in enumerate(lengths)])


def ref_kmax(x, lengths, k):
    out = torch.empty(x.shape[0], x.shape[2])
    for i, n in enumerate(lengths.tolist()):
        for d in range(x.shape[2]):
            vals = sorted(x[i, :n, d].tolist(), reverse=True)[: min(k, n)]
            out[i, d] = sum(vals) / len(vals)
    return out


def ref_theta(gpo: GPO, n: int) -> torch.Tensor:
    """θ for one set size from the description: PE -> BiGRU (unpadded) -> mean of dirs -> linear."""
    pe = pe_ref(n, gpo.d_pe).float()
    out, _ = gpo.gru(pe.unsqueeze(0))  # a single unpadded sequence: no packing involved
    h = (out[0, :, : gpo.d_hidden] + out[0, :, gpo.d_hidden :]) / 2
    return torch.softmax(gpo.linear(h).squeeze(-1) / gpo.temperature, dim=0)


def bigru_ref64(gru: torch.nn.GRU, seq: torch.Tensor) -> torch.Tensor:
    """A 1-layer bidirectional GRU written out in float64 (PyTorch's gate equations, gates r, z,
    n): ``seq [n, d_in] -> [n, 2·hidden]``, forward states then reverse states."""
    hid = gru.hidden_size

    def run(sfx: str, xs: torch.Tensor) -> torch.Tensor:
        w_ih, w_hh, b_ih, b_hh = (
            getattr(gru, f"{name}_l0{sfx}").detach().double()
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        h, states = torch.zeros(hid, dtype=torch.float64), []
        for x_t in xs:
            gi, gh = w_ih @ x_t + b_ih, w_hh @ h + b_hh
            r = torch.sigmoid(gi[:hid] + gh[:hid])
            z = torch.sigmoid(gi[hid : 2 * hid] + gh[hid : 2 * hid])
            cand = torch.tanh(gi[2 * hid :] + r * gh[2 * hid :])
            h = (1 - z) * cand + z * h
            states.append(h)
        return torch.stack(states)

    return torch.cat([run("", seq), run("_reverse", seq.flip(0)).flip(0)], dim=1)


def ref_theta64(gpo: GPO, n: int) -> torch.Tensor:
    """θ(n) ``[n]`` in float64 from the module's weights, independently of its code: formula PE,
    the written-out BiGRU, mean of the directions, bias-free linear, softmax(score / T)."""
    out = bigru_ref64(gpo.gru, pe_ref(n, gpo.d_pe))
    h = (out[:, : gpo.d_hidden] + out[:, gpo.d_hidden :]) / 2
    return torch.softmax((h @ gpo.linear.weight.detach().double().T)[:, 0] / gpo.temperature, 0)


def ref_gpo(gpo: GPO, x, lengths):
    out = []
    for i, n in enumerate(lengths.tolist()):
        srt = x[i, :n].sort(dim=0, descending=True).values  # [n, D]
        out.append((ref_theta(gpo, n).unsqueeze(1) * srt).sum(dim=0))
    return torch.stack(out)


def make(name: str, **kw) -> Pooling:
    torch.manual_seed(0)
    return create_pooling(name, dim=D, **kw)


# ---- registry and configs ------------------------------------------------------------------------
def test_registry_names_and_unknown_name_error():
    assert {"gpo", "kmax", "max", "mean"} <= set(available_poolings())
    with pytest.raises(GpoLitError) as err:
        create_pooling("foo", dim=4)
    msg = str(err.value)
    assert "\n" not in msg and "'foo'" in msg and str(available_poolings()) in msg
    with pytest.raises(GpoLitError, match="kk"):
        create_pooling("kmax", dim=4, kk=3)


@pytest.mark.parametrize("name", ["gpo", "kmax", "max", "mean"])
def test_config_nodes_build(name):
    cfg = OmegaConf.to_container(OmegaConf.load(POOLING_CONF / f"{name}.yaml"))
    assert cfg["name"] == name and "_target_" not in cfg
    pool = create_pooling(dim=D, **cfg)
    x, lengths = make_batch()
    assert pool(x, lengths).shape == (B, D)


@pytest.mark.parametrize("bad", [[0, 3], [3, N + 1]])
def test_lengths_out_of_range_rejected(bad):
    x = torch.randn(2, N, D)
    for name in available_poolings():
        with pytest.raises(GpoLitError, match="lengths"):
            make(name)(x, torch.tensor(bad))


# ---- fixed operators -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kw,ref",
    [
        ("max", {}, ref_max),
        ("mean", {}, ref_mean),
        ("kmax", {"k": 1}, lambda x, n: ref_kmax(x, n, 1)),
        ("kmax", {"k": 3}, lambda x, n: ref_kmax(x, n, 3)),
        ("kmax", {"k": 50}, lambda x, n: ref_kmax(x, n, 50)),  # k > N: every set averages all
    ],
)
def test_fixed_operators_match_brute_force(name, kw, ref):
    x, lengths = make_batch()
    torch.testing.assert_close(make(name, **kw)(x, lengths), ref(x, lengths))


def test_kmax_shorter_than_k_averages_all():
    x, lengths = make_batch(seed=3)
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 9])
    out = make("kmax", k=5)(x, lengths)
    short = lengths < 5
    torch.testing.assert_close(out[short], ref_mean(x, lengths)[short])
    torch.testing.assert_close(out, ref_kmax(x, lengths, 5))


def test_kmax_k1_is_max_and_kN_is_mean():
    x, lengths = make_batch(seed=4)
    torch.testing.assert_close(make("kmax", k=1)(x, lengths), make("max")(x, lengths))
    torch.testing.assert_close(make("kmax", k=N)(x, lengths), make("mean")(x, lengths))


@pytest.mark.parametrize("name", ["gpo", "kmax", "max", "mean"])
def test_padding_never_leaks(name):
    pool = make(name)
    x, lengths = make_batch(seed=1)
    x2 = x.clone()
    pad = ~valid_mask(lengths, N)
    x2[pad] = torch.randn(int(pad.sum()), D) * 1e20 - 5e19
    x3 = x.clone()
    x3[pad] = float("inf")  # even non-finite padding must not reach the output
    out = pool(x, lengths)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(pool(x2, lengths), out, rtol=0, atol=0)
    torch.testing.assert_close(pool(x3, lengths), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpo", "kmax", "max", "mean"])
def test_permutation_invariant_within_valid_part(name):
    pool = make(name)
    x, lengths = make_batch(seed=2)
    xp = x.clone()
    g = torch.Generator().manual_seed(5)
    for i, n in enumerate(lengths.tolist()):
        xp[i, :n] = x[i, torch.randperm(n, generator=g)]
    torch.testing.assert_close(pool(xp, lengths), pool(x, lengths))


def test_lengths_may_live_elsewhere_and_be_int32():
    x, lengths = make_batch()
    for name in available_poolings():
        pool = make(name).eval()  # eval: sequence models may use dropout in training
        torch.testing.assert_close(pool(x, lengths.int()), pool(x, lengths))


# ---- GPO -----------------------------------------------------------------------------------------
def test_positional_encoding_formula():
    pe = positional_encoding(6, 32)
    for k in range(6):
        for j in range(16):
            w = 10000 ** (-2 * j / 32)
            assert pe[k, 2 * j].item() == pytest.approx(math.sin(k * w), abs=1e-6)
            assert pe[k, 2 * j + 1].item() == pytest.approx(math.cos(k * w), abs=1e-6)


def test_gpo_parameter_count_and_checkpoint_names():
    gpo = GPO(dim=1024)
    per_direction = 3 * (32 * 32 + 32 * 32 + 32 + 32)  # 3 gates: W_ih, W_hh, b_ih, b_hh
    expected = 2 * per_direction + 32  # two directions + bias-free linear 32 -> 1
    assert sum(p.numel() for p in gpo.parameters()) == expected == 12704
    keys = set(gpo.state_dict())
    assert {"gru.weight_ih_l0", "gru.weight_hh_l0_reverse", "linear.weight"} <= keys
    assert "linear.bias" not in keys


@pytest.mark.parametrize("cpu_kernels", [False, True])  # the authors' path, and the default
def test_gpo_matches_brute_force_reference(cpu_kernels):
    gpo = make("gpo", cpu_kernels=cpu_kernels)
    x, lengths = make_batch(seed=6)
    pooled, theta = gpo(x, lengths, return_weights=True)
    torch.testing.assert_close(pooled, ref_gpo(gpo, x, lengths), rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(theta[i, :n], ref_theta(gpo, n), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gpo.weights_for_length(n), ref_theta(gpo, n))


def test_gpo_float64_module_computes_theta_in_float64(monkeypatch):
    # A .double() GPO: θ from every path (per distinct length, the all-sizes table, the eval
    # cache, weights_for_length) equals the written-out float64 reference to ~1e-12, not to
    # fp32's ~1e-7, and the pooled output is float64 too.
    gpo = make("gpo").double()
    x, lengths = make_batch(seed=21, n=11)
    x = x.double()
    want = {n: ref_theta64(gpo, n) for n in range(1, 12)}
    pooled, theta = gpo(x, lengths, return_weights=True)
    assert pooled.dtype == theta.dtype == gpo.weights_for_length(3).dtype == torch.float64
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(theta[i, :n], want[n], rtol=0, atol=1e-12)
        srt = x[i, :n].sort(dim=0, descending=True).values  # [n, D]
        torch.testing.assert_close(pooled[i], want[n] @ srt, rtol=0, atol=1e-12)
    for n in (1, 5, 11):
        torch.testing.assert_close(gpo.weights_for_length(n), want[n], rtol=0, atol=1e-12)
    for n, row in enumerate(gpo._theta_table(11), start=1):  # the accelerator path's table
        torch.testing.assert_close(row[:n], want[n], rtol=0, atol=1e-12)
    gpo.eval()
    with torch.no_grad():
        cached = gpo(x, lengths, return_weights=True)[1]
    assert cached.dtype == torch.float64
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cached[i, :n], want[n], rtol=0, atol=1e-12)
    assert gpo(x[:0], lengths[:0], return_weights=True)[1].dtype == torch.float64

    # float32 (and bf16) modules keep fp32 θ, within fp32 accuracy of the same reference
    gpo32 = make("gpo")
    for n in (1, 5, 11):
        got = gpo32.weights_for_length(n)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref_theta64(gpo32, n), rtol=0, atol=1e-5)
    assert make("gpo").bfloat16().weights_for_length(4).dtype == torch.float32


def test_gpo_theta_sums_to_one_and_zero_on_padding():
    gpo = make("gpo")
    x, lengths = make_batch(seed=7, n=12)
    lengths[2] = 4  # max length < N: theta still comes back [B, N]
    _, theta = gpo(x, lengths, return_weights=True)
    assert theta.shape == (B, 12)
    mask = valid_mask(lengths, 12)
    torch.testing.assert_close(theta.sum(dim=1), torch.ones(B))
    assert (theta[~mask] == 0).all() and (theta[mask] > 0).all()
    _, theta_short = gpo(x, torch.full((B,), 4), return_weights=True)
    assert theta_short.shape == (B, 12) and (theta_short[:, 4:] == 0).all()


def test_gpo_per_distinct_length_equals_per_sample():
    gpo = make("gpo")
    x, lengths = make_batch(seed=8, b=12)
    assert len(lengths.unique()) < len(lengths)  # duplicates exercise the indexing
    batch = gpo(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = gpo(x[i : i + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_gpo_table_path_equals_distinct_length_path(monkeypatch):
    """Lengths on an accelerator take the sync-free path (θ for every size 1..N at once)."""
    gpo = make("gpo")
    x, lengths = make_batch(seed=18, n=11)
    lengths[3] = 4
    distinct = gpo(x, lengths, return_weights=True)
    monkeypatch.setattr(GPO, "_host_lengths", staticmethod(lambda lengths: None))
    table = gpo(x, lengths, return_weights=True)
    for a, b in zip(table, distinct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n, row in enumerate(gpo._theta_table(11), start=1):  # right-aligned rows, every size
        torch.testing.assert_close(row[:n], ref_theta(gpo, n), rtol=1e-5, atol=1e-6)
        assert (row[n:] == 0).all()
    x1 = x.clone().requires_grad_(True)
    gpo(x1, lengths).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gpo.parameters())


def _force_scores(monkeypatch, gpo: GPO, fn):
    """Replace the generator's raw scores: fn(rank index [width]) -> score [width]."""

    def scores(sizes, width, inputs=None):
        return fn(torch.arange(width)).float().expand(len(sizes), width)

    monkeypatch.setattr(gpo, "_scores", scores)


def test_gpo_one_hot_first_is_max(monkeypatch):
    gpo = make("gpo")
    _force_scores(monkeypatch, gpo, lambda k: torch.where(k == 0, 0.0, -1e4))
    x, lengths = make_batch(seed=9)
    torch.testing.assert_close(gpo(x, lengths), ref_max(x, lengths))


def test_gpo_uniform_is_mean(monkeypatch):
    gpo = make("gpo")
    _force_scores(monkeypatch, gpo, lambda k: torch.zeros(len(k)))
    x, lengths = make_batch(seed=10)
    torch.testing.assert_close(gpo(x, lengths), ref_mean(x, lengths))


def test_gpo_zero_linear_is_mean():
    gpo = make("gpo")
    with torch.no_grad():
        gpo.linear.weight.zero_()  # all scores 0 -> uniform weights, through the real generator
    x, lengths = make_batch(seed=10)
    torch.testing.assert_close(gpo(x, lengths), ref_mean(x, lengths))


@pytest.mark.parametrize("k", [2, 4])
def test_gpo_uniform_first_k_is_kmax(monkeypatch, k):
    gpo = make("gpo")
    _force_scores(monkeypatch, gpo, lambda r: torch.where(r < k, 0.0, -1e4))
    x, lengths = make_batch(seed=11)
    torch.testing.assert_close(gpo(x, lengths), ref_kmax(x, lengths, k))


def test_gpo_eval_cache_reuse_and_invalidation(monkeypatch):
    gpo = make("gpo")
    x, lengths = make_batch(seed=12)
    fresh = gpo(x, lengths).detach()
    calls = []
    real = gpo._scores
    monkeypatch.setattr(gpo, "_scores", lambda *a: calls.append(a) or real(*a))

    gpo.eval()
    with torch.no_grad():
        first = gpo(x, lengths)
        second = gpo(x[:, :5], lengths.clamp(max=5))  # narrower batch: served by the same table
        assert len(calls) == 1 and gpo._table.shape == (N, N)
        gpo(torch.randn(2, N + 3, D), torch.tensor([N + 3, 2]))  # wider batch: table rebuilt
        assert len(calls) == 2 and gpo._table.shape == (N + 3, N + 3)
        for n in range(1, N + 4):
            torch.testing.assert_close(gpo.weights_for_length(n), ref_theta(gpo, n))
        assert len(calls) == 2
    torch.testing.assert_close(first, fresh, rtol=1e-6, atol=1e-6)
    gpo.train()
    torch.testing.assert_close(second, gpo(x[:, :5], lengths.clamp(max=5)), rtol=1e-6, atol=1e-6)

    # Back to training, one optimizer step, back to eval: the old weights must not be reused.
    assert gpo._table is None
    gpo(x, lengths).pow(2).sum().backward()
    with torch.no_grad():  # what an optimizer step does: update parameters in place
        for p in gpo.parameters():
            p.sub_(p.grad)
    gpo.eval()
    with torch.no_grad():
        after = gpo(x, lengths)
    gpo.train()
    expected = gpo(x, lengths).detach()
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after, fresh)

    # A parameter changed in place while staying in eval mode (e.g. load_state_dict) is noticed.
    gpo.eval()
    with torch.no_grad():
        gpo(x, lengths)
        gpo.linear.weight.mul_(-3.0)
        changed = gpo(x, lengths)
        gpo.linear.weight.div_(-3.0)
    gpo.train()
    with torch.no_grad():
        gpo.linear.weight.mul_(-3.0)
    torch.testing.assert_close(changed, gpo(x, lengths).detach(), rtol=1e-6, atol=1e-6)


def test_gpo_inference_mode_then_training(monkeypatch):
    """Caches filled under inference_mode (Lightning's eval) must not break training later."""
    monkeypatch.setattr(GPO, "_host_lengths", staticmethod(lambda lengths: None))  # table path
    gpo = make("gpo")
    x, lengths = make_batch(seed=19)
    gpo.eval()
    with torch.inference_mode():
        evaluated = gpo(x, lengths)
    with torch.no_grad():
        torch.testing.assert_close(gpo(x, lengths), evaluated)
    gpo.train()
    trained = gpo(x, lengths)
    trained.sum().backward()
    torch.testing.assert_close(trained.detach(), evaluated, rtol=1e-6, atol=1e-6)
    assert gpo.linear.weight.grad.abs().sum() > 0


def test_gpo_eval_with_grad_enabled_still_trains_generator():
    gpo = make("gpo").eval()
    x, lengths = make_batch(seed=13)
    with torch.no_grad():
        gpo(x, lengths)  # fills the cache
    gpo(x, lengths).sum().backward()
    assert gpo.linear.weight.grad is not None and gpo.linear.weight.grad.abs().sum() > 0


def test_gpo_gradients_reach_generator_and_features():
    gpo = make("gpo")
    x, lengths = make_batch(seed=14, garbage=0.0)
    x.requires_grad_(True)
    gpo(x, lengths).pow(2).sum().backward()
    for name, p in gpo.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~valid_mask(lengths, N)] == 0).all()


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_gpo_gradients_match_brute_force_reference(cpu_kernels):
    gpo = make("gpo", cpu_kernels=cpu_kernels)
    x, lengths = make_batch(seed=16)
    x1 = x.clone().requires_grad_(True)
    gpo(x1, lengths).pow(2).sum().backward()
    got = [x1.grad] + [p.grad.clone() for p in gpo.parameters()]
    gpo.zero_grad()
    x2 = x.clone().requires_grad_(True)
    ref_gpo(gpo, x2, lengths).pow(2).sum().backward()
    want = [x2.grad] + [p.grad for p in gpo.parameters()]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sorted_weighted_sum_gradcheck():
    g = torch.Generator().manual_seed(17)
    lengths = torch.tensor([4, 1, 3])
    valid = valid_mask(lengths, 4).unsqueeze(-1)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(3, 4, generator=g, dtype=torch.float64).masked_fill(~valid[..., 0], 0)
    theta.requires_grad_(True)
    assert torch.autograd.gradcheck(sorted_weighted_sum, (x, theta, valid))
    gpo = make("gpo")  # the whole operator keeps float64 inputs in float64
    assert gpo(x, lengths).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: gpo(t, lengths), (x,))


def ref_sorted_weighted_sum(x, theta, lengths):
    """Autograd through torch.sort, one sample at a time on its valid slice: ``[B, D]``."""
    rows = []
    for i, n in enumerate(lengths.tolist()):
        xs = x[i, :n].sort(dim=0, descending=True).values  # [n, D]
        rows.append(theta[i, :n] @ xs)
    return torch.stack(rows)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("block_keys", [None, 600])
def test_sorted_weighted_sum_large_matches_reference(threads, packed, block_keys, monkeypatch):
    # Many rows, at 1 and 2 torch threads, both sorts, in one block or one set per block (600
    # keys < one set's 13 x 512): same values and exact gradients as torch.sort, the gradient
    # in x's layout.
    from gpo_lit.pooling import gpo

    if block_keys is not None:
        monkeypatch.setattr(gpo, "_KEY_BLOCK", block_keys)
    g = torch.Generator().manual_seed(18)
    b, n, d = 8, 13, 512
    x, lengths = make_batch(seed=18, b=b, n=n, d=d)
    valid = valid_mask(lengths, n).unsqueeze(-1)
    theta = torch.rand(b, n, generator=g).masked_fill(~valid[..., 0], 0)
    gout = torch.randn(b, d, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = [t.clone().requires_grad_(True) for t in (x, theta)]
        out = sorted_weighted_sum(got[0], got[1], valid, packed)
        out.backward(gout)
    finally:
        torch.set_num_threads(before)
    assert got[0].grad.is_contiguous()
    want = [t.clone().requires_grad_(True) for t in (x, theta)]
    ref = ref_sorted_weighted_sum(want[0], want[1], lengths)
    ref.backward(gout)
    torch.testing.assert_close(out, ref)
    assert torch.equal(got[0].grad, want[0].grad)  # one θ per element: no rounding
    torch.testing.assert_close(got[1].grad, want[1].grad)
    assert (got[0].grad[~valid_mask(lengths, n)] == 0).all()


@pytest.mark.parametrize("packed", [False, True])
def test_sorted_weighted_sum_input_wider_than_theta(packed):
    # x [B, N', D] with θ [B, N], N < N': the elements past N are padding (garbage here): the
    # same output and gradient as on the slice x[:, :N], and a zero gradient past it.
    g = torch.Generator().manual_seed(21)
    x, lengths = make_batch(seed=21, b=5, n=9, d=16)
    valid = valid_mask(lengths.clamp(max=6), 6).unsqueeze(-1)
    theta = torch.rand(5, 6, generator=g).masked_fill(~valid[..., 0], 0)
    gout = torch.randn(5, 16, generator=g)
    wide, cut = x.clone().requires_grad_(True), x[:, :6].clone().requires_grad_(True)
    out = sorted_weighted_sum(wide, theta, valid, packed)
    out.backward(gout)
    want = sorted_weighted_sum(cut, theta, valid, packed)
    want.backward(gout)
    assert torch.equal(out, want)
    assert torch.equal(wide.grad[:, :6], cut.grad)
    assert (wide.grad[:, 6:] == 0).all()


def test_sorted_weighted_sum_beyond_int16_positions():
    # N > 32768: the kept sort positions switch to int32 and stay correct.
    g = torch.Generator().manual_seed(19)
    n = 40000
    x = torch.randn(1, n, 1, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([n - 5])
    valid = valid_mask(lengths, n).unsqueeze(-1)
    theta = torch.rand(1, n, generator=g, dtype=torch.float64).masked_fill(~valid[..., 0], 0)
    sorted_weighted_sum(x, theta, valid).sum().backward()
    order = x[0, : n - 5, 0].detach().argsort(descending=True)  # rank k -> position
    want = torch.zeros(n, dtype=torch.float64)
    want[order] = theta[0, : n - 5]
    assert torch.equal(x.grad[0, :, 0], want)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves while running ``fn()`` (each storage once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpo_saves_at_most_four_times_its_input(dtype):
    # What a training forward keeps alive until backward: sorted values (fp32) + int16 positions.
    torch.manual_seed(0)
    gpo = create_pooling("gpo", dim=1024).train()
    x, lengths = make_batch(seed=20, b=32, n=36, d=1024)
    x = x.to(dtype).requires_grad_(True)
    saved = _saved_bytes(lambda: gpo(x, lengths))
    in_bytes = x.numel() * x.element_size()
    assert 0 < saved <= 4 * in_bytes, saved / in_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpo", "kmax", "max", "mean"])
def test_low_precision_inputs_are_finite(name, dtype):
    pool = make(name)
    x, lengths = make_batch(seed=15, garbage=6e4)  # near fp16's limit
    ref = pool(x, lengths)
    out = pool(x.to(dtype), lengths)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(pool(x.to(dtype), lengths)).all()
