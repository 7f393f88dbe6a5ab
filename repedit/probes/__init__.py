"""Probes: locate personalised vs non-personalised directions, layer by layer.

Methods (diff of means, PCA of differences, logistic regression, CCS, SVD subspace), grouped
cross-validation per site (:func:`probe_sites`), explanations (logit lens, top texts) and the
typed results (:class:`ProbeReport`, saved as safetensors + JSON). No plotting: figures and the
HTML report are in :mod:`repedit.report`.
"""

from .data import PairData, capture_pairs
from .explain import logit_lens, top_texts
from .methods import (
    METHODS,
    CCSMethod,
    DiffOfMeansMethod,
    LogisticRegressionMethod,
    PCAOfDifferencesMethod,
    ProbeMethod,
    SVDSubspaceMethod,
    ccs,
    diff_of_means,
    get_method,
    logistic_regression,
    pair_index,
    pca_of_differences,
    svd_subspace,
)
from .types import POOLED, Direction, Probe, ProbeReport, ProbeRow, Subspace, load_probes, save_probes
from .validation import DEFAULT_METHODS, TIE_TOLERANCE, check_same_model, combine_activations, evaluate_site, group_kfold, probe_sites, select_sites

__all__ = [
    "CCSMethod", "DEFAULT_METHODS", "DiffOfMeansMethod", "Direction", "LogisticRegressionMethod", "METHODS",
    "PCAOfDifferencesMethod", "POOLED", "PairData", "Probe", "ProbeMethod", "ProbeReport", "ProbeRow", "SVDSubspaceMethod",
    "Subspace", "TIE_TOLERANCE", "capture_pairs", "ccs", "check_same_model", "combine_activations", "diff_of_means",
    "evaluate_site", "get_method", "group_kfold", "load_probes", "logistic_regression", "pair_index", "pca_of_differences",
    "probe_sites", "save_probes", "select_sites", "svd_subspace", "logit_lens", "top_texts",
]
