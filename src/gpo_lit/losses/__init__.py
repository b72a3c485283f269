"""Training losses behind one small interface (:mod:`gpo_lit.losses.base`), each a ``_target_``
node in ``conf/loss/``: the hinge triplet of VSE++ / VSE∞ (``loss=triplet``), InfoNCE
(``loss=infonce``, ``loss=infonce_clip``) and PCME++ (``loss=pcmepp``, ``loss=pcmepp_mu``)."""

from gpo_lit.losses.base import (
    LossOutput,
    PairEmbeddings,
    RetrievalLoss,
    StepInfo,
    check_loss_node,
    instantiate_loss,
    match_targets,
)
from gpo_lit.losses.infonce import InfoNCELoss
from gpo_lit.losses.pcmepp import PCMEppLoss
from gpo_lit.losses.triplet import TripletLoss

__all__ = [
    "InfoNCELoss",
    "LossOutput",
    "PCMEppLoss",
    "PairEmbeddings",
    "RetrievalLoss",
    "StepInfo",
    "TripletLoss",
    "check_loss_node",
    "instantiate_loss",
    "match_targets",
]
