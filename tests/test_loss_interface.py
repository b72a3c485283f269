"""The model ↔ loss interface: a new loss is one class + one config, with no edit to model.py.

A toy loss defined here trains through ``gpo_lit.train`` from a ``conf/loss/toy.yaml`` added via
Hydra's search path, asking the model for uncertainty heads and its own test similarity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_DEMO, TINY_GRID_DEMO, WORDS, compose_cfg, run, tiny_model
from torch import Tensor, nn

from gpo_lit.errors import GpoLitError
from gpo_lit.losses import (
    LossOutput,
    PairEmbeddings,
    RetrievalLoss,
    StepInfo,
    TripletLoss,
    instantiate_loss,
)

# training_step outside a Trainer: Lightning warns that self.log has nowhere to go
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")
ROOT = Path(__file__).resolve().parents[1]


def documented_commands() -> list[list[str]]:
    """Every ``gpo-train …`` of README's "Losses and optimisers" section and of the comments in
    conf/loss/ and conf/optim/, as override lists (shell quotes and comments stripped)."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Losses and optimisers", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("gpo-train ")]
    for cfg in sorted(
        [*(ROOT / "conf" / "loss").rglob("*.yaml"), *(ROOT / "conf" / "optim").glob("*.yaml")]
    ):
        lines += [ln.split("#", 1)[1].strip() for ln in cfg.read_text().splitlines() if "# " in ln]
    commands = []
    for line in lines:
        if line.startswith("gpo-train "):
            words = shlex.split(line.split(" # ")[0].split("  (")[0], comments=True)
            if words[1:] not in commands:
                commands.append(words[1:])
    return commands


README_LOSSES = documented_commands()


def test_documented_commands_are_found() -> None:
    found = {" ".join(c) for c in README_LOSSES}
    for name in ("infonce", "infonce_clip", "pcmepp", "pcmepp_mu"):
        assert f"experiment=demo loss={name} ~loss.all_negatives_epochs" in found
    assert "experiment=demo optim=adamp" in found
    assert any("loss/mixing=pcmepp" in c for c in found)


class ToyLoss(RetrievalLoss):
    """Squared distance of matching pairs minus the mean squared distance of all pairs, times a
    learnable weight; asks for log σ² heads and ranks by the means scaled by 2."""

    uses_uncertainty = True
    calls: list[tuple[StepInfo, tuple[int, ...] | None]] = []
    vectors: dict[str, int] = {"img": 0, "cap": 0}

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(gather=True)
        self.weight = nn.Parameter(torch.tensor(float(weight)))

    def training_loss(self, batch: PairEmbeddings, step: StepInfo) -> LossOutput:
        full = batch.gathered()
        d = torch.cdist(full.img, full.cap) ** 2
        value = self.weight * (d.diagonal().mean() - d.mean()) + 0.0 * full.img_logvar.sum()
        ToyLoss.calls.append((step, tuple(batch.img_logvar.shape)))
        return LossOutput(value, {"negative_pool": float(self.negative_pool(batch.batch_size))})

    def retrieval_vectors(self, mean: Tensor, logvar: Tensor | None, side) -> Tensor:
        assert logvar is not None and logvar.shape == mean.shape
        ToyLoss.vectors[side] += mean.shape[0]
        return 2 * mean


def test_a_loss_from_a_test_config_trains_through_train(tmp_path: Path, monkeypatch) -> None:
    from gpo_lit.train import train

    conf = tmp_path / "conf" / "loss"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text("_target_: tests.test_loss_interface.ToyLoss\nweight: 0.5\n")
    cfg = compose_cfg(
        "train",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "experiment=demo",
        "loss=toy",
        "~loss.all_negatives_epochs",
        *TINY_DEMO,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "logger=none",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    monkeypatch.setattr(ToyLoss, "calls", [])  # fresh records, restored afterwards
    monkeypatch.setattr(ToyLoss, "vectors", {"img": 0, "cap": 0})
    results = train(cfg).test
    assert 0 < results["full"]["rsum"] <= 600
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == results
    assert len(ToyLoss.calls) == 3
    assert [s.batch_idx for s, _ in ToyLoss.calls] == [0, 1, 2]
    assert all(s.epoch == 0 and s.batches_per_epoch == 3 for s, _ in ToyLoss.calls)
    assert all(shape == (32, 128) for _, shape in ToyLoss.calls)  # log σ² from the model's heads
    # validation (60 images, 300 captions) and test (80, 400) ranked by the toy's vectors
    assert ToyLoss.vectors == {"img": 60 + 80, "cap": 300 + 400}
    ckpt = torch.load(
        next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt")), weights_only=True
    )
    assert ckpt["hyper_parameters"]["loss"] == {
        "_target_": "tests.test_loss_interface.ToyLoss",
        "weight": 0.5,
    }
    assert "loss_fn.weight" in ckpt["state_dict"]
    assert any(k.startswith("visual_uncertainty.") for k in ckpt["state_dict"])
    assert any(k.startswith("text_uncertainty.pool.") for k in ckpt["state_dict"])


def test_heads_only_for_losses_that_use_them() -> None:
    plain = tiny_model()
    assert plain.visual_uncertainty is None and plain.text_uncertainty is None
    assert not any("uncertainty" in k for k in plain.state_dict())
    prob = tiny_model("loss=pcmepp", "~loss.all_negatives_epochs")
    assert type(prob.visual_uncertainty.pool).__name__ == "GPO"
    assert {"loss_fn.negative_scale", "loss_fn.shift"} <= prob.state_dict().keys()
    mean_pooled = tiny_model(
        "loss=pcmepp", "~loss.all_negatives_epochs", "model/pooling@model.uncertainty_pooling=mean"
    )
    assert type(mean_pooled.text_uncertainty.pool).__name__ == "MeanPooling"
    mu_only = tiny_model("loss=pcmepp_mu", "~loss.all_negatives_epochs")
    assert mu_only.visual_uncertainty is None


def demo_batch(b: int = 4) -> dict[str, Tensor]:
    torch.manual_seed(0)
    return {
        "img": torch.randn(b, 3, 6),
        "img_len": torch.tensor([3, 2, 3, 1][:b]),
        "cap": torch.tensor([[1, 5, 6, 2], [1, 6, 2, 0], [1, 5, 2, 0], [1, 6, 5, 2]][:b]),
        "cap_len": torch.tensor([4, 3, 3, 4][:b]),
        "img_idx": torch.tensor([0, 1, 0, 2][:b]),
        "idx": torch.arange(b),
    }


@pytest.mark.parametrize("overrides", README_LOSSES, ids=" ".join)
def test_documented_commands_compose_and_step(overrides: list[str]) -> None:
    """Each documented command builds its model; on the region demo one training step and an
    optimiser step run (the raw-image command trains end to end in a slow test below)."""
    if overrides[0] != "experiment=demo":
        cfg = compose_cfg("train", *overrides, "paths.output_dir=unused")
        from hydra.utils import instantiate

        model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=WORDS)
        assert model.loss_fn.mixing is not None or "loss/mixing" not in " ".join(overrides)
        return
    model = tiny_model(*overrides[1:])
    loss = model.training_step(demo_batch(), 0)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimization = model.configure_optimizers()  # keep the scheduler alive: it wraps step()
    optimization["optimizer"].step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("visual_encoder.") for n in moved)
    assert any(n.startswith("text_encoder.") for n in moved)
    assert model.retrieval_embeddings(demo_batch(), 0).shape[0] == 4


def test_pcmepp_eval_vectors_are_minus_d_of_the_model_outputs() -> None:
    model = tiny_model("loss=pcmepp", "~loss.all_negatives_epochs").eval()
    batch = demo_batch()
    with torch.no_grad():
        mu_i, lv_i = model.encode_images(batch["img"], batch["img_len"])
        mu_c, lv_c = model.encode_captions(batch["cap"], batch["cap_len"])
        sims = model.retrieval_embeddings(batch, 0) @ model.retrieval_embeddings(batch, 1).t()
    d = torch.cdist(mu_i, mu_c) ** 2 + lv_i.exp().sum(1)[:, None] + lv_c.exp().sum(1)[None, :]
    torch.testing.assert_close(sims, -d, atol=1e-4, rtol=1e-5)
    assert sims.shape == (4, 4) and not torch.allclose(lv_i, torch.zeros_like(lv_i))


def test_mixing_precomputed_features_is_one_line() -> None:
    model = tiny_model("loss=pcmepp", "~loss.all_negatives_epochs", "loss/mixing=pcmepp")
    with pytest.raises(GpoLitError, match="loss.mixing: expected raw images") as info:
        model.training_step(demo_batch(), 0)
    assert "\n" not in str(info.value)


def test_instantiate_loss_checks_its_node() -> None:
    legacy = instantiate_loss({"margin": 0.3, "all_negatives_epochs": 2, "gather": False})
    assert isinstance(legacy, TripletLoss) and legacy.margin == 0.3  # checkpoints before nodes
    bad = [
        (
            {"_target_": "gpo_lit.losses.InfoNCELoss", "margin": 0.2},
            "loss.margin: expected an option",
        ),
        ({"_target_": "gpo_lit.losses.Nope"}, "loss._target_: expected an importable"),
        (
            {"_target_": "torch.nn.MSELoss"},
            "loss._target_: expected a gpo_lit.losses.RetrievalLoss",
        ),
    ]
    for node, message in bad:
        with pytest.raises(GpoLitError, match=message) as info:
            instantiate_loss(node)
        assert "\n" not in str(info.value)


def test_triplet_interface_keeps_the_warm_up() -> None:
    loss = TripletLoss(all_negatives_epochs=1)
    torch.manual_seed(1)
    img = nn.functional.normalize(torch.randn(5, 4), dim=1)
    cap = nn.functional.normalize(torch.randn(5, 4), dim=1)
    pairs = PairEmbeddings(img, cap, torch.arange(5))
    for epoch, hardest in [(0, False), (1, True)]:
        out = loss.training_loss(pairs, StepInfo(epoch=epoch))
        assert torch.equal(out.value, loss(img, cap, torch.arange(5), hardest=hardest))
        assert out.logs == {"hardest_negatives": float(hardest), "negative_pool": 4.0}


def test_experiment_key_of_another_loss_is_one_line_before_data_work(tmp_path: Path) -> None:
    from gpo_lit.train import train

    cfg = compose_cfg(
        "train",
        "experiment=demo",
        "loss=infonce",  # the demo experiment sets the triplet's all_negatives_epochs
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(GpoLitError) as info:
        train(cfg)
    msg = str(info.value)
    assert msg.startswith(
        "loss.all_negatives_epochs: expected an option of gpo_lit.losses.InfoNCELoss"
    )
    assert "~loss.all_negatives_epochs" in msg and "\n" not in msg
    assert not (tmp_path / "data").exists()  # no demo data generated first


@pytest.mark.slow
def test_pcmepp_trains_and_its_checkpoint_reevaluates_exactly(tmp_path: Path) -> None:
    """loss=pcmepp end to end: σ heads, −d test similarity; gpo-eval rebuilds the model from the
    checkpoint (heads, a, b included) and gets the same metrics."""
    train_dir = tmp_path / "train"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        "loss=pcmepp",
        "~loss.all_negatives_epochs",
        *TINY_DEMO,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={train_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    trained = json.loads((train_dir / "metrics.json").read_text())
    assert 0 < trained["full"]["rsum"] <= 600
    (best,) = (train_dir / "checkpoints").glob("best-*.ckpt")
    res = run("gpo_lit.eval", f"ckpt={best}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == trained


@pytest.mark.slow
def test_pcmepp_with_mixing_on_raw_images(tmp_path: Path, monkeypatch) -> None:
    """The mixing runs on the demo's raw images before the grid encoder (README command)."""
    from gpo_lit.data.mixing import MixedSampleAugment
    from gpo_lit.train import train

    seen: list[tuple[tuple[int, ...], float]] = []
    original = MixedSampleAugment.forward

    def spy(self, images):
        out = original(self, images)
        seen.append((tuple(images.shape), float((out[1] < 1).float().mean())))
        return out

    monkeypatch.setattr(MixedSampleAugment, "forward", spy)

    cfg = compose_cfg(
        "train",
        "experiment=demo_grid",
        "loss=pcmepp",
        "loss/mixing=pcmepp",
        "~loss.all_negatives_epochs",
        *TINY_GRID_DEMO,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=none",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.output_dir={tmp_path / 'run'}",
    )
    results = train(cfg).test
    assert 0 < results["full"]["rsum"] <= 600
    assert [shape for shape, _ in seen] == [(24, 3, 64, 64)] * 2  # training batches only
    assert sum(frac for _, frac in seen) > 0  # some images were mixed
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["loss"]["mixing"]["_target_"] == (
        "gpo_lit.data.mixing.MixedSampleAugment"
    )
