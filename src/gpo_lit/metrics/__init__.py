"""Retrieval evaluation: exact ranks from similarity shards, R@K / MdR / MnR / rsum, protocols.

Pure functions of embeddings and the caption→image map (no Lightning inside); REFERENCE §6.
"""

from gpo_lit.metrics.embeddings_io import load_embeddings, save_embeddings
from gpo_lit.metrics.protocols import PROTOCOLS, Protocol, evaluate, folds, get_protocol
from gpo_lit.metrics.ranks import (
    TIES,
    PreparedEmbeddings,
    check_ties,
    prepare_embeddings,
    retrieval_ranks,
)
from gpo_lit.metrics.retrieval import recall_metrics

__all__ = [
    "PROTOCOLS",
    "PreparedEmbeddings",
    "Protocol",
    "TIES",
    "check_ties",
    "evaluate",
    "folds",
    "get_protocol",
    "load_embeddings",
    "prepare_embeddings",
    "recall_metrics",
    "retrieval_ranks",
    "save_embeddings",
]
