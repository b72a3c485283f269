"""Checkpoints written atomically: a kill or a full disk during a save never loses the previous
checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from gpo_lit.files import check_free_space, write_atomic


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor storage in a checkpoint (each shared storage once): what
    ``torch.save`` writes, give or take its small metadata."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` streamed into a temporary file beside ``path``, flushed to disk, then
    renamed over ``path`` (:func:`gpo_lit.files.write_atomic`).

    ``os.replace`` is atomic on POSIX file systems, so ``path`` always holds either the previous
    complete checkpoint or the new complete one. Unlike Lightning's own save (the whole
    checkpoint serialised in memory, then staged through ``$TMPDIR``), nothing is written
    elsewhere and no second copy is held in memory. Too little free space is refused before
    writing, a disk that fills up during the write removes the temporary file; both are one line
    naming the checkpoint, the space needed and the space free.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = tensor_bytes(checkpoint) + 2**20  # + the pickled structure and zip records
        what = "the checkpoint (the previous one is kept)"
        check_free_space(path, needed, what)
        write_atomic(path, lambda f: torch.save(checkpoint, f), sync=True, needed=needed, what=what)
