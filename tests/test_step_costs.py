"""Fixed per-step costs: last.ckpt on a clock (not every N steps), no progress-bar read-back of
the loss each step, and ``model.compile`` (its wrapping, and the loss it trains to)."""

from __future__ import annotations

import csv
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers import TINY_DEMO, compose_cfg, tiny_model, train_here
from hydra.utils import instantiate

from gpo_lit.checkpoint_io import AtomicCheckpointIO
from gpo_lit.errors import GpoLitError, user_error
from gpo_lit.model import VSEModel

STEPS = (
    "callbacks.last_checkpoint.train_time_interval=null",
    "callbacks.last_checkpoint.every_n_train_steps=50",
)  # the step-based alternative, as conf/callbacks/default.yaml shows it


def _last_checkpoint(*overrides: str):
    cfg = compose_cfg("train", "experiment=demo", "paths.output_dir=unused", *overrides)
    return instantiate(cfg.callbacks.last_checkpoint)


def test_last_checkpoint_is_timed_by_default_and_steps_stay_available() -> None:
    timed = _last_checkpoint()
    assert timed._train_time_interval == timedelta(minutes=10)
    assert timed._every_n_train_steps == 0 and timed.save_last is True
    stepped = _last_checkpoint(*STEPS)
    assert stepped._train_time_interval is None and stepped._every_n_train_steps == 50


def test_timed_last_checkpoint_and_logging_without_per_step_reads(tmp_path, monkeypatch) -> None:
    saves: list[tuple[str, int]] = []  # (file name, global step) of every checkpoint written
    save = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saves.append((Path(path).name, checkpoint["global_step"]))
        return save(self, checkpoint, path, storage_options)

    shown: list[tuple[int, dict, list]] = []  # per step: progress bar, its metrics' settings
    batch_end = VSEModel.on_train_batch_end

    def watch(self, outputs, batch, batch_idx):
        batch_end(self, outputs, batch, batch_idx)
        bar = [(m.meta.fx, m.meta.name, m.meta.logger) for m in self.trainer._results.values()
               if m.meta.prog_bar]  # fmt: skip
        shown.append((self.global_step, dict(self.trainer.progress_bar_metrics), bar))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    monkeypatch.setattr(VSEModel, "on_train_batch_end", watch)
    run_dir = tmp_path / "run"
    train_here(
        run_dir,
        "experiment=demo",
        *TINY_DEMO,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.log_every_n_steps=2",
        "callbacks.last_checkpoint.train_time_interval.minutes=1e-9",  # due after every step
        "logger=csv",
        f"paths.data_dir={tmp_path / 'data'}",  # not the working folder's data/
    )
    # last.ckpt after every step (mid-epoch too), not only at the end, but never at an epoch's
    # last batch (step 3: Lightning would resume it without epoch 0's validation); the run's end
    # saves step 6
    assert [s for name, s in saves if name == "last.ckpt"][:5] == [1, 2, 4, 5, 6]

    # the progress bar shows only a CPU copy of the loss, refreshed at the logging steps
    for step, bar, settings in shown:
        assert settings == [("on_train_batch_end", "loss", False)] or (step < 2 and not settings)
        assert "train/loss" not in bar
    refreshed = {step: bar["loss"] for step, bar, _ in shown if step % 2 == 0}
    assert sorted(refreshed) == [2, 4, 6]
    # the loggers' values are unchanged: the loss each step, the numbers a loss reports
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines()))
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 3 and "loss" not in rows[0]  # steps 2, 4, 6 (log_every_n_steps=2)
    logged = sorted(float(r["train/loss"]) for r in train)
    assert sorted(refreshed.values()) == pytest.approx(logged, rel=1e-6)
    # all negatives in epoch 0 (all_negatives_epochs=1), hardest after; of 32 pairs per batch,
    # each positive has the 31 others as negatives
    assert [float(r["train/hardest_negatives"]) for r in train] == [0.0, 1.0, 1.0]
    assert {float(r["train/negative_pool"]) for r in train} == {31.0}


def test_a_run_shorter_than_the_interval_ends_with_one_last_checkpoint(tmp_path) -> None:
    # gpo_lit saves last.ckpt when training ends, and so does Lightning's save_last callback when
    # its clock never came due; the second save must replace the file, not add last-v1.ckpt.
    run_dir = tmp_path / "run"
    train_here(
        run_dir, "experiment=demo", *TINY_DEMO, "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "logger=csv", "test_after_fit=false",
        f"paths.data_dir={tmp_path / 'data'}",  # not the working folder's data/
    )  # fmt: skip
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("best-"), names
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """4 pairs for :func:`helpers.tiny_model`: 6-d region sets of 2..5, captions of 2..6 words."""
    g = torch.Generator().manual_seed(seed)
    img_len = torch.tensor([5, 3, 2, 4])
    cap_len = torch.tensor([6, 2, 4, 3])
    cap = torch.randint(5, 7, (4, 6), generator=g) * (torch.arange(6) < cap_len[:, None])
    return {"img": torch.randn(4, 5, 6, generator=g), "img_len": img_len, "cap": cap,
            "cap_len": cap_len, "img_idx": torch.arange(4)}  # fmt: skip


def _two_steps(model: VSEModel) -> list[float]:
    """The training loss of a batch before and after one SGD step on it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        for _ in range(2):
            loss = model.training_step(_batch(), 0)
            losses.append(float(loss))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_trains_to_the_eager_loss(backend: str) -> None:
    torch.manual_seed(0)
    eager = tiny_model()
    torch.manual_seed(0)
    try:
        compiled = tiny_model("model.compile=true", f"model.compile_backend={backend}")
        losses = _two_steps(compiled)
    except GpoLitError:
        raise
    except Exception as err:  # noqa: BLE001 - a backend this machine cannot build
        if backend == "eager":
            raise
        pytest.skip(f"torch.compile backend {backend} fails here: {str(err)[:200]}")
    parts = ("visual_encoder", "text_encoder", "visual_pool", "text_pool")
    assert all(getattr(compiled, p)._compiled_call_impl is not None for p in parts)
    assert all(getattr(eager, p)._compiled_call_impl is None for p in parts)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    reference = _two_steps(eager)
    assert reference[1] < reference[0]  # the step changed the weights
    assert losses == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_unknown_compile_backend_is_one_line() -> None:
    with pytest.raises(Exception) as caught:
        tiny_model("model.compile=true", "model.compile_backend=warp")
    err = str(user_error(caught.value))
    assert err.startswith("model.compile_backend: expected one of ") and err.endswith("found warp")
    assert "inductor" in err and "eager" in err and "\n" not in err


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_compiled_gpo_runs_its_cpu_kernels_eagerly(cpu_kernels: bool) -> None:
    """Under ``torch.compile`` GPO's CPU kernels (the packed sort or the numpy argsort, the
    generator) are not traced: no captured graph holds their ops, and GPO's output and
    gradients are the eager ones exactly (the kernels run as they are; what is traced is
    elementwise glue)."""
    from gpo_lit.pooling import create_pooling

    graphs: list[str] = []

    def record(gm: torch.fx.GraphModule, _inputs: list) -> torch.fx.GraphModule:
        graphs.append(str(gm.graph))
        return gm.forward

    torch.manual_seed(0)
    eager = create_pooling("gpo", dim=8, cpu_kernels=cpu_kernels).train()
    compiled = create_pooling("gpo", dim=8, cpu_kernels=cpu_kernels).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(backend=record)
    torch._dynamo.reset()
    for n, lengths in ((5, [5, 3, 1]), (7, [2, 7, 4])):
        x = torch.randn(3, n, 8)
        outs = []
        for pool in (eager, compiled):
            xg = x.clone().requires_grad_(True)
            out = pool(xg, torch.tensor(lengths))
            out.square().sum().backward()
            outs.append((out.detach(), xg.grad, *(p.grad.clone() for p in pool.parameters())))
            pool.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert graphs  # something was compiled
    traced = "\n".join(graphs)
    assert "bitwise_or" not in traced and "baddbmm" not in traced and "sort" not in traced
