"""Embeddings on disk: one ``.npz`` with ``img`` float32 [n_img, d], ``cap`` float32 [n_cap, d]
and ``cap2img`` int64 [n_cap]; loaded without pickle and validated on open."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError, first_line, require_file
from gpo_lit.files import ensure_new, write_atomic
from gpo_lit.metrics.prepared import prepare_embeddings

KEYS = ("img", "cap", "cap2img")


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def save_embeddings(path: str | os.PathLike, img: Any, cap: Any, cap2img: Any) -> Path:
    """Validate and write img [n_img, d], cap [n_cap, d] (float32) and cap2img [n_cap] (int64).

    Written to a temporary name then renamed, so a crash never leaves a half-written file; an
    existing file is never overwritten.
    """
    path = Path(path)
    ensure_new(path)
    img_np = _numpy(img).astype(np.float32, copy=False)
    cap_np = _numpy(cap).astype(np.float32, copy=False)
    c2i_np = _numpy(cap2img)
    try:
        prepare_embeddings(img_np, cap_np, c2i_np)
    except GpoLitError as e:
        raise GpoLitError(f"{path}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    c2i_np = c2i_np.astype(np.int64, copy=False)
    return write_atomic(path, lambda f: np.savez(f, img=img_np, cap=cap_np, cap2img=c2i_np))


def load_embeddings(path: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor]:
    """(img float32 [n_img, d], cap float32 [n_cap, d], cap2img int64 [n_cap]) as CPU tensors."""
    path = Path(path)
    require_file(path, "an embeddings .npz file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # numpy would take any other file for a pickle
        what = (
            f"a file that is not a zip archive (it starts with {head!r})"
            if head
            else "an empty file"
        )
        raise GpoLitError(f"{path}: expected an embeddings .npz archive, found {what}")
    try:
        with np.load(path, allow_pickle=False) as z:
            found = sorted(z.files)
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise GpoLitError(
                    f"{path}: expected arrays {', '.join(KEYS)}, found {', '.join(found) or 'none'}"
                )
            arrays = {k: z[k] for k in KEYS}
    except GpoLitError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise GpoLitError(
            f"{path}: expected an .npz archive without pickles, found {first_line(e)}"
        ) from None
    for k in ("img", "cap"):
        if not np.issubdtype(arrays[k].dtype, np.floating):
            raise GpoLitError(f"{path}: expected {k} float, found dtype {arrays[k].dtype}")
    try:
        prepare_embeddings(arrays["img"], arrays["cap"], arrays["cap2img"])
    except GpoLitError as e:
        raise GpoLitError(f"{path}: {e}") from None
    return (
        torch.from_numpy(arrays["img"].astype(np.float32, copy=False)),
        torch.from_numpy(arrays["cap"].astype(np.float32, copy=False)),
        torch.from_numpy(arrays["cap2img"].astype(np.int64, copy=False)),
    )
