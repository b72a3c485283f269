"""DDP with 2 gloo processes on CPU: gathered negatives give single-process gradients (triplet,
InfoNCE, PCME++)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TINY_DEMO, eval_here, free_port, run
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gpo_lit.losses import InfoNCELoss, PairEmbeddings, PCMEppLoss, StepInfo, TripletLoss

B, D_IN, D = 8, 6, 5


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.cap = nn.Linear(D_IN, D)

    def forward(self, x_img, x_cap):
        norm = nn.functional.normalize
        return norm(self.img(x_img), dim=-1), norm(self.cap(x_cap), dim=-1)


def make_model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower().double()  # float64: the comparison measures the method, not rounding


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Two captions of image 3 fall on different ranks: masking must see across ranks.
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 3, 7])
    x = torch.randn(2, B, D_IN, generator=g, dtype=torch.float64)
    return x[0], x[1], ids


def loss_of(model: nn.Module, x_img, x_cap, ids, loss_fn: TripletLoss, hardest: bool):
    img, cap = model(x_img, x_cap)
    return loss_fn(img, cap, ids, hardest=hardest)


def worker(rank: int, world: int, port: int, hardest: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        x_img, x_cap, ids = make_batch()
        part = slice(rank * B // world, (rank + 1) * B // world)
        loss_fn = TripletLoss(mask_same_image=True, gather=True)
        # Forward through DDP so its gradient averaging applies, as under Lightning.
        loss = loss_of(ddp, x_img[part], x_cap[part], ids[part], loss_fn, hardest)
        loss.backward()
        if rank == 0:
            out["loss"] = loss.detach()
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            out["pool"] = loss_fn.negative_pool(B // world)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes
@pytest.mark.parametrize("hardest", [True, False])
def test_gathered_loss_matches_single_process_gradients(hardest: bool) -> None:
    """Each rank holds half the batch; with loss.gather the DDP-averaged gradients equal the
    gradients of one process over the whole batch (same-image masking across ranks included)."""
    x_img, x_cap, ids = make_batch()
    ref_model = make_model()
    ref_loss = loss_of(ref_model, x_img, x_cap, ids, TripletLoss(mask_same_image=True), hardest)
    ref_loss.backward()

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, free_port(), hardest, out), nprocs=2, join=True)
        result = dict(out)
    assert result["pool"] == B - 1
    torch.testing.assert_close(result["loss"], ref_loss.detach(), atol=1e-6, rtol=0)
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ddp_training_and_sharded_evaluation_equal_single_process(tmp_path) -> None:
    """2 gloo ranks (ddp_spawn): the test metrics of the sharded, padded, de-duplicated evaluation
    equal a single-process evaluation of the same checkpoint exactly. 79 test images and 395
    captions make DistributedSampler pad both loaders."""
    import json

    overrides = [o for o in TINY_DEMO if "n_test" not in o] + ["++data.demo.n_test=79"]
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        "experiment=demo",
        *overrides,
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    distributed = json.loads((run_dir / "metrics.json").read_text())
    eval_here(tmp_path / "eval", f"ckpt={best}")  # one process, this one
    assert distributed == json.loads((tmp_path / "eval" / "metrics.json").read_text())


# -- InfoNCE and PCME++ under 2 gloo processes ---------------------------------------------------
LOSSES = {
    "infonce": lambda local: InfoNCELoss(init_scale=2.0, mask_same_image=True, local_loss=local),
    "infonce_clip": lambda local: InfoNCELoss(
        scale="log", init_scale=1 / 0.07, max_scale=100.0, local_loss=local
    ),
    "pcmepp": lambda local: PCMEppLoss(pseudo_positive=0.5, kl_weight=0.1, local_loss=local),
    "pcmepp_mu": lambda local: PCMEppLoss(uncertainty=False, local_loss=local),
}


class TowersAndLoss(nn.Module):
    """Both towers with log σ² heads and the loss (its scalars train too), one scalar out."""

    def __init__(self, loss_fn) -> None:
        super().__init__()
        self.towers = TwoTower()
        self.img_var = nn.Linear(D_IN, D)
        self.cap_var = nn.Linear(D_IN, D)
        self.loss_fn = loss_fn

    def forward(self, x_img, x_cap, ids, lam, mix_ids):
        img, cap = self.towers(x_img, x_cap)
        lv_img, lv_cap = self.img_var(x_img), self.cap_var(x_cap)
        sigma = self.loss_fn.uses_uncertainty
        pairs = PairEmbeddings(
            img, cap, ids, lv_img if sigma else None, lv_cap if sigma else None, lam, mix_ids
        )
        value = self.loss_fn.training_loss(pairs, StepInfo()).value
        if not sigma:  # keep every parameter in the graph (DDP)
            value = value + 0 * (lv_img.sum() + lv_cap.sum())
        return value


def make_full(name: str, local: bool) -> TowersAndLoss:
    torch.manual_seed(0)
    return TowersAndLoss(LOSSES[name](local)).double()


def mixing_of(ids: torch.Tensor, name: str):
    """PCME++ batches carry mixed images; partners may sit on the other rank."""
    if not name.startswith("pcmepp"):
        return None, None
    lam = torch.tensor([1.0, 0.4, 1.0, 1.0, 0.7, 1.0, 1.0, 0.25], dtype=torch.float64)
    return lam, ids.flip(0)


CASES = [(name, local) for name in LOSSES for local in (False, True)]


def worker_losses(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, local in CASES:
            model = make_full(name, local)
            ddp = DistributedDataParallel(model)
            x_img, x_cap, ids = make_batch()
            lam, mix_ids = mixing_of(ids, name)
            part = slice(rank * B // world, (rank + 1) * B // world)
            loss = ddp(
                x_img[part],
                x_cap[part],
                ids[part],
                None if lam is None else lam[part],
                None if mix_ids is None else mix_ids[part],
            )
            loss.backward()
            values = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(values, loss.detach())
            if rank == 0:
                out[(name, local)] = {
                    "losses": [v.clone() for v in values],
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "pool": model.loss_fn.negative_pool(B // world),
                }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_contrastive_losses_match_single_process() -> None:
    """InfoNCE (both scales) and PCME++ (σ and μ-only, mixed images whose partners sit on the
    other rank): each rank holds half the batch; with gather the DDP-averaged gradients (the loss
    scalars' included) equal one process over the whole batch. Without local_loss every rank's
    loss is the global loss; with it, the ranks' losses average to it."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker_losses, args=(2, free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert set(results) == set(CASES)
    for name, local in CASES:
        x_img, x_cap, ids = make_batch()
        lam, mix_ids = mixing_of(ids, name)
        ref = make_full(name, local=False)
        ref_loss = ref(x_img, x_cap, ids, lam, mix_ids)
        ref_loss.backward()
        result = results[(name, local)]
        case = f"{name}, local_loss={local}"
        assert result["pool"] == B - 1, case
        losses = torch.stack(result["losses"])
        if local:
            torch.testing.assert_close(
                losses.mean(), ref_loss.detach(), atol=1e-6, rtol=0, msg=case
            )
            assert not torch.allclose(losses[0], losses[1]), case  # each rank's own share
        else:
            for value in losses:
                torch.testing.assert_close(value, ref_loss.detach(), atol=1e-6, rtol=0, msg=case)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(
                result["grads"][n], p.grad, atol=1e-6, rtol=0, msg=f"{case}: {n}"
            )
