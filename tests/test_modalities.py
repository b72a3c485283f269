"""The one rule for which pooling each modality uses, and the one θ figure (report and W&B)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from gpo_lit.modalities import MODALITIES, pool_attr, pooling_for
from gpo_lit.report import ThetaCurve, plot_theta
from gpo_lit.report.configs import pooling_node


def test_a_modality_override_wins_over_the_shared_pooling() -> None:
    shared, kmax = {"name": "max"}, {"name": "kmax", "k": 2}
    model = {"pooling": shared, "visual_pooling": kmax, "text_pooling": None}
    assert pooling_for(model, "visual") == kmax
    assert pooling_for(model, "text") == shared
    # the report reads a job's config by the same rule
    cfg = OmegaConf.create({"model": model})
    assert [pooling_node(cfg, m) for m in MODALITIES] == [kmax, shared]


def test_the_model_builds_the_pooling_the_rule_names() -> None:
    from helpers import tiny_model

    model = tiny_model("model/pooling=max", "+model/pooling@model.visual_pooling=kmax")
    kinds = {m: type(getattr(model, pool_attr(m))).__name__ for m in MODALITIES}
    assert kinds == {"visual": "KMaxPooling", "text": "MaxPooling"}
    assert pooling_for(model.hparams, "visual")["name"] == "kmax"


def test_the_theta_figure_of_one_model_has_a_panel_per_modality() -> None:
    """The W&B callback's figure: one unlabelled line per modality, the set size in the title."""
    theta = {"visual": np.full(5, 0.2), "text": np.array([0.5, 0.3, 0.2])}
    fig = plot_theta([ThetaCurve(m, t) for m, t in theta.items()])
    assert [ax.get_title() for ax in fig.axes] == [
        "visual GPO weights (N = 5)",
        "text GPO weights (N = 3)",
    ]
    for ax, t in zip(fig.axes, theta.values(), strict=True):
        (line,) = ax.get_lines()
        assert line.get_ydata() == pytest.approx(t)
        assert ax.get_legend() is None  # one model: nothing to tell apart
