"""The global random state in checkpoints, so a resumed run draws what the uninterrupted run drew.

The data's randomness is a function of (seed, epoch, index) and needs none of this. The model's
(dropout, grid size augmentation, image mixing) comes from torch's global generators, which the
loaders also draw from when they start an epoch or a validation. A checkpoint stores their state
of every rank as it was when it was written, and a resume puts it back where the uninterrupted
run stood then: just before the first resumed batch for a checkpoint taken inside a training
epoch (after the resumed run has restarted the epoch's loader, which the uninterrupted run had
done before the checkpoint), else at once (one taken during validation or when training ended:
what followed in the uninterrupted run happens in the resumed one as well). No ``last.ckpt`` is
taken at an epoch's last batch (:class:`gpo_lit.resume.LastCheckpoint`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor

from gpo_lit.errors import GpoLitError

log = logging.getLogger("gpo_lit")

KEY = "gpo_lit_random_state"  # the checkpoint entry


def _own_state() -> dict[str, Any]:
    """This process's generator states: the CPU one and each initialised CUDA device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def capture(trainer: pl.Trainer) -> dict[str, Any]:
    """The checkpoint entry: every rank's generator states (a collective under DDP: every rank
    writes the checkpoint dict) and whether the run stands inside a training epoch."""
    own = _own_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, own)
    else:
        ranks = [own]
    mid_epoch = bool(trainer.training and not trainer.is_last_batch)
    return {"ranks": ranks, "mid_epoch": mid_epoch}


def _is_state(t: Any, like: Tensor) -> bool:
    return isinstance(t, Tensor) and t.dtype == torch.uint8 and t.shape == like.shape


def check(path: str | Path, entry: Any) -> None:
    """One line naming ``path`` unless ``entry`` (absent: None) is what :func:`capture` writes."""
    if entry is None:
        return
    like = torch.get_rng_state()
    ranks = entry.get("ranks") if isinstance(entry, dict) else None
    ok = (
        isinstance(ranks, list)
        and len(ranks) > 0
        and isinstance(entry.get("mid_epoch"), bool)
        and all(
            isinstance(r, dict)
            and _is_state(r.get("cpu"), like)
            and isinstance(r.get("cuda"), list)
            and all(isinstance(c, Tensor) and c.dtype == torch.uint8 for c in r["cuda"])
            for r in ranks
        )
    )
    if not ok:
        raise GpoLitError(
            f"{path}: expected in '{KEY}' the generator states of each rank (a list of "
            f"{{cpu: uint8 tensor of {like.numel()} bytes, cuda: [uint8 tensors]}}) and "
            f"'mid_epoch', found another value"
        )


def restore(entry: dict[str, Any], rank: int, world_size: int) -> None:
    """Put back this rank's generator states from a checkpoint entry (a run resumed on another
    number of ranks keeps its fresh ones and says so)."""
    ranks = entry["ranks"]
    if len(ranks) != world_size:
        log.warning(
            "the random state is not restored: the checkpoint holds %d ranks' states, the run "
            "has %d ranks (training goes on with fresh random draws)",
            len(ranks),
            world_size,
        )
        return
    own = ranks[rank]
    torch.set_rng_state(own["cpu"])
    if own["cuda"] and torch.cuda.is_available():
        if len(own["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(own["cuda"])
        else:
            log.warning("the CUDA random state is not restored: another number of devices")
