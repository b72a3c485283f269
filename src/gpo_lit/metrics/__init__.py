"""Retrieval evaluation: exact ranks from similarity shards, R@K / MdR / MnR / rsum, protocols
(ECCV Caption / CxC through eccv-caption), top-K lists and per-query results.

Pure functions of embeddings and the caption→image map (no Lightning inside); REFERENCE §6, §11.
"""

from gpo_lit.metrics.embeddings_io import load_embeddings, save_embeddings
from gpo_lit.metrics.prepared import TIES, PreparedEmbeddings, check_ties, prepare_embeddings
from gpo_lit.metrics.protocols import (
    PROTOCOLS,
    Protocol,
    check_size,
    evaluate,
    evaluate_protocols,
    folds,
    get_protocol,
)
from gpo_lit.metrics.ranks import retrieval_ranks
from gpo_lit.metrics.retrieval import recall_metrics
from gpo_lit.metrics.table import format_table
from gpo_lit.metrics.topk import per_query_results, topk_lists

__all__ = [
    "PROTOCOLS",
    "PreparedEmbeddings",
    "Protocol",
    "TIES",
    "check_ties",
    "check_size",
    "evaluate",
    "evaluate_protocols",
    "folds",
    "format_table",
    "get_protocol",
    "load_embeddings",
    "per_query_results",
    "prepare_embeddings",
    "recall_metrics",
    "retrieval_ranks",
    "save_embeddings",
    "topk_lists",
]
