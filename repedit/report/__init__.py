"""Report: plotly figures and self-contained HTML pages — the only modules that import plotly.

Probe reports (:func:`write_report`), evaluation reports (:func:`write_eval_report`), fluency and
marker figures, and PCA views of captured activations.
"""

from .eval_report import conditions_table, eval_sections, format_conditions_table, write_eval_report
from .fluency_plots import fluency_figure, marker_figure
from .plots import pca_2d, pca_by_layer
from .probe_plots import (
    accuracy_by_layer,
    direction_similarity_across_layers,
    direction_similarity_across_users,
    pairs_by_user,
    pairs_scatter,
    probe_similarity,
)
from .probe_report import write_report

__all__ = [
    "accuracy_by_layer", "conditions_table", "direction_similarity_across_layers", "direction_similarity_across_users", "eval_sections",
    "fluency_figure", "format_conditions_table", "marker_figure", "pairs_by_user", "pairs_scatter", "pca_2d", "pca_by_layer",
    "probe_similarity", "write_eval_report", "write_report",
]
