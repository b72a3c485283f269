"""Config values, checked once on the composed config at the start of every entry point.

One table, :data:`RULES`, says what each key accepts; :func:`check_config` raises one line
``<key>: expected …, found …`` for the first value outside it, before any file is read or
written. Keys a config does not have are skipped, so ``gpo-train``, ``gpo-eval`` and
``gpo-extract`` share the table. Checks that need the data (widths, counts, a batch larger than
the training split) are the DataModule's (:meth:`RetrievalDataModule.check_splits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpo_lit.errors import GpoLitError
from gpo_lit.modalities import MODALITIES

_ABSENT = object()


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> bool:
    return _int(v) and v >= 1


def optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or ok(v)


def _protocol_names(v: Any) -> bool:
    from gpo_lit.metrics.protocols import PROTOCOLS

    return isinstance(v, list | ListConfig) and len(v) > 0 and all(p in PROTOCOLS for p in v)


def _protocol_name(v: Any) -> bool:
    from gpo_lit.metrics.protocols import PROTOCOLS

    return isinstance(v, str) and v in PROTOCOLS


def _protocols_expected() -> str:
    from gpo_lit.metrics.protocols import PROTOCOLS

    return f"a list of protocol names from {', '.join(PROTOCOLS)} (e.g. [{next(iter(PROTOCOLS))}])"


def _protocol_expected() -> str:
    from gpo_lit.metrics.protocols import PROTOCOLS

    return f"one of the protocols {', '.join(PROTOCOLS)}"


def _probability(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _max_epochs(v: Any) -> bool:
    return v is None or (_int(v) and (v >= 1 or v == -1))


def _limit_batches(v: Any) -> bool:
    if v is None or positive_int(v):
        return True
    return isinstance(v, float) and 0.0 < v <= 1.0


def _epoch_list(v: Any) -> bool:
    return v is None or (isinstance(v, list | ListConfig) and all(_int(e) and e >= 0 for e in v))


def _name(v: Any) -> bool:
    """A non-empty string (a split name, a path)."""
    return isinstance(v, str) and v != ""


def _split_names(v: Any) -> bool:
    return (
        isinstance(v, list | ListConfig)
        and len(v) > 0
        and all(_name(s) for s in v)
        and len(set(v)) == len(v)
    )


def _device(v: Any) -> bool:
    import torch

    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


def _lr_mults(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict | DictConfig) and all(_number(m) and m >= 0 for m in v.values())
    )


# key → (what it accepts, in words, or a function giving the words when they come from a
# registry; the test).
RULES: dict[str, tuple[str | Callable[[], str], Callable[[Any], bool]]] = {
    "seed": (
        "null (draw one) or an integer in [0, 2**32 - 1]",
        optional(lambda v: _int(v) and 0 <= v < 2**32),
    ),
    "num_threads": ("null or a positive integer", optional(positive_int)),
    "data.batch_size": ("a positive integer (the global training batch)", positive_int),
    "data.eval_batch_size": ("a positive integer", positive_int),
    "data.num_workers": ("a non-negative integer", lambda v: _int(v) and v >= 0),
    "data.val_max_images": ("null or a positive integer", optional(positive_int)),
    "data.prefetch_factor": ("null or a positive integer", optional(positive_int)),
    "data.augment.region_keep_prob": (
        "null (no region dropping) or a keep probability in (0, 1]",
        optional(lambda v: _number(v) and 0 < v <= 1),
    ),
    "data.augment.word_prob": ("a probability in [0, 1]", _probability),
    "data.augment.word_mask_prob": ("a probability in [0, 1]", _probability),
    "data.augment.word_random_prob": (
        "a probability in [0, 1 - data.augment.word_mask_prob]",
        _probability,
    ),
    "tags": (
        "a list of labels (e.g. tags=[baseline,gpo])",
        lambda v: isinstance(v, list) and all(isinstance(t, str | int | float) for t in v),
    ),
    "model.embed_dim": ("a positive integer", positive_int),
    "optim.lr": ("a positive learning rate", lambda v: _number(v) and v > 0),
    "optim.weight_decay": ("a non-negative number", lambda v: _number(v) and v >= 0),
    "optim.decay_gamma": ("a positive number", lambda v: _number(v) and v > 0),
    "optim.decay_epochs": ("null or a list of epochs (integers >= 0)", _epoch_list),
    "optim.lr_mults": ("null or {parameter-name prefix: multiplier >= 0}", _lr_mults),
    "loss.margin": ("a non-negative number", lambda v: _number(v) and v >= 0),
    "loss.all_negatives_epochs": ("a non-negative integer", lambda v: _int(v) and v >= 0),
    "trainer.max_epochs": (
        "a positive number of epochs (-1 or null: until trainer.max_steps)",
        _max_epochs,
    ),
    "trainer.limit_train_batches": (
        "null, a positive number of batches or a fraction in (0, 1]",
        _limit_batches,
    ),
    "trainer.log_every_n_steps": ("a positive integer", positive_int),
    "trainer.gradient_clip_val": (
        "null or a non-negative number",
        optional(lambda v: _number(v) and v >= 0),
    ),
    "evaluation.val_protocol": (_protocol_expected, _protocol_name),
    "evaluation.test_protocols": (_protocols_expected, _protocol_names),
    "evaluation.shard_size": ("a positive integer", positive_int),
    # gpo-eval
    "protocols": (lambda: "null or " + _protocols_expected(), optional(_protocol_names)),
    "num_workers": ("a non-negative integer", lambda v: _int(v) and v >= 0),
    "split": ("null or a split name", optional(_name)),
    # gpo-report
    **{
        f"{group}.{m}": ("null or a set size (a positive integer)", optional(positive_int))
        for group in ("theta_sizes", "set_sizes")
        for m in MODALITIES
    },
    "overwrite": ("true or false", lambda v: isinstance(v, bool)),
    # gpo-extract
    "extract.splits": ("a list of distinct split names (e.g. [train, dev, test])", _split_names),
    "extract.out_dir": ("null (<data.root>/features/<backbone>) or a folder path", optional(_name)),
    "extract.ckpt": ("null or a gpo_lit checkpoint path", optional(_name)),
    "extract.device": ("auto, cpu, cuda or cuda:<index>", _device),
    "extract.bf16": ("true or false", lambda v: isinstance(v, bool)),
    "extract.progress": ("true or false", lambda v: isinstance(v, bool)),
    "extract.num_threads": ("null or a positive integer", optional(positive_int)),
    "extract.batch_size": ("a positive integer", positive_int),
    "extract.num_workers": ("a non-negative integer", lambda v: _int(v) and v >= 0),
    "extract.pool_grid": ("null or a grid side >= 1", optional(positive_int)),
    "extract.max_images": ("null or a positive integer", optional(positive_int)),
    "extract.flush_every": ("a positive integer", positive_int),
    "extract.devices": ("a positive integer (processes sharing each split)", positive_int),
    "extract.rank_wait_s": ("a positive number of seconds", lambda v: _number(v) and v > 0),
}


def _unresolvable(err: OmegaConfBaseException, key: str | None = None) -> GpoLitError:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    where = getattr(err, "full_key", None) or key or "config"
    return GpoLitError(f"{where}: expected a value, found {first}")


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or ``_ABSENT``."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise _unresolvable(err, key) from None
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line :class:`GpoLitError` for the first value of ``cfg`` outside :data:`RULES`,
    or for an interpolation that does not resolve (``data.root=${nosuch}``; checked under a
    Hydra main, where ``${hydra:…}`` resolves)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        try:
            OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise _unresolvable(err) from None
    for key, (expected, ok) in RULES.items():
        value = _value(cfg, key)
        if value is _ABSENT or ok(value):
            continue
        words = expected() if callable(expected) else expected
        raise GpoLitError(f"{key}: expected {words}, found {value!r}")
    # The one rule across keys: a perturbed word is masked, randomised or deleted.
    mask, rand = (
        _value(cfg, "data.augment.word_mask_prob"),
        _value(cfg, "data.augment.word_random_prob"),
    )
    if mask is not _ABSENT and rand is not _ABSENT and mask + rand > 1:
        raise GpoLitError(
            "data.augment.word_random_prob: expected a probability in "
            f"[0, 1 - data.augment.word_mask_prob = {1 - mask:g}], found {rand!r}"
        )
