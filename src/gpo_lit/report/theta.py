"""GPO's learned weights θ against rank k (the paper's Fig. 5): read from a sweep's best
checkpoints and averaged over seeds (``gpo_theta.png``), and the one θ figure, which the W&B
callback (:class:`gpo_lit.callbacks.PoolingWeightsPlot`) draws too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gpo_lit.errors import GpoLitError, UnsafeCheckpointError, first_line
from gpo_lit.modalities import DEFAULT_THETA_SIZE, MODALITIES, pool_attr, pooling_for
from gpo_lit.report.aggregate import Row
from gpo_lit.report.configs import Configuration, is_gpo, set_size
from gpo_lit.report.jobs import best_checkpoint


@dataclass
class ThetaCurve:
    """One line of the θ figure: θ of one modality's GPO at set size ``N = len(mean)``."""

    modality: str
    mean: np.ndarray  # [N], averaged over seeds
    std: np.ndarray | None = None  # [N] sample std over seeds; None (or NaN) with one
    n: int = 1  # seeds averaged
    config: Configuration | None = None  # the sweep configuration; None: one model (W&B)

    @property
    def size(self) -> int:
        return len(self.mean)


def load_gpo_weights(path: str | Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """θ at ``sizes[modality]`` of every GPO-type pooling of a gpo_lit checkpoint, per modality.

    Rebuilds only the two pooling heads from the checkpoint's ``hyper_parameters`` and
    ``state_dict`` (exactly as :class:`gpo_lit.model.VSEModel` builds them), so no encoder (BERT,
    a timm backbone) is constructed; read by :func:`gpo_lit.checkpoint_io.read_checkpoint`.
    Per-dimension θ (``gpo_perdim``, ``[n, D]``) is averaged over the dimensions.
    """
    import torch

    import gpo_lit.pooling.sequence  # noqa: F401 - registers the poolers by name
    import gpo_lit.pooling.zoo  # noqa: F401
    from gpo_lit.checkpoint_io import read_checkpoint
    from gpo_lit.pooling import create_pooling

    path = Path(path)
    ckpt = read_checkpoint(path, mmap=True)  # UnsafeCheckpointError for a hostile config
    try:
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        out = {}
        for modality in MODALITIES:
            pool = create_pooling(dim=hp["embed_dim"], **pooling_for(hp, modality))
            weights_for_length = getattr(pool, "weights_for_length", None)  # GPO-like poolings
            if weights_for_length is None:
                continue
            prefix = f"{pool_attr(modality)}."
            pool.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
            pool.eval()
            with torch.no_grad():
                theta = weights_for_length(int(sizes[modality])).float()
            out[modality] = (theta.mean(-1) if theta.dim() > 1 else theta).numpy().copy()
        return out
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise GpoLitError(
            f"{path}: expected a gpo_lit checkpoint whose pooling heads its hyper_parameters "
            f"rebuild, found {first_line(err)}"
        ) from None


def theta_curves(
    rows: Sequence[Row], theta_sizes: dict[str, int | None] | None = None
) -> tuple[list[ThetaCurve], list[str]]:
    """θ per modality of every configuration with a GPO-type pooling, from the best checkpoint of
    each finished job, averaged over seeds; and notes on the jobs that gave none."""
    theta_sizes = theta_sizes or {}
    curves, notes = [], []
    for r in rows:
        gpo_mods = [m for m in MODALITIES if is_gpo(r.config.node(m))]
        if not gpo_mods:
            continue
        per_mod: dict[str, list[np.ndarray]] = {m: [] for m in gpo_mods}
        first = r.jobs[0]
        sizes = {
            m: set_size(first.config, m, theta_sizes.get(m), DEFAULT_THETA_SIZE) for m in MODALITIES
        }
        for job in r.jobs:
            if not job.finished:
                continue
            ckpt = best_checkpoint(job)
            if ckpt is None:
                notes.append(f"`{job.name}`: no checkpoints/best*.ckpt, left out of the θ plot")
                continue
            try:
                weights = load_gpo_weights(ckpt, sizes)
            except UnsafeCheckpointError:
                raise  # never a note: someone else's code was put in the sweep
            except GpoLitError as err:
                notes.append(f"θ plot: {err}")
                continue
            for m in gpo_mods:
                if m in weights:
                    per_mod[m].append(weights[m])
        for m, thetas in per_mod.items():
            if thetas:
                stack = np.stack(thetas)
                std = stack.std(0, ddof=1) if len(thetas) > 1 else np.full(stack.shape[1], np.nan)
                curves.append(ThetaCurve(m, stack.mean(0), std, len(thetas), r.config))
    return curves, notes


def _label(curve: ThetaCurve, several_groups: bool, several_sizes: bool) -> str | None:
    """The legend entry of a curve: its configuration, seeds and (when they differ) set size."""
    if curve.config is None:
        return None  # one model: the panel title says it all
    c = curve.config
    label = f"{c.group}: {c.label}" if several_groups else c.label
    return label + f" (n={curve.n}" + (f", N={curve.size})" if several_sizes else ")")


def plot_theta(curves: Sequence[ThetaCurve]) -> Figure | None:
    """θ_k against rank k (1 = largest value), one panel per modality, one line per curve
    (band: ± std over seeds) — the paper's Fig. 5. None without curves."""
    if not curves:
        return None
    mods = [m for m in MODALITIES if any(c.modality == m for c in curves)]
    fig = Figure(figsize=(6.0 * len(mods), 4.2), layout="constrained")
    axes = fig.subplots(1, len(mods), squeeze=False)[0]
    several_groups = len({c.config.group for c in curves if c.config is not None}) > 1
    for ax, m in zip(axes, mods, strict=True):
        cs = [c for c in curves if c.modality == m]
        sizes = {c.size for c in cs}
        labelled = False
        for c in cs:
            k = np.arange(1, c.size + 1)
            label = _label(c, several_groups, len(sizes) > 1)
            labelled |= label is not None
            (line,) = ax.plot(k, c.mean, marker="o", markersize=3, label=label)
            if c.n > 1 and c.std is not None:
                low = np.clip(c.mean - c.std, 0.0, None)  # θ >= 0
                ax.fill_between(k, low, c.mean + c.std, color=line.get_color(), alpha=0.2)
        size = f" (N = {next(iter(sizes))})" if len(sizes) == 1 else ""
        ax.set_title(f"{m} GPO weights{size}")
        ax.set_xlabel("rank k (1 = largest)")
        ax.set_ylabel("θ_k")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize=7)
    return fig
