"""Encoders return projected sets with the shapes and arithmetic of REFERENCE §2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpo_lit.encoders import BiGRUTextEncoder, RegionEncoder
from gpo_lit.errors import GpoLitError


def test_region_encoder_is_fc_plus_mlp_residual() -> None:
    torch.manual_seed(0)
    enc = RegionEncoder(in_dim=12, embed_dim=8, mlp_hidden=5).eval()
    x = torch.randn(3, 4, 12)
    lengths = torch.tensor([4, 2, 3])
    out, out_len = enc(x, lengths)
    assert out.shape == (3, 4, 8) and torch.equal(out_len, lengths)
    # Hand-written reference: fc(x) + layers1(relu(bn0(layers0(x)))), BN in eval mode.
    l0, l1 = enc.mlp.layers
    bn = enc.mlp.bns[0]
    h = (l0(x) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = enc.fc(x) + l1(torch.relu(h))
    torch.testing.assert_close(out, expected)


def test_region_encoder_init_and_checkpoint_layout() -> None:
    enc = RegionEncoder(in_dim=2048, embed_dim=1024, mlp_hidden=512)
    r = (6.0 / (2048 + 1024)) ** 0.5
    assert enc.fc.weight.abs().max() <= r and torch.all(enc.fc.bias == 0)
    keys = set(enc.state_dict())
    # The released checkpoint's names: fc.*, mlp.layers.{0,1}.*, mlp.bns.{0,1}.*
    assert {
        "fc.weight",
        "mlp.layers.0.weight",
        "mlp.layers.1.weight",
        "mlp.bns.1.running_mean",
    } <= keys
    assert enc.mlp.layers[0].weight.shape == (512, 2048)


def test_masked_batchnorm_ignores_padding() -> None:
    torch.manual_seed(0)
    enc = RegionEncoder(in_dim=6, embed_dim=4, mlp_hidden=3, mask_batchnorm=True).train()
    x = torch.randn(2, 5, 6)
    lengths = torch.tensor([5, 2])
    out_a, _ = enc(x, lengths)
    x_garbage = x.clone()
    x_garbage[1, 2:] = 1e3  # padding content must not change the valid outputs
    out_b, _ = enc(x_garbage, lengths)
    torch.testing.assert_close(out_a[0], out_b[0])
    torch.testing.assert_close(out_a[1, :2], out_b[1, :2])
    # Without masking, the padded rows move the batch statistics.
    enc.mlp.mask_batchnorm = False
    out_c, _ = enc(x_garbage, lengths)
    assert not torch.allclose(out_a[0], out_c[0])


def test_bigru_averages_directions_and_ignores_padding() -> None:
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=20, word_dim=6, embed_dim=5)
    ids = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]])
    lengths = torch.tensor([4, 3])
    out, _ = enc(ids, lengths)
    assert out.shape == (2, 4, 5)
    # Reference: run the GRU on the unpadded second caption alone.
    single, _ = enc.rnn(enc.embed(ids[1:, :3]))
    torch.testing.assert_close(out[1, :3], (single[0, :, :5] + single[0, :, 5:]) / 2)
    assert enc.embed.weight.abs().max() <= 0.1


def test_hf_encoder_missing_model_is_one_line() -> None:
    from gpo_lit.encoders import HFTextEncoder

    with pytest.raises(GpoLitError) as info:
        HFTextEncoder("/nonexistent/model-folder", embed_dim=8)
    assert "\n" not in str(info.value) and "/nonexistent/model-folder" in str(info.value)


def test_hf_encoder_tiny_random_bert_uses_every_token(tmp_path) -> None:
    from transformers import BertConfig

    from gpo_lit.encoders import HFTextEncoder

    BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(tmp_path)
    torch.manual_seed(0)
    enc = HFTextEncoder(str(tmp_path), embed_dim=8, pretrained=False).eval()
    assert isinstance(enc.linear, nn.Linear) and enc.linear.in_features == 16
    ids = torch.tensor([[2, 7, 9, 3], [2, 8, 3, 0]])
    out, lengths = enc(ids, torch.tensor([4, 3]))
    assert out.shape == (2, 4, 8)
    # Padding is masked out of attention: the short caption alone gives the same valid tokens.
    alone, _ = enc(ids[1:, :3], torch.tensor([3]))
    torch.testing.assert_close(out[1, :3], alone[0], atol=1e-5, rtol=1e-5)
