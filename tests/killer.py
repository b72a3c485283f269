"""A callback for the resume test: SIGKILL the process at a given step (no cleanup, no save)."""

from __future__ import annotations

import os
import signal

from pytorch_lightning import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
