"""Optimiser and learning-rate schedule from ``conf/optim/<name>.yaml`` (REFERENCE.md §5, §12).

An ``optim`` node holds

- ``optimizer``: a ``_partial_: true`` node of the optimiser class (``torch.optim.AdamW``;
  ``adamp.AdamP`` for ``optim=adamp``), called with the parameter groups, ``lr`` and
  ``weight_decay``;
- ``lr``, ``weight_decay``: the base values;
- ``lr_mults``: ``{parameter-name prefix: multiplier}`` (per tower: ``text_encoder.bert: 0.1``);
  the first matching prefix applies;
- ``layer_decay``: null, or ``{factor, towers, pattern, num_blocks}``: in each tower (a
  parameter-name prefix), a parameter of transformer block k (read from its name by ``pattern``,
  whose first group is k) gets ``factor ** (num_blocks − k)`` on top of its ``lr_mults``: the top
  block ``factor``, each block below one more factor (PCME++: 0.7). ``num_blocks`` null = the
  tower's highest block index + 1 (PCME++ hard-codes 12, its CLIP towers' depth). Tower
  parameters outside the blocks (embeddings, final norms) keep the tower's multiplier, as in
  PCME++'s code;
- ``no_weight_decay``: parameter-name prefixes trained without weight decay (the loss's learnable
  scalars, ``loss_fn``); prefixes matching nothing are ignored;
- ``scheduler``: a ``_partial_: true`` node of a ``torch.optim.lr_scheduler`` class called with the
  optimiser (``MultiStepLR`` at ``decay_epochs`` by ``decay_gamma``), stepped per ``interval``.

Every parameter goes into a group, frozen ones included: schedules unfreeze backbones later, and
the optimisers skip parameters without gradients.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from gpo_lit.callbacks.backbone import under
from gpo_lit.errors import GpoLitError, expect

if TYPE_CHECKING:
    from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig

#: Block indices of timm ViTs (``blocks.3.``), HF BERT (``layer.3.``), HF CLIP (``layers.3.``) and
#: OpenAI CLIP (``resblocks.3.``).
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:blocks|layers?|resblocks)\.(\d+)\."

_LEGACY_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True}


def _top_level(names: Iterable[str]) -> str:
    return ", ".join(sorted({n.split(".")[0] for n in names}))


def layer_decay_multipliers(names: list[str], cfg: dict[str, Any]) -> dict[str, float]:
    """``{parameter name: factor ** (num_blocks − k)}`` for the block parameters of each tower."""
    factor: Any = cfg.get("factor")
    expect(
        isinstance(factor, int | float) and 0 < factor <= 1,
        "optim.layer_decay.factor",
        "a number in (0, 1]",
        factor,
    )
    towers = cfg.get("towers") or []
    expect(
        isinstance(towers, list | tuple) and len(towers) > 0,
        "optim.layer_decay.towers",
        "a list of parameter-name prefixes (e.g. [visual_encoder.backbone, text_encoder.bert])",
        towers,
    )
    pattern_text = cfg.get("pattern") or DEFAULT_BLOCK_PATTERN
    try:
        pattern = re.compile(pattern_text)
    except re.error as err:
        raise GpoLitError(
            f"optim.layer_decay.pattern: expected a regular expression, found {pattern_text!r} ({err})"
        ) from None
    expect(
        pattern.groups >= 1,
        "optim.layer_decay.pattern",
        "a group capturing the block index",
        pattern_text,
    )
    fixed = cfg.get("num_blocks")
    out: dict[str, float] = {}
    for tower in towers:
        inside = [n for n in names if under(n, tower)]
        expect(
            bool(inside),
            "optim.layer_decay.towers",
            f"parameter-name prefixes of this model (top-level modules: {_top_level(names)})",
            repr(tower),
        )
        blocks: dict[str, int] = {}
        for n in inside:
            m = pattern.search(n[len(tower) :])
            if m:
                blocks[n] = int(m.group(1))
        expect(
            bool(blocks),
            "optim.layer_decay.pattern",
            f"a pattern finding block indices in the parameter names under {tower!r}",
            f"{pattern_text!r} matching none (e.g. {inside[0]!r})",
        )
        depth = int(fixed) if fixed is not None else max(blocks.values()) + 1
        expect(
            max(blocks.values()) < depth,
            "optim.layer_decay.num_blocks",
            f"more than the highest block index under {tower!r} ({max(blocks.values())})",
            fixed,
        )
        for n, k in blocks.items():
            out[n] = float(factor) ** (depth - k)
    return out


def parameter_groups(
    named: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_mults: dict[str, float] | None = None,
    layer_decay: dict[str, Any] | None = None,
    no_weight_decay: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per distinct (lr, weight decay), in first-seen order.

    Returns:
        ``[{"params": [...], "lr": lr · multiplier, "weight_decay": wd}, ...]``.
    """
    names = [n for n, _ in named]
    mults = dict(lr_mults or {})
    for prefix in mults:
        if not any(under(n, prefix) for n in names):
            raise GpoLitError(
                f"optim.lr_mults: expected a parameter-name prefix of this model, found "
                f"{prefix!r} (top-level modules: {_top_level(names)})"
            )
    decay = layer_decay_multipliers(names, layer_decay) if layer_decay else {}
    no_wd = list(no_weight_decay or [])
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in named:
        mult = next((m for p, m in mults.items() if under(name, p)), 1.0) * decay.get(name, 1.0)
        wd = 0.0 if any(under(name, p) for p in no_wd) else float(weight_decay)
        groups.setdefault((mult, wd), []).append(param)
    return [{"params": ps, "lr": lr * m, "weight_decay": wd} for (m, wd), ps in groups.items()]


def _build(node: dict[str, Any], where: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        raise GpoLitError(
            f"{where}: expected an importable class, found {node.get('_target_')!r} "
            f"({str(err).splitlines()[0]})"
        ) from None


def configure_optimization(
    named: list[tuple[str, nn.Parameter]], cfg: dict[str, Any]
) -> OptimizerLRSchedulerConfig:
    """Lightning's ``configure_optimizers`` answer for the ``optim`` node ``cfg``.

    Nodes written before the optimiser and schedule were config nodes (no ``optimizer`` /
    ``scheduler``) mean AdamW and ``MultiStepLR(decay_epochs, decay_gamma)``.
    """
    groups = parameter_groups(
        named,
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        lr_mults=cfg.get("lr_mults"),
        layer_decay=cfg.get("layer_decay"),
        no_weight_decay=cfg.get("no_weight_decay"),
    )
    make_optimizer = _build(cfg.get("optimizer") or _LEGACY_OPTIMIZER, "optim.optimizer._target_")
    optimizer = make_optimizer(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched_node = cfg.get("scheduler") or {
        "_target_": "torch.optim.lr_scheduler.MultiStepLR",
        "_partial_": True,
        "milestones": list(cfg.get("decay_epochs") or []),
        "gamma": cfg["decay_gamma"],
    }
    scheduler = _build(sched_node, "optim.scheduler._target_")(optimizer)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": cfg.get("interval") or "epoch"},
    }
