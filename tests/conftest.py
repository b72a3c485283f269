"""Test-wide settings: offline, one BLAS/torch thread per process (the CI machine has 2 cores
and several tests start subprocesses), non-interactive plotting, Ctrl-C not ignored; and the
fixtures several test modules share (what they share as plain functions is in ``helpers.py``)."""

from __future__ import annotations

import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"  # no network, ever (set before any test module imports)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the end-to-end subprocesses

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TINY_BACKBONE, make_image_tree, save_tiny_clip  # noqa: E402

from gpo_lit.data.formats.images import ImageSplit  # noqa: E402
from gpo_lit.encoders.grid import GridEncoder  # noqa: E402

torch.set_num_threads(1)

# A shell starts a background job (`cmd &`, no job control) with SIGINT ignored, and every process
# it starts inherits that: the Ctrl-C tests need the runs they start to get KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with slow tests first, each module's tests kept together and in order (module
    fixtures are built once). pytest-xdist (``make test``: ``--dist loadfile``) hands the modules
    out in this order: the long end-to-end runs start early and the many short tests fill the
    end, instead of one long run finishing alone on one core."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)


@pytest.fixture()
def tree_split(tmp_path: Path) -> ImageSplit:
    """The test split of a tiny F30K-shaped image tree: 9 images, 32 px."""
    make_image_tree(tmp_path / "f30k", n=9)
    return ImageSplit(tmp_path / "f30k", "test", image_size=32)


@pytest.fixture()
def encoder() -> GridEncoder:
    """A tiny untrained timm backbone with its grid head, seeded, in eval mode."""
    torch.manual_seed(0)
    return GridEncoder(TINY_BACKBONE, embed_dim=8, pretrained=False).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP checkpoint (text + vision) and its tokenizer in one folder, as on the Hub."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))
