"""Lightning callbacks, one concern a module: the files an evaluation writes
(:mod:`~gpo_lit.callbacks.outputs`), example retrievals (:mod:`~gpo_lit.callbacks.examples`) and
figures (:mod:`~gpo_lit.callbacks.figures`), what only W&B shows
(:mod:`~gpo_lit.callbacks.wandb_media`), backbone freezing and loss warm-up
(:mod:`~gpo_lit.callbacks.backbone`). Configs name them as ``gpo_lit.callbacks.<Class>``."""

from gpo_lit.callbacks.backbone import BackboneSchedule
from gpo_lit.callbacks.examples import HIT, Example, query_examples, retrieval_examples
from gpo_lit.callbacks.figures import retrieval_figure, split_figure
from gpo_lit.callbacks.outputs import (
    RetrievalFigure,
    SaveRanks,
    WriteEvaluation,
    output_callbacks,
)
from gpo_lit.callbacks.swa import WeightAveraging
from gpo_lit.callbacks.wandb_media import PoolingWeightsPlot, RetrievalExamples

__all__ = [
    "BackboneSchedule",
    "HIT",
    "Example",
    "PoolingWeightsPlot",
    "RetrievalExamples",
    "RetrievalFigure",
    "SaveRanks",
    "WeightAveraging",
    "WriteEvaluation",
    "output_callbacks",
    "query_examples",
    "retrieval_examples",
    "retrieval_figure",
    "split_figure",
]
