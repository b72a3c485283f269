"""Training schedules for end-to-end backbones, CNN grids and ViTs (REFERENCE §3, §5, §12).

:class:`BackboneSchedule` freezes the backbone for the first epoch(s), then unfreezes it (whole,
or in stages: layer4, then layer3, ...; ViT blocks.11, then blocks.10, ...), and during the first epoch in which the backbone trains it
scales the loss linearly from 0 to 1 over the epoch (the supplement's "linear warm-up"), through
``pl_module.loss_scale``.

Frozen parameters stay in the optimiser (``VSEModel.configure_optimizers`` includes every
parameter): with ``requires_grad=False`` they get no gradient and AdamW skips them (no weight decay
either). Under DDP use ``strategy=ddp_find_unused_parameters_true``: the wrapper is built before
the first epoch freezes anything, so it registers every parameter, and frozen epochs leave some
without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import nn

from gpo_lit.errors import GpoLitError


def under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies in module ``prefix`` (whole dotted components:
    ``blocks.1`` holds ``blocks.1.attn.qkv.weight``, not ``blocks.11.…``)."""
    return name == prefix or name.startswith(prefix + ".")


def _children(names: Sequence[str], prefix: str) -> str:
    """The sub-module names next to a wrong ``prefix``: under its deepest existing parent
    (``blocks has 0 … 11`` for ``blocks.12``), or the top-level ones."""
    parts = prefix.split(".")
    for k in range(len(parts) - 1, -1, -1):
        parent = ".".join(parts[:k])
        start = len(parent) + 1 if parent else 0
        kids = {n[start:].split(".")[0] for n in names if not parent or under(n, parent)}
        if kids:
            ordered = sorted(kids, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
            shown = ordered if len(ordered) <= 8 else [*ordered[:3], "…", *ordered[-3:]]
            return f"{parent or 'it'} has {', '.join(shown)}"
    return "it has no parameters"


def _set_loss_scale(pl_module: Any, scale: float) -> None:
    """Set the factor the model multiplies its loss by (``VSEModel.loss_scale``)."""
    pl_module.loss_scale = scale


def _module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise GpoLitError(
                f"callbacks.backbone_schedule.module: expected a sub-module path of the model, "
                f"found {path!r} (no '{part}')"
            )
        mod = getattr(mod, part)
    if not isinstance(mod, nn.Module):
        raise GpoLitError(f"callbacks.backbone_schedule.module: {path!r} is not a module")
    return mod


class BackboneSchedule(pl.Callback):
    """Freeze, unfreeze (optionally in stages) and warm up the loss for a backbone.

    Args:
        freeze_epochs: epochs ``0 .. freeze_epochs-1`` train with the backbone frozen (paper: 1).
        stages: None = the whole backbone trains from epoch ``freeze_epochs``. Otherwise a list of
            lists of module names relative to the backbone (whole dotted components): stage k
            (epoch ``freeze_epochs + k``) trains the union of ``stages[0..k]`` (e.g.
            ``[[layer4], [layer3], [layer2]]`` for a CNN, ``[[blocks.11], [blocks.10]]`` for a
            ViT); after the last stage the set stays as it is, unless
            ``stages_then_all`` makes the whole backbone train.
        warmup: scale the loss by ``(i + warmup_offset) / iters_per_epoch`` at batch ``i`` of the
            first epoch the backbone trains.
        warmup_offset: 0 = VSE∞'s ramp (``i / n``: the first step has no loss); 1 = PCME++'s
            ``(i + 1) / n`` (the last step at full loss).
        module: dotted path of the backbone inside the LightningModule.
        stages_then_all: see ``stages``.
    """

    def __init__(
        self,
        freeze_epochs: int = 1,
        stages: Sequence[Sequence[str]] | None = None,
        warmup: bool = True,
        module: str = "visual_encoder.backbone",
        stages_then_all: bool = False,
        warmup_offset: int = 0,
    ) -> None:
        self.freeze_epochs = int(freeze_epochs)
        self.stages = [list(s) if not isinstance(s, str) else [s] for s in (stages or [])]
        self.warmup = warmup
        self.module = module
        self.stages_then_all = stages_then_all
        if warmup_offset not in (0, 1):
            raise GpoLitError(
                f"callbacks.backbone_schedule.warmup_offset: expected 0 (i / n, VSE∞) or 1 "
                f"((i + 1) / n, PCME++), found {warmup_offset!r}"
            )
        self.warmup_offset = int(warmup_offset)

    # -- what trains when ------------------------------------------------------------------
    def trainable_prefixes(self, epoch: int) -> list[str] | None:
        """Backbone parameter prefixes trained at ``epoch``: [] = frozen, None = everything."""
        if epoch < self.freeze_epochs:
            return []
        if not self.stages:
            return None
        k = epoch - self.freeze_epochs
        if k >= len(self.stages) and self.stages_then_all:
            return None
        return [p for stage in self.stages[: k + 1] for p in stage]

    def apply(self, pl_module: nn.Module, epoch: int) -> int:
        """Set ``requires_grad`` of the backbone for ``epoch``; returns how many tensors train."""
        backbone = _module(pl_module, self.module)
        prefixes = self.trainable_prefixes(epoch)
        named = list(backbone.named_parameters())
        if prefixes:
            for p in prefixes:
                if not any(under(n, p) for n, _ in named):
                    raise GpoLitError(
                        f"callbacks.backbone_schedule.stages: expected parameter-name prefixes of "
                        f"{self.module}, found {p!r} ({_children([n for n, _ in named], p)})"
                    )
        n_train = 0
        for name, param in named:
            on = prefixes is None or any(under(name, p) for p in prefixes)
            param.requires_grad_(on)
            n_train += int(on)
        return n_train

    def warmup_epoch(self) -> int:
        """The first epoch in which the backbone trains."""
        return self.freeze_epochs

    # -- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _module(pl_module, self.module)  # fail early on a wrong path

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.apply(pl_module, epoch)
        _set_loss_scale(pl_module, 1.0)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        epoch = trainer.current_epoch
        if not self.warmup or epoch != self.warmup_epoch():
            _set_loss_scale(pl_module, 1.0)
            return
        n = trainer.num_training_batches
        # batches done this epoch (right after a mid-epoch resume too), one step per batch
        i = max(batch_idx, trainer.global_step - epoch * n) if n not in (0, float("inf")) else 0
        _set_loss_scale(pl_module, float(min(max(i, 0) + self.warmup_offset, n) / n) if n else 1.0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _set_loss_scale(pl_module, 1.0)
