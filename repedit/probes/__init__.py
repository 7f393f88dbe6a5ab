"""Probes: locate personalised vs non-personalised directions, layer by layer."""

from .data import PairData, capture_pairs
from .evaluate import (
    DEFAULT_METHODS, TIE_TOLERANCE, check_same_model, combine_activations, evaluate_site, group_kfold, probe_sites,
    select_sites,
)
from .methods import (
    METHODS, CCSMethod, DiffOfMeansMethod, LogisticRegressionMethod, PCAOfDifferencesMethod, ProbeMethod, SVDSubspaceMethod,
    ccs, diff_of_means, get_method, logistic_regression, pair_index, pca_of_differences, svd_subspace,
)
from .explain import logit_lens, top_texts
from .plots import (
    accuracy_by_layer, direction_similarity_across_layers, direction_similarity_across_users, pairs_scatter, probe_similarity,
)
from .report import write_report
from .types import POOLED, Direction, Probe, ProbeReport, ProbeRow, Subspace, load_probes, save_probes

__all__ = [
    "CCSMethod", "DEFAULT_METHODS", "DiffOfMeansMethod", "Direction", "LogisticRegressionMethod", "METHODS",
    "PCAOfDifferencesMethod", "POOLED", "PairData", "Probe", "ProbeMethod", "ProbeReport", "ProbeRow", "SVDSubspaceMethod",
    "Subspace", "TIE_TOLERANCE", "capture_pairs", "ccs", "check_same_model", "combine_activations", "diff_of_means",
    "evaluate_site", "get_method", "group_kfold", "load_probes", "logistic_regression", "pair_index", "pca_of_differences",
    "probe_sites", "save_probes", "select_sites", "svd_subspace", "accuracy_by_layer", "direction_similarity_across_layers",
    "direction_similarity_across_users", "logit_lens", "pairs_scatter", "probe_similarity", "top_texts", "write_report",
]
