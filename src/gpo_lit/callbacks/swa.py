"""Stochastic weight averaging as the PCME++ release does it (REFERENCE §12), an option.

PCME++ keeps a running mean of the weights at the end of every epoch from ``swa_start_epoch``
(16: the last 9 of 25 epochs, every epoch) and evaluates that averaged model once training ends.
Training itself is unchanged: the optimiser, the lr schedule and checkpoint selection by dev
rsum see the ordinary weights. :class:`WeightAveraging` keeps the mean of every floating-point
parameter of the LightningModule (encoders, pooling, heads, the loss's scalars; buffers are
copied from the model as they are) and, when training ends, writes it as a checkpoint of its
own (``checkpoints/swa.ckpt``) that ``make eval CKPT=…/swa.ckpt`` evaluates like any other. The
running mean is part of every checkpoint's callback state, so a resumed run continues it.
Deviation: PCME++'s averaged copy keeps the buffers it was created with (its towers have no
statistics buffers, so nothing differs there).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError

log = logging.getLogger(__name__)


class WeightAveraging(pl.Callback):
    """Running mean of the weights at the end of epochs ``start_epoch, start_epoch + every, …``.

    Args:
        start_epoch: first epoch (0-based) whose final weights enter the mean (PCME++: 16).
        every_n_epochs: average every this many epochs from ``start_epoch`` (PCME++: 1).
        dirpath: folder of the averaged checkpoint.
        filename: its file name.
    """

    def __init__(
        self,
        start_epoch: int = 16,
        every_n_epochs: int = 1,
        dirpath: str | None = None,
        filename: str = "swa.ckpt",
    ) -> None:
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise GpoLitError(
                f"callbacks.swa.start_epoch: expected an epoch index >= 0, found {start_epoch!r}"
            )
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise GpoLitError(
                f"callbacks.swa.every_n_epochs: expected an integer >= 1, found {every_n_epochs!r}"
            )
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.filename = filename
        self.n_averaged = 0
        self.averaged_epochs: list[int] = []
        self.mean: dict[str, Tensor] = {}

    def averages(self, epoch: int) -> bool:
        """Whether the weights at the end of ``epoch`` enter the mean."""
        return epoch >= self.start_epoch and (epoch - self.start_epoch) % self.every_n_epochs == 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module, epoch: int) -> None:
        """Fold the current parameters into the mean: ``m += (p − m) / (n + 1)``."""
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            if self.n_averaged == 0:
                self.mean[name] = p.detach().clone()
            else:
                m = self.mean[name]
                m.add_((p.detach().to(m.dtype) - m) / (self.n_averaged + 1))
        self.n_averaged += 1
        self.averaged_epochs.append(epoch)

    def averaged_state_dict(self, module: torch.nn.Module) -> dict[str, Tensor]:
        """The module's state dict with the averaged parameters in place of the current ones."""
        state = module.state_dict()
        return {k: self.mean.get(k, v) for k, v in state.items()}

    # -- hooks -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.averages(epoch) and epoch not in self.averaged_epochs:
            self.update(pl_module, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.n_averaged:
            log.warning(
                "callbacks.swa: no epoch reached start_epoch=%d; no averaged checkpoint written",
                self.start_epoch,
            )
            return
        path = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / self.filename
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self.averaged_state_dict(pl_module))
        try:
            trainer.save_checkpoint(path, weights_only=True)
        finally:
            pl_module.load_state_dict(current)
        if trainer.is_global_zero:
            log.info(
                "stochastic weight averaging: mean of the weights after epochs %s written to %s",
                ", ".join(map(str, self.averaged_epochs)),
                path,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_averaged": self.n_averaged,
            "averaged_epochs": list(self.averaged_epochs),
            "mean": self.mean,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_averaged = int(state_dict["n_averaged"])
        self.averaged_epochs = [int(e) for e in state_dict["averaged_epochs"]]
        self.mean = dict(state_dict["mean"])
