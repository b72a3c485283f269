"""Test-wide settings: offline, one BLAS/torch thread per process (the CI machine has 2 cores
and several tests start subprocesses), non-interactive plotting."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the end-to-end subprocesses

import torch  # noqa: E402

torch.set_num_threads(1)
