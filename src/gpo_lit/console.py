"""What a run prints besides its results: the composed config as a tree, and no noise.

:func:`print_config_tree` shows the config a job runs with (``print_config=false`` turns it off).
:func:`quiet_known_noise` silences, at their source, the messages nobody running gpo_lit can act
on; every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

# Top-level groups first, in the order a reader follows a run; the remaining keys after them.
TREE_ORDER = ("data", "model", "loss", "optim", "evaluation", "trainer", "callbacks", "logger")


def config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER, resolve: bool = True):
    """A ``rich.tree.Tree``: one branch per top-level key (``order`` first), its YAML inside.

    Interpolations are resolved where they can be (a value that cannot, e.g. outside a Hydra
    job, is shown as written).
    """
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg._get_node(key)  # noqa: SLF001 - the raw node, so a bad interpolation stays text
        assert node is not None  # key is one of cfg's
        if OmegaConf.is_config(node):
            try:
                text = OmegaConf.to_yaml(node, resolve=resolve)
            except Exception:  # noqa: BLE001 - shown unresolved instead
                text = OmegaConf.to_yaml(node, resolve=False)
        else:
            try:
                text = str(cfg[key]) if resolve else str(node._value())  # noqa: SLF001
            except Exception:  # noqa: BLE001
                text = str(node._value())  # noqa: SLF001
        branch.add(Syntax(text.rstrip("\n"), "yaml", theme="ansi_dark", background_color="default"))
    return tree


def print_config_tree(cfg: DictConfig) -> None:
    """Print the composed config as a tree on stdout, unless ``print_config`` is false."""
    if cfg is None or not cfg.get("print_config", True):
        return
    from rich.console import Console

    Console(soft_wrap=True).print(config_tree(cfg))


class _DropMessages(logging.Filter):
    """Drop log records whose message contains one of ``parts``."""

    def __init__(self, *parts: str) -> None:
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.parts)


_FILTER_NAME = "gpo_lit.quiet"


def quiet_known_noise() -> None:
    """Silence, at their source, messages that say nothing about the run (idempotent):

    - Lightning's advertisement for its cloud logger (``litlogger``), logged at every Trainer;
    - torch's ``LeafSpec`` FutureWarning, raised inside Lightning's own pytree helper.

    Each is matched by its own text and origin; any other warning or log record still shows.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(getattr(f, "name", None) == _FILTER_NAME for f in rank_zero.filters):
        drop = _DropMessages("try installing [litlogger]")
        drop.name = _FILTER_NAME
        rank_zero.addFilter(drop)
