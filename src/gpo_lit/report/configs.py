"""Describing a sweep's configurations for people: experiment (+ features when they vary), the
visual and text pooling (K-max's ``k`` shown, ``N`` when ``k`` reaches the set size) and any
other override that varies; two configurations never read the same."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from gpo_lit.modalities import MODALITIES, pooling_for
from gpo_lit.report.jobs import Job, fmt_value, override_key, select

# A K at or above the set size is labelled N (mean pooling); when neither the options nor the
# data config say: BUTD's 36 regions, a caption longer than F30K's / COCO's.
DEFAULT_SET_SIZE = {"visual": 36, "text": 64}
# Pooling options always shown in a label (they define the operator), whether or not they vary.
DEFINING_OPTIONS = {"kmax": ("k",)}
# Overrides rendered by the pooling columns or the experiment column (not repeated under "other").
_POOLING_KEYS = ("model/pooling", "model.pooling", "model.visual_pooling", "model.text_pooling")
_GROUP_KEYS = ("experiment", "name", "model/visual", "model/text")


def pooling_node(cfg: DictConfig | None, modality: str) -> dict[str, Any]:
    """The pooling a modality uses in a job's config (:func:`gpo_lit.modalities.pooling_for`)."""
    model = {k: select(cfg, f"model.{k}") for k in ("pooling", f"{modality}_pooling")}
    node = pooling_for(model, modality) or {}
    return dict(node) if isinstance(node, dict) else {"name": str(node)}


def set_size(cfg: DictConfig | None, modality: str, given: int | None, default: dict) -> int:
    """A modality's set size: ``given``, else (visual) the regions / frames per item of the demo
    data config, else ``default[modality]``."""
    if given is not None:
        return int(given)
    if modality == "visual":
        for key in ("data.demo.n_regions", "data.demo.n_frames", "data.reader.n_frames"):
            value = select(cfg, key)
            if isinstance(value, list | tuple) and value:
                value = max(value)
            if isinstance(value, int) and value > 0:
                return value
    return default[modality]


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else "?"


@dataclass(frozen=True)
class Configuration:
    """A setting of the sweep, rendered for people: experiment (+ features when they vary),
    visual and text pooling, other varying overrides."""

    key: tuple[str, ...]
    group: str
    visual: str
    text: str
    other: str
    pooling: tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]  # visual, text nodes
    set_sizes: tuple[int, int]  # visual, text: K at or above is N

    @property
    def label(self) -> str:
        pool = self.visual if self.visual == self.text else f"{self.visual} / {self.text}"
        return f"{pool}, {self.other}" if self.other else pool

    def node(self, modality: str) -> dict[str, Any]:
        return dict(self.pooling[MODALITIES.index(modality)])


def is_gpo(node: dict) -> bool:
    """Whether a pooling node is GPO or one of its variants."""
    return str(node.get("name", "")).startswith("gpo")


def _pooling_label(node: dict, shown: Iterable[str], n: int) -> str:
    name = str(node.get("name", "?"))
    parts = []
    for opt in shown:
        if opt not in node:
            continue
        value = node[opt]
        is_n = name == "kmax" and opt == "k" and isinstance(value, int) and value >= n
        parts.append(f"{opt}={'N' if is_n else fmt_value(value)}")
    return f"{name}({', '.join(parts)})" if parts else name


def describe(
    jobs: Sequence[Job], set_sizes: dict[str, int | None] | None = None
) -> dict[tuple[str, ...], Configuration]:
    """Each configuration of the sweep (keyed by :attr:`Job.key`), labelled by what varies."""
    set_sizes = set_sizes or {}
    first: dict[tuple[str, ...], Job] = {}
    for job in jobs:
        first.setdefault(job.key, job)
    reps = list(first.values())
    # Options shown per pooling name: the defining ones and those that vary across the sweep.
    values: dict[str, dict[str, set[str]]] = {}
    for job in reps:
        for modality in MODALITIES:
            node = pooling_node(job.config, modality)
            for opt, value in node.items():
                if opt != "name":
                    values.setdefault(str(node.get("name")), {}).setdefault(opt, set()).add(
                        repr(value)
                    )
    shown = {
        name: [o for o in opts if o in DEFINING_OPTIONS.get(name, ()) or len(opts[o]) > 1]
        for name, opts in values.items()
    }
    # Group: the experiment name, plus the encoders when they vary.
    parts = {
        job.key: (
            str(select(job.config, "name", "?")),
            _short(select(job.config, "model.visual._target_")),
            _short(select(job.config, "model.text.encoder._target_")),
        )
        for job in reps
    }
    varies = [len({p[i] for p in parts.values()}) > 1 for i in range(3)]
    common = set.intersection(*(set(k) for k in first)) if first else set()

    out = {}
    for key, job in first.items():
        name, vis_enc, txt_enc = parts[key]
        encoders = [e for e, v in zip((vis_enc, txt_enc), varies[1:], strict=True) if v]
        group = f"{name} ({' + '.join(encoders)})" if encoders else name
        nodes, labels, sizes = [], [], []
        for modality in MODALITIES:
            node = pooling_node(job.config, modality)
            n = set_size(job.config, modality, set_sizes.get(modality), DEFAULT_SET_SIZE)
            nodes.append(tuple(sorted(node.items(), key=lambda kv: kv[0])))
            labels.append(_pooling_label(node, shown.get(str(node.get("name")), []), n))
            sizes.append(n)
        other = [
            o
            for o in job.overrides  # in the order given
            if o in key
            and o not in common
            and not override_key(o).startswith(_POOLING_KEYS)
            and override_key(o) not in _GROUP_KEYS
        ]
        out[key] = Configuration(
            key,
            group,
            labels[0],
            labels[1],
            ", ".join(other),
            (nodes[0], nodes[1]),
            (sizes[0], sizes[1]),
        )
    # Two configurations must never read the same: add the overrides that tell them apart.
    by_text: dict[tuple[str, str, str, str], list[tuple[str, ...]]] = {}
    for key, c in out.items():
        by_text.setdefault((c.group, c.visual, c.text, c.other), []).append(key)
    for keys in by_text.values():
        if len(keys) > 1:
            shared = set.intersection(*(set(k) for k in keys))
            for key in keys:
                extra = ", ".join(o for o in first[key].overrides if o in key and o not in shared)
                c = out[key]
                told = f"{c.other}, {extra}" if c.other else extra
                out[key] = Configuration(
                    key, c.group, c.visual, c.text, told, c.pooling, c.set_sizes
                )
    return out
