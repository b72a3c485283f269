"""Grid encoder (REFERENCE §2), grid size augmentation (§4) and the backbone schedule (§3, §5)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_BACKBONE, FakeTrainer, TinyGridModule
from torch import nn

from gpo_lit.callbacks.backbone import BackboneSchedule
from gpo_lit.encoders.grid import GridEncoder, grid_size_augment
from gpo_lit.errors import GpoLitError

TINY = TINY_BACKBONE


@pytest.fixture(scope="module")
def encoder() -> GridEncoder:
    torch.manual_seed(0)
    return GridEncoder(TINY, embed_dim=16, pretrained=False)


def test_shapes_and_row_major_flattening(encoder: GridEncoder) -> None:
    enc = encoder.eval()
    x = torch.randn(2, 3, 96, 128)
    out, lengths = enc(x, torch.tensor([3, 3]))
    fmap = enc.backbone(x)[-1]
    assert fmap.shape[2:] == (3, 4) and enc.reduction == 32
    assert out.shape == (2, 12, 16) and lengths.tolist() == [12, 12]
    cells = fmap.flatten(2).transpose(1, 2)
    torch.testing.assert_close(enc.grid(x), cells)
    # row-major: cell k is (row k // W, column k % W)
    torch.testing.assert_close(cells[:, 5], fmap[:, :, 1, 1])
    torch.testing.assert_close(out, enc.fc(cells))


def test_batchnorm_statistics_stay_frozen_but_affine_trains(encoder: GridEncoder) -> None:
    enc = encoder.train()
    bns = [m for m in enc.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert enc.fc.training and enc.backbone.training
    before = [m.running_mean.clone() for m in bns]
    out, _ = enc(torch.randn(4, 3, 64, 64))
    out.sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    assert bns[0].weight.grad is not None and bns[0].weight.requires_grad
    enc.zero_grad()
    unfrozen = GridEncoder(TINY, embed_dim=16, pretrained=False, freeze_bn=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_size_augmentation_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    b, n = 4000, 256
    feats = torch.arange(1, n + 1, dtype=torch.float32).repeat(b, 1)[..., None].repeat(1, 1, 2)
    out, lengths = grid_size_augment(feats, generator=g)
    augmented = lengths < n
    assert abs(augmented.float().mean().item() - 0.8) < 0.03
    rates = 1 - lengths[augmented].float() / n
    assert rates.min() >= 0.0 and rates.max() <= 0.2 + 0.08  # binomial spread around (0.04, 0.2]
    assert abs(rates.mean().item() - 0.12) < 0.01
    assert out.shape[1] == int(lengths.max())
    for i in range(50):
        k = int(lengths[i])
        kept = out[i, :k, 0]
        assert torch.all(kept[1:] > kept[:-1])  # original order, no duplicates
        assert torch.all(out[i, k:] == 0)  # padding is zero
    # non-augmented images keep everything untouched
    j = int(torch.nonzero(~augmented)[0])
    torch.testing.assert_close(out[j, :n], feats[j])


def test_augmentation_only_in_training_and_no_padding_leak(encoder: GridEncoder) -> None:
    torch.manual_seed(1)
    enc = encoder.train()
    out, lengths = enc(torch.randn(64, 3, 128, 128))
    assert (lengths < 16).any() and (lengths == 16).any()
    for i in range(64):
        assert torch.all(out[i, int(lengths[i]) :] == 0)
    enc.eval()
    _, lengths = enc(torch.randn(3, 3, 128, 128))
    assert lengths.tolist() == [16, 16, 16]


def test_missing_weights_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(GpoLitError, match="huggingface-cli download timm/test_resnet") as e:
        GridEncoder(TINY, pretrained=True)
    assert "\n" not in str(e.value)
    with pytest.raises(GpoLitError, match="no such file.*put it here") as e:
        GridEncoder(TINY, checkpoint_path=str(tmp_path / "w.pth"), weights_hint="put it here")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(GpoLitError, match="bad.pth: expected the weights .* missing"):
        GridEncoder(TINY, checkpoint_path=str(tmp_path / "bad.pth"))


def test_checkpoint_path_loads_prefixed_state_dicts(tmp_path) -> None:
    import timm

    torch.manual_seed(3)
    full = timm.create_model(TINY, pretrained=False)
    sd = {f"module.backbone.resnet.{k}": v for k, v in full.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    enc = GridEncoder(TINY, embed_dim=8, checkpoint_path=str(tmp_path / "w.pth"))
    mine = enc.backbone.state_dict()
    assert all(torch.equal(mine[k], full.state_dict()[k]) for k in mine)


# -- schedule -------------------------------------------------------------------------------
def test_backbone_schedule_freezes_then_unfreezes_with_warmup() -> None:
    m = TinyGridModule()
    sched = BackboneSchedule(freeze_epochs=1)
    bb = m.visual_encoder.backbone
    sched.on_train_epoch_start(FakeTrainer(0, 10, 0), m)
    assert not any(p.requires_grad for p in bb.parameters())
    assert all(p.requires_grad for p in m.visual_encoder.fc.parameters())
    sched.on_train_batch_start(FakeTrainer(0, 10, 3), m, None, 3)
    assert m.loss_scale == 1.0
    sched.on_train_epoch_start(FakeTrainer(1, 10, 10), m)
    assert all(p.requires_grad for p in bb.parameters())
    scales = []
    for i in range(10):
        sched.on_train_batch_start(FakeTrainer(1, 10, 10 + i), m, None, i)
        scales.append(m.loss_scale)
    assert scales == pytest.approx([i / 10 for i in range(10)])
    sched.on_train_epoch_start(FakeTrainer(2, 10, 20), m)
    sched.on_train_batch_start(FakeTrainer(2, 10, 20), m, None, 0)
    assert m.loss_scale == 1.0


def test_staged_unfreezing() -> None:
    m = TinyGridModule()
    sched = BackboneSchedule(freeze_epochs=1, stages=[["layer4"], ["layer3"]], warmup=False)
    names = lambda: {n.split(".")[0] for n, p in m.visual_encoder.backbone.named_parameters()  # noqa: E731
                     if p.requires_grad}  # fmt: skip
    sched.apply(m, 0)
    assert names() == set()
    sched.apply(m, 1)
    assert names() == {"layer4"}
    sched.apply(m, 2)
    assert names() == {"layer4", "layer3"}
    sched.apply(m, 5)
    assert names() == {"layer4", "layer3"}
    with pytest.raises(GpoLitError, match="layer9"):
        BackboneSchedule(stages=[["layer9"]]).apply(m, 1)


def test_frozen_params_stay_in_the_optimizer_and_train_later() -> None:
    """AdamW skips parameters without gradients; once unfrozen they update."""
    m = TinyGridModule()
    sched = BackboneSchedule(freeze_epochs=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2)
    w = m.visual_encoder.backbone.layer4[0].conv1.weight
    x = torch.randn(2, 3, 64, 64)
    sched.apply(m, 0)
    before = w.detach().clone()
    m.visual_encoder(x)[0].sum().backward()
    opt.step()
    assert w.grad is None and torch.equal(w, before)
    sched.apply(m, 1)
    opt.zero_grad()
    m.visual_encoder(x)[0].pow(2).sum().backward()
    opt.step()
    assert not torch.equal(w, before)


def test_caffe_stride_equals_subsampling_before_the_block() -> None:
    """Stride 2 on a 1×1 convolution (padding 0) is the 1×1 convolution of every other pixel, so a
    Caffe-strided bottleneck on x equals the same block with all strides 1 on x[..., ::2, ::2]."""
    import copy

    import timm

    from gpo_lit.encoders.grid import stride_in_1x1

    torch.manual_seed(0)
    net = timm.create_model("resnet26", pretrained=False, channels=(4, 8, 8, 16), stem_width=8)
    block = net.layer2[0].eval()
    with torch.no_grad():  # timm zero-inits the last BN scale: the branch would vanish
        for bn in (block.bn1, block.bn2, block.bn3):
            bn.weight.normal_()
    assert block.conv2.stride == (2, 2) and block.downsample[0].stride == (2, 2)
    flat = copy.deepcopy(block)
    flat.conv2.stride = flat.downsample[0].stride = (1, 1)
    x = torch.randn(2, block.conv1.in_channels, 12, 12)
    pytorch_style = block(x)
    assert stride_in_1x1(block) == 1
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    caffe_style = block(x)
    torch.testing.assert_close(caffe_style, flat(x[..., ::2, ::2]))
    assert not torch.allclose(caffe_style, pytorch_style)  # the placement matters

    kw = {"embed_dim": 8, "pretrained": False, "backbone_kwargs": {"channels": (4, 8, 8, 16)}}
    enc = GridEncoder("resnet26", caffe_stride=True, **kw)
    strided = [m for m in enc.backbone.modules() if getattr(m, "conv3", None) is not None]
    assert sum(b.conv1.stride == (2, 2) for b in strided) == 3  # layer2, layer3, layer4
    assert all(b.conv2.stride == (1, 1) for b in strided)
    assert enc.grid(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64)  # still stride 32
    with pytest.raises(GpoLitError, match="caffe_stride: expected a bottleneck ResNet"):
        GridEncoder("resnet10t", caffe_stride=True, embed_dim=8, pretrained=False)  # basic blocks


def test_pretrained_weights_come_from_the_local_cache_without_network(tmp_path, monkeypatch):
    """timm's Hub weights are found in the HF cache layout and loaded with no request, even
    without HF_HUB_OFFLINE."""
    import socket

    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    ref = timm.create_model(TINY, pretrained=False)
    sd = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()
    }
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = GridEncoder(TINY, embed_dim=8, pretrained=True)
    got = enc.backbone.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in got)
    with pytest.raises(GpoLitError, match="expected a timm model name, found 'resnet_nope'"):
        GridEncoder("resnet_nope", embed_dim=8, pretrained=True)
