"""Reading a gpo_lit checkpoint file without building anything (no Lightning import): for
:func:`gpo_lit.model.load_model` and for checks that only need the stored config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpo_lit.errors import GpoLitError, expect


def read_checkpoint(path: str | Path, map_location: str = "cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict, loaded with ``weights_only=True`` (no arbitrary unpickling), with
    its ``hyper_parameters`` and ``state_dict`` entries checked; one-line errors naming the file.
    ``mmap=True`` maps the tensors instead of reading them (for a look at the config)."""
    path = Path(path)
    if not path.is_file():
        raise GpoLitError(f"{path}: expected a checkpoint file, found no such file")
    try:
        ckpt: Any = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise GpoLitError(
            f"{path}: expected a gpo_lit checkpoint readable with weights_only=True, found "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    expect(isinstance(ckpt, dict), path, "a checkpoint dict", type(ckpt).__name__)
    for key in ("hyper_parameters", "state_dict"):
        expect(key in ckpt, path, f"a '{key}' entry (a gpo_lit checkpoint)", sorted(ckpt)[:6])
    return ckpt
