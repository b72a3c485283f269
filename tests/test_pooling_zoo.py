"""The comparison poolers (REFERENCE §9) and the GPO ablations against per-sample references.

Every reference works one sample at a time on its valid slice only, in float64, with plain torch
ops and the module's parameters — never the module's own masking, sorting or weight helpers.
"""

from __future__ import annotations

import importlib
import math
import pkgutil

import pytest
import torch
from helpers import POOLING_CONF, B, D, N, make_batch, pe_ref
from omegaconf import OmegaConf

import gpo_lit.pooling
from gpo_lit.errors import GpoLitError
from gpo_lit.pooling import Pooling, available_poolings, create_pooling, valid_mask
from gpo_lit.pooling.gpo import GPO

# Register every operator module of the package (the zoo, and any other), whatever __init__ imports.
for _mod in pkgutil.iter_modules(gpo_lit.pooling.__path__):
    importlib.import_module(f"gpo_lit.pooling.{_mod.name}")

NAMES = [
    "gem",
    "lse",
    "attention",
    "dim_attention",
    "fspool",
    "netvlad",
    "gpo_transformer",
    "gpo_perdim",
]


def make(name: str, dim: int = D, seed: int = 0, **kw) -> Pooling:
    """Build and give every parameter non-trivial values (zero-initialised queries, too)."""
    torch.manual_seed(seed)
    pool = create_pooling(name, dim=dim, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pname, p in pool.named_parameters():
            if pname in ("raw_p", "log_r"):
                continue  # keep the configured exponent / temperature
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return pool


def sizes(lengths):
    return enumerate(lengths.tolist())


# ---- references ---------------------------------------------------------------------------------
def ref_gem(pool, x, lengths):
    p, eps = float(pool.p), pool.eps
    out = [x[i, :n].double().clamp(min=eps).pow(p).mean(0).pow(1 / p) for i, n in sizes(lengths)]
    return torch.stack(out)


def ref_lse(pool, x, lengths):
    r = float(pool.r)
    return torch.stack(
        [torch.log(torch.exp(r * x[i, :n].double()).mean(0)) / r for i, n in sizes(lengths)]
    )


def ref_attention(pool, x, lengths):
    q = pool.query.double()
    out = []
    for i, n in sizes(lengths):
        v = x[i, :n].double()
        keys = v
        if pool.key is not None:
            keys = torch.tanh(v @ pool.key.weight.double().T + pool.key.bias.double())
        a = torch.softmax(keys @ q / math.sqrt(len(q)), dim=0)
        if pool.value is not None:
            v = v @ pool.value.weight.double().T + pool.value.bias.double()
        out.append(a @ v)
    return torch.stack(out)


def ref_dim_attention(pool, x, lengths):
    w, bias = pool.score.weight.double(), pool.score.bias.double()
    out = []
    for i, n in sizes(lengths):
        v = x[i, :n].double()
        out.append((torch.softmax(v @ w.T + bias, dim=0) * v).sum(0))
    return torch.stack(out)


def ref_fspool(pool, x, lengths):
    w, k = pool.weight.double().tolist(), pool.n_pieces
    out = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    for i, n in sizes(lengths):
        for d in range(x.shape[2]):
            vals = sorted(x[i, :n, d].tolist(), reverse=True)
            for j, val in enumerate(vals):
                t = (j / (n - 1) if n > 1 else 0.0) * k
                i0 = min(int(math.floor(t)), k - 1)
                frac = t - i0
                out[i, d] += (w[d][i0] * (1 - frac) + w[d][i0 + 1] * frac) * val
            if pool.normalize:
                out[i, d] /= n
    return out


def ref_netvlad(pool, x, lengths):
    c = pool.centroids.double()
    out = []
    for i, n in sizes(lengths):
        v = x[i, :n].double()
        if pool.normalize_input:
            v = v / v.norm(dim=1, keepdim=True)
        a = torch.softmax(v @ pool.assign.weight.double().T + pool.assign.bias.double(), dim=1)
        vlad = torch.stack([(a[:, k : k + 1] * (v - c[k])).sum(0) for k in range(len(c))])
        vlad = (vlad / vlad.norm(dim=1, keepdim=True)).flatten()
        vlad = vlad / vlad.norm()
        out.append(vlad @ pool.proj.weight.double().T + pool.proj.bias.double())
    return torch.stack(out)


def ref_theta(pool, n: int) -> torch.Tensor:
    """θ(n) from one unpadded sequence of rank encodings: ``[n]`` or ``[n, D]`` (gpo_perdim)."""
    pe = pe_ref(n, pool.d_pe).to(pool.linear.weight.dtype).unsqueeze(0)  # float64 formula
    with torch.no_grad():
        if pool.name == "gpo_transformer":
            h = pool.encoder(pool.input(pe))  # no mask: nothing to mask
        else:
            out, _ = pool.gru(pe)
            h = (out[..., : pool.d_hidden] + out[..., pool.d_hidden :]) / 2
        scores = pool.linear(h)[0]  # [n, 1] or [n, D]
    theta = torch.softmax(scores.double() / pool.temperature, dim=0)
    return theta[:, 0] if pool.name == "gpo_transformer" else theta


def ref_gpo_variant(pool, x, lengths):
    out = []
    for i, n in sizes(lengths):
        srt = x[i, :n].double().sort(dim=0, descending=True).values  # [n, D]
        theta = ref_theta(pool, n)
        theta = theta.unsqueeze(1) if theta.dim() == 1 else theta
        out.append((theta * srt).sum(0))
    return torch.stack(out)


CASES = [
    ("gem", {}, ref_gem),
    ("gem", {"p": 1.7, "learnable": False}, ref_gem),
    ("lse", {}, ref_lse),
    ("lse", {"r": 0.5, "learnable": False}, ref_lse),
    ("attention", {}, ref_attention),
    ("attention", {"hidden": 6, "value_proj": True}, ref_attention),
    ("dim_attention", {}, ref_dim_attention),
    ("fspool", {}, ref_fspool),
    ("fspool", {"n_pieces": 3, "normalize": True}, ref_fspool),
    ("netvlad", {}, ref_netvlad),
    ("netvlad", {"clusters": 3, "normalize_input": False}, ref_netvlad),
    ("gpo_transformer", {}, ref_gpo_variant),
    ("gpo_transformer", {"d_hidden": 16, "heads": 2, "layers": 2}, ref_gpo_variant),
    ("gpo_perdim", {}, ref_gpo_variant),
]


# ---- registry and configs -----------------------------------------------------------------------
def test_registry_lists_every_zoo_name():
    assert set(NAMES) <= set(available_poolings())


@pytest.mark.parametrize("path", sorted(POOLING_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pooling_yaml_builds(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["name"] == path.stem and "_target_" not in cfg
    pool = create_pooling(dim=16, **cfg)
    x, lengths = make_batch(d=16)
    out = pool(x, lengths)
    assert out.shape == (B, 16) and torch.isfinite(out).all()


def test_bad_options_rejected():
    for name, kw in [
        ("gem", {"p": 0.5}),
        ("gem", {"p": 12.0}),  # > p_max
        ("gem", {"p": 1.0}),  # learnable p lives in the open interval (1, p_max)
        ("lse", {"r": 0.0}),
        ("attention", {"hidden": -1}),
        ("fspool", {"n_pieces": 0}),
        ("netvlad", {"clusters": 0}),
        ("gpo_transformer", {"heads": 5}),  # does not divide d_hidden = 32
        ("gpo_perdim", {"foo": 1}),
    ]:
        with pytest.raises(GpoLitError):
            create_pooling(name, dim=4, **kw)
    with pytest.raises(GpoLitError, match="lengths"):
        make("fspool")(torch.randn(2, N, D), torch.tensor([0, 3]))


# ---- exact values -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,ref", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_per_sample_reference(name, kw, ref):
    pool = make(name, **kw)
    x, lengths = make_batch(seed=1)
    with torch.no_grad():
        expected = ref(pool, x, lengths).float()
    torch.testing.assert_close(pool(x, lengths), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_leaks(name):
    pool = make(name)
    x, lengths = make_batch(seed=2)
    pad = ~valid_mask(lengths, N)
    out = pool(x, lengths)
    assert torch.isfinite(out).all()
    for garbage in (float("inf"), float("nan")):  # and +/-1e30 from make_batch
        x2 = x.clone()
        x2[pad] = garbage
        torch.testing.assert_close(pool(x2, lengths), out, rtol=0, atol=0)
        x2.requires_grad_(True)
        pool(x2, lengths).pow(2).sum().backward()
        assert torch.isfinite(x2.grad).all() and (x2.grad[pad] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariant_within_valid_part(name):
    pool = make(name)
    x, lengths = make_batch(seed=3)
    xp = x.clone()
    g = torch.Generator().manual_seed(5)
    for i, n in sizes(lengths):
        xp[i, :n] = x[i, torch.randperm(n, generator=g)]
    torch.testing.assert_close(pool(xp, lengths), pool(x, lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_reach_every_parameter(name):
    pool = make(name)
    x, lengths = make_batch(seed=4)
    x.requires_grad_(True)
    pool(x, lengths).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_float64_stays_float64_and_gradcheck(name):
    pool = make(name, dim=2)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    lengths = torch.tensor([4, 1, 3])
    assert pool(x, lengths).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: pool(t, lengths), (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_inputs_are_finite(name, dtype):
    pool = make(name)
    x, lengths = make_batch(seed=7, garbage=6e4)  # near fp16's limit
    ref = pool(x, lengths)
    out = pool(x.to(dtype), lengths)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(pool(x.to(dtype), lengths)).all()


# ---- GeM ----------------------------------------------------------------------------------------
def test_gem_p1_is_mean_and_large_p_approaches_max():
    x, lengths = make_batch(seed=8)
    x = x.abs() + 0.1  # positive: nothing clamped
    mean = torch.stack([x[i, :n].mean(0) for i, n in sizes(lengths)])
    mx = torch.stack([x[i, :n].max(0).values for i, n in sizes(lengths)])
    gem1 = create_pooling("gem", dim=D, p=1.0, learnable=False)
    torch.testing.assert_close(gem1(x, lengths), mean)
    gem_big = create_pooling("gem", dim=D, p=500.0, p_max=500.0, learnable=False)
    out = gem_big(x, lengths)
    assert (out <= mx * (1 + 1e-6)).all() and (out >= mx * N ** (-1 / 500)).all()
    torch.testing.assert_close(out, mx, rtol=5e-3, atol=0)


def test_gem_learnable_p_starts_at_3_and_stays_finite_under_large_inputs_and_steps():
    gem = create_pooling("gem", dim=D)
    assert gem.p.item() == pytest.approx(3.0) and len(list(gem.parameters())) == 1
    for step in range(12):
        x, lengths = make_batch(seed=20 + step)
        x = x * 10.0 ** (step % 6 * 6)  # up to 1e30 (x^3 alone would overflow fp32)
        x.requires_grad_(True)
        out = gem(x, lengths)
        assert torch.isfinite(out).all()
        loss = (out / out.detach().abs().amax().clamp(min=1)).pow(2).sum() * (-1) ** step
        gem.raw_p.grad = None
        loss.backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(gem.raw_p.grad).all()
        with torch.no_grad():
            gem.raw_p -= 1e3 * gem.raw_p.grad  # big SGD steps: p swings to both bounds
        assert 1 <= gem.p.item() <= gem.p_max and torch.isfinite(gem.raw_p).all()
    # Negative features act as eps.
    x = -torch.rand(2, 3, D) - 0.1
    torch.testing.assert_close(gem(x, torch.tensor([3, 2])), torch.full((2, D), gem.eps))


# ---- LSE ----------------------------------------------------------------------------------------
def test_lse_large_r_is_max_constant_sets_map_to_themselves():
    x, lengths = make_batch(seed=9)
    mx = torch.stack([x[i, :n].max(0).values for i, n in sizes(lengths)])
    big = create_pooling("lse", dim=D, r=1e4, learnable=False)
    out = big(x, lengths)
    assert (out <= mx + 1e-6).all() and (out >= mx - math.log(N) / 1e4 - 1e-6).all()
    const = torch.full((B, N, D), 2.5)
    const[~valid_mask(lengths, N)] = 1e30
    for pool in (create_pooling("lse", dim=D), big, make("lse", r=0.01)):
        torch.testing.assert_close(pool(const, lengths), torch.full((B, D), 2.5))
    huge = make_batch(seed=10)[0] * 1e30  # no overflow in the exponentials
    assert torch.isfinite(create_pooling("lse", dim=D)(huge, lengths)).all()


# ---- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"hidden": 6}])
def test_attention_zero_query_is_mean(kw):
    x, lengths = make_batch(seed=11)
    mean = torch.stack([x[i, :n].mean(0) for i, n in sizes(lengths)])
    pool = make("attention", **kw)
    with torch.no_grad():
        pool.query.zero_()
    out, attn = pool(x, lengths, return_weights=True)
    torch.testing.assert_close(out, mean)
    torch.testing.assert_close(attn.sum(1), torch.ones(B))
    assert (attn[~valid_mask(lengths, N)] == 0).all()
    # Freshly built (query starts at 0), both attention poolers start as mean pooling.
    torch.testing.assert_close(create_pooling("attention", dim=D, **kw)(x, lengths), mean)
    torch.testing.assert_close(create_pooling("dim_attention", dim=D)(x, lengths), mean)


# ---- FSPool -------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_fspool_constant_and_linear_knots(normalize):
    x, lengths = make_batch(seed=12)
    pool = create_pooling("fspool", dim=D, n_pieces=4, normalize=normalize)
    c = torch.arange(1.0, D + 1)  # one constant per dimension
    scale = [1 / n if normalize else 1.0 for n in lengths.tolist()]
    with torch.no_grad():
        pool.weight.copy_(c.unsqueeze(1).expand(D, 5))
    expected = torch.stack([c * x[i, :n].sum(0) * scale[i] for i, n in sizes(lengths)])
    torch.testing.assert_close(pool(x, lengths), expected)
    # Knots on a line a + b·r: the interpolated weights are exactly a + b·r_j, r_j = j/(n-1).
    a, b = torch.randn(D), torch.randn(D)
    with torch.no_grad():
        pool.weight.copy_(a.unsqueeze(1) + b.unsqueeze(1) * torch.linspace(0, 1, 5))
    expected = []
    for i, n in sizes(lengths):
        srt = x[i, :n].sort(dim=0, descending=True).values
        r = torch.arange(n) / max(n - 1, 1)
        expected.append(((a + b * r.unsqueeze(1)) * srt).sum(0) * scale[i])
    torch.testing.assert_close(pool(x, lengths), torch.stack(expected))
    # A single element sits at r = 0.
    torch.testing.assert_close(pool(x[:1], lengths[:1])[0], a * x[0, 0])


# ---- GPO ablations ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpo_transformer", "gpo_perdim"])
def test_gpo_variant_theta_sums_to_one_zero_on_padding_depends_only_on_n(name, monkeypatch):
    pool = make(name)
    tol = {"rtol": 1e-4, "atol": 2e-5}  # padded-batch vs single-sequence generator, T = 0.1
    x, lengths = make_batch(seed=13, b=6, n=12)
    lengths[2] = 4
    pooled, theta = pool(x, lengths, return_weights=True)
    perdim = name == "gpo_perdim"
    assert theta.shape == ((6, 12, D) if perdim else (6, 12))
    mask = valid_mask(lengths, 12)
    sums = theta.sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (theta[~mask] == 0).all() and (theta[mask] > 0).all()
    for i, n in sizes(lengths):
        torch.testing.assert_close(theta[i, :n], ref_theta(pool, n).float(), **tol)
        _, alone = pool(x[i : i + 1, :n] * 7 - 3, torch.tensor([n]), return_weights=True)
        torch.testing.assert_close(alone[0], theta[i, :n], **tol)  # not x, only n
        torch.testing.assert_close(pool.weights_for_length(n), theta[i, :n], **tol)
    # The sync-free path (lengths on an accelerator: θ for every size at once) and the eval cache.
    monkeypatch.setattr(GPO, "_host_lengths", staticmethod(lambda lengths: None))
    torch.testing.assert_close(pool(x, lengths), pooled, **tol)
    monkeypatch.undo()
    pool.eval()
    with torch.no_grad():
        torch.testing.assert_close(pool(x, lengths), pooled, **tol)
        assert pool._table is not None  # θ table cached per length
        torch.testing.assert_close(pool(x, lengths), pooled, **tol)
        for p in pool.parameters():
            p.mul_(1.5)  # in place: the cache must notice
        changed = pool(x, lengths)
    assert not torch.allclose(changed, pooled)
    pool.train()  # eval runs PyTorch's fused encoder kernel; sharper θ after the change
    torch.testing.assert_close(changed, pool(x, lengths), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["gpo_transformer", "gpo_perdim"])
def test_gpo_variant_float64_module_computes_theta_in_float64(name, monkeypatch):
    # As GPO: a .double() module's θ (every path) is float64 and matches the float64 reference
    # (formula PE, the module's own sub-networks on one unpadded sequence) to ~1e-12.
    pool = make(name).double()
    x, lengths = make_batch(seed=22, b=6, n=12)
    x = x.double()
    tol = {"rtol": 0, "atol": 1e-12}
    pooled, theta = pool(x, lengths, return_weights=True)
    assert pooled.dtype == theta.dtype == torch.float64
    torch.testing.assert_close(pooled, ref_gpo_variant(pool, x, lengths), **tol)
    for i, n in sizes(lengths):
        want = ref_theta(pool, n)
        torch.testing.assert_close(theta[i, :n], want, **tol)
        torch.testing.assert_close(pool.weights_for_length(n), want, **tol)
    monkeypatch.setattr(GPO, "_host_lengths", staticmethod(lambda lengths: None))
    torch.testing.assert_close(pool(x, lengths, return_weights=True)[1], theta, **tol)
    assert make(name).weights_for_length(3).dtype == torch.float32  # fp32 modules: fp32 θ


def test_gpo_variant_structure():
    tr = create_pooling("gpo_transformer", dim=D)
    keys = set(tr.state_dict())
    assert "linear.weight" in keys and not any(k.startswith("gru.") for k in keys)
    assert tr.encoder.layers[0].self_attn.num_heads == 4 and len(tr.encoder.layers) == 1
    pd = create_pooling("gpo_perdim", dim=D)
    assert pd.linear.weight.shape == (D, 32) and pd.linear.bias is None
    assert pd.weights_for_length(3).shape == (3, D)
    with torch.no_grad():
        pd.linear.weight.zero_()  # uniform over ranks in every dimension: mean pooling
    x, lengths = make_batch(seed=14)
    mean = torch.stack([x[i, :n].mean(0) for i, n in sizes(lengths)])
    torch.testing.assert_close(pd(x, lengths), mean)
    empty = pd(torch.zeros(0, 3, D), torch.zeros(0, dtype=torch.long), return_weights=True)
    assert empty[0].shape == (0, D) and empty[1].shape == (0, 3, D)
