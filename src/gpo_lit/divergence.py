"""A diverging run (NaN/inf loss) stopped with one line, without a host sync per step.

Each training step records, on the device, the first step whose loss is not finite (two tiny
kernels, no ``.item()``). The host reads it only where it waits anyway: every
``trainer.log_every_n_steps`` steps (when the loggers read their values), before validation, at
the end of an epoch, and before a checkpoint is written — and a checkpoint is never written from
non-finite weights, so the last good ``last.ckpt`` survives a divergence.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError


class LossWatch:
    """The first training step (and its epoch) whose loss was NaN/inf, kept on the loss's device.

    Args:
        lr: the configured learning rate, named in the message.
    """

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._step: Tensor | None = None  # -1 while every loss was finite
        self._epoch: Tensor | None = None

    def update(self, loss: Tensor, step: int, epoch: int) -> None:
        """Remember ``step`` if ``loss`` is the first non-finite one (no host sync)."""
        if self._step is None or self._epoch is None or self._step.device != loss.device:
            self._step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._epoch = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = ~torch.isfinite(loss.detach()) & (self._step < 0)
        self._step = torch.where(first, step, self._step)
        self._epoch = torch.where(first, epoch, self._epoch)

    def _diverged(self, found: str) -> GpoLitError:
        return GpoLitError(
            f"optim.lr: expected a learning rate at which the training loss stays finite (try a "
            f"lower optim.lr), found {self.lr}: {found}"
        )

    def check(self) -> None:
        """Raise a one-line error if a loss so far was NaN/inf (one host sync)."""
        if self._step is None or self._epoch is None:
            return
        step = int(self._step)
        if step >= 0:
            raise self._diverged(
                f"the loss diverged to NaN/inf at step {step} (epoch {int(self._epoch)})"
            )

    def check_weights(self, state_dict: Mapping[str, Tensor], step: int, epoch: int) -> None:
        """Before a checkpoint is written: no NaN/inf loss so far and finite weights."""
        self.check()
        floats = [t for t in state_dict.values() if t.is_floating_point() and t.numel()]
        if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
            raise self._diverged(
                f"the weights became NaN/inf by step {step} (epoch {epoch}); no checkpoint was "
                "written from them"
            )
