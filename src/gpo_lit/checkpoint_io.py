"""Checkpoints written atomically: a kill during a save never loses the previous checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.cloud_io import _atomic_save
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp`` in the same folder, flush to disk, then rename over ``path``.

    ``os.replace`` is atomic on POSIX file systems, so ``path`` always holds either the previous
    complete checkpoint or the new complete one.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        _atomic_save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
