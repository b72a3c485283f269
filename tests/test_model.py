"""The LightningModule's own logic: optimiser groups, evaluation bookkeeping, checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from gpo_lit.errors import GpoLitError
from gpo_lit.model import load_model


def test_lr_multipliers_make_parameter_groups() -> None:
    model = tiny_model("optim.lr_mults={text_encoder.rnn: 0.1}")
    opt = model.configure_optimizers()["optimizer"]
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([5e-5, 5e-4])
    slow = next(g for g in opt.param_groups if g["lr"] == pytest.approx(5e-5))
    assert {id(p) for p in slow["params"]} == {id(p) for p in model.text_encoder.rnn.parameters()}
    assert all(g["weight_decay"] == pytest.approx(1e-2) for g in opt.param_groups)


def test_unknown_lr_prefix_is_one_line() -> None:
    model = tiny_model("optim.lr_mults={text_encoder.bert: 0.1}")
    with pytest.raises(GpoLitError, match="optim.lr_mults.*text_encoder.bert") as info:
        model.configure_optimizers()
    assert "\n" not in str(info.value)


def test_step_decay_at_configured_epoch() -> None:
    model = tiny_model("optim.decay_epochs=[2]")
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 5e-4, 5e-5, 5e-5])


def test_per_modality_pooling_override() -> None:
    model = tiny_model("model/pooling=max", "+model/pooling@model.visual_pooling=kmax")
    assert type(model.visual_pool).__name__ == "KMaxPooling"
    assert type(model.text_pool).__name__ == "MaxPooling"


def test_deduplicate_keeps_one_row_per_index() -> None:
    from gpo_lit.metrics.collect import deduplicate

    emb = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    # A padded sampler repeats items: index 0 arrives twice, with the same embedding.
    out, seen = deduplicate(torch.tensor([2, 0, 1, 3, 0]), emb[[2, 0, 1, 3, 0]], 4)
    torch.testing.assert_close(out, emb[:4])
    assert seen.all()
    out, seen = deduplicate(torch.tensor([0, 2]), emb[[0, 2]], 3)
    assert seen.tolist() == [True, False, True] and torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], emb[[0, 2]])
    # Of two rows for one index the first is kept, wherever the second sits.
    out, _ = deduplicate(torch.tensor([1, 0, 1]), torch.tensor([[1.0], [0.0], [9.0]]), 2)
    assert out.tolist() == [[0.0], [1.0]]


def test_evaluation_metric_ranks_the_deduplicated_split() -> None:
    """Batches of a padded sampler (repeated items, any order) through the Metric give exactly
    the metrics of the split's embeddings in order; reset() empties it for the next epoch."""
    import torch.nn.functional as F

    from gpo_lit.metrics import evaluate
    from gpo_lit.metrics.collect import CAPTIONS, IMAGES, RankingTask, RetrievalEmbeddings

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 3, generator=g), dim=-1)
    cap = F.normalize(torch.randn(8, 3, generator=g), dim=-1)
    cap2img = torch.arange(4).repeat_interleave(2)
    metric = RetrievalEmbeddings()
    metric.update(IMAGES, torch.tensor([2, 0]), img[[2, 0]])
    metric.update(IMAGES, torch.tensor([1, 3, 2]), img[[1, 3, 2]])
    metric.update(CAPTIONS, torch.arange(7, -1, -1), cap.flip(0))
    metric.update(CAPTIONS, torch.tensor([5]), cap[[5]])
    metric.task = RankingTask(4, 8, cap2img, ("full",))
    assert metric.compute() == {"full": evaluate(img, cap, cap2img, protocol="full")}
    torch.testing.assert_close(metric.ranked.img, img)
    torch.testing.assert_close(metric.ranked.cap, cap)
    assert not metric.ranked.subset
    metric.reset()
    assert metric.img_idx == [] and metric.cap_emb == []


def test_embedded_subset_keeps_images_and_captions_seen_together() -> None:
    """Hand-worked: 4 images, captions of images [0, 0, 1, 1, 2, 3, 3]; images 0, 1, 3 and
    captions 0, 1, 2, 4, 5 embedded. Caption 4 (image 2, not embedded) goes; image 3 keeps
    caption 5; image 1 keeps caption 2. Kept images 0, 1, 3 are renumbered 0, 1, 2."""
    from gpo_lit.metrics.collect import embedded_subset

    img = torch.arange(8.0).reshape(4, 2)
    cap = torch.arange(14.0).reshape(7, 2)
    cap2img = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    img_seen = torch.tensor([True, True, False, True])
    cap_seen = torch.tensor([True, True, True, False, True, True, False])
    sub_img, sub_cap, sub_map = embedded_subset(img, cap, cap2img, img_seen, cap_seen)
    torch.testing.assert_close(sub_img, img[[0, 1, 3]])
    torch.testing.assert_close(sub_cap, cap[[0, 1, 2, 5]])
    assert sub_map.tolist() == [0, 0, 1, 2]
    # An embedded image none of whose captions was embedded has no ground truth: left out.
    cap_seen = torch.tensor([True, True, False, False, True, True, True])
    sub_img, _, sub_map = embedded_subset(img, cap, cap2img, img_seen, cap_seen)
    torch.testing.assert_close(sub_img, img[[0, 3]])
    assert sub_map.tolist() == [0, 0, 1, 1]


def test_load_model_rejects_non_checkpoints(tmp_path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GpoLitError, match="bad.ckpt") as info:
        load_model(bad)
    assert "\n" not in str(info.value)
    torch.save({"state_dict": {}}, tmp_path / "partial.ckpt")
    with pytest.raises(GpoLitError, match="hyper_parameters"):
        load_model(tmp_path / "partial.ckpt")
