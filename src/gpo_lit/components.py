"""The components a config stored in a checkpoint may name, and the check that it names no other.

Loading a checkpoint rebuilds its model (and, in ``gpo-eval``, its data pipeline) with
``hydra.utils.instantiate``, which calls whatever a ``_target_`` names (``os.system`` too). A
checkpoint downloaded from someone else must never run code, so before anything is built:

- every ``_target_`` at any depth of the stored configs (``_args_``, ``_partial_`` nodes, lists
  and nested nodes included) names a public class of gpo_lit's component packages
  (:data:`COMPONENT_PACKAGES`);
- ``demo_generator`` (a function ``RetrievalDataModule`` calls by name) is one of
  :data:`DEMO_GENERATORS`;
- no value holds a ``${…}`` interpolation: configs are stored resolved, and resolving one could
  read the environment (``oc.env``) or call a registered resolver.

The trainer, callbacks and logger of the stored run config (:data:`RUN_RECORD_KEYS`) are a record
of the run that nothing builds or resolves on load; they are not checked, so runs with callbacks
of their own (Lightning's ``EarlyStopping``, a profiler) stay loadable and resumable. Code that
ever builds from them must check them first.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Any

from gpo_lit.errors import UnsafeCheckpointError

# Packages (and modules) whose public classes stored configs may name.
COMPONENT_PACKAGES = (
    "gpo_lit.callbacks",
    "gpo_lit.checkpoint_io",
    "gpo_lit.data",
    "gpo_lit.encoders",
    "gpo_lit.losses",
    "gpo_lit.model",
    "gpo_lit.pooling",
    "gpo_lit.schedules",
    "gpo_lit.swa",
)
# Classes of other libraries that configs name and a checkpoint may rebuild: the optimiser and
# schedule nodes (``conf/optim/``), called only with the model's parameters / the optimiser.
FOREIGN_COMPONENTS = frozenset(
    {"torch.optim.AdamW", "torch.optim.lr_scheduler.MultiStepLR", "adamp.AdamP"}
)
# The functions a stored data config may name as its demo generator.
DEMO_GENERATORS = frozenset(
    {
        "gpo_lit.data.demo.generate_demo",
        "gpo_lit.data.demo_images.generate_demo_images",
        "gpo_lit.data.demo_shards.generate_demo_shards",
        "gpo_lit.data.demo_video.generate_demo_video",
    }
)
# Parts of the stored run config (gpo_lit_config) that are a record only, never built on load.
RUN_RECORD_KEYS = ("trainer", "callbacks", "logger")
# The checkpoint entries that hold configs (Lightning's two, and the run config gpo-train adds).
CONFIG_ENTRIES = ("hyper_parameters", "datamodule_hyper_parameters", "gpo_lit_config")
# Data, not config: the vocabulary's words never go through OmegaConf (``${`` is only text there).
_NOT_RESOLVED = "hyper_parameters.vocab"


def _own(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in COMPONENT_PACKAGES)


@functools.cache
def allowed_targets() -> frozenset[str]:
    """Dotted names of the public classes defined in :data:`COMPONENT_PACKAGES`, under every
    module that exposes them (``gpo_lit.encoders.RegionEncoder`` and
    ``gpo_lit.encoders.region.RegionEncoder``); re-exported foreign classes are not included."""
    names = set()
    for package in COMPONENT_PACKAGES:
        mod = importlib.import_module(package)
        modules = [mod]
        if hasattr(mod, "__path__"):
            modules += [
                importlib.import_module(info.name)
                for info in pkgutil.walk_packages(mod.__path__, package + ".")
            ]
        for m in modules:
            for name, obj in vars(m).items():
                if not name.startswith("_") and inspect.isclass(obj) and _own(obj.__module__):
                    names.add(f"{m.__name__}.{name}")
    return frozenset(names | FOREIGN_COMPONENTS)


def check_stored_configs(where: object, ckpt: dict) -> None:
    """Raise :class:`UnsafeCheckpointError` (one line naming ``where`` and the key path) unless
    the configs stored in ``ckpt`` name only allowed components and hold no interpolation."""
    for entry in CONFIG_ENTRIES:
        if entry in ckpt:
            _check(where, ckpt[entry], entry)


def _refuse(where: object, found: str, path: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{where}: expected a gpo_lit checkpoint whose configs name only gpo_lit components, "
        f"found {found} at {path}"
    )


def _check(where: object, node: Any, path: str) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            target = node["_target_"]
            if not isinstance(target, str) or target not in allowed_targets():
                raise _refuse(where, f"_target_ {str(target)[:80]!r}", path)
        generator = node.get("demo_generator")
        if generator is not None and generator not in DEMO_GENERATORS:
            raise _refuse(where, f"demo_generator {str(generator)[:80]!r}", path)
        for key, value in node.items():
            if isinstance(key, str) and "${" in key:
                raise _refuse(where, f"the interpolation {key[:80]!r} as a key", path)
            if path != "gpo_lit_config" or key not in RUN_RECORD_KEYS:
                _check(where, value, f"{path}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check(where, value, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node and path.partition("[")[0] != _NOT_RESOLVED:
        raise _refuse(where, f"the interpolation {node[:80]!r} (stored configs are resolved)", path)
