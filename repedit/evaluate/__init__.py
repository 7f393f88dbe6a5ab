"""Evaluate: score steered models on held-out items, choose layers and strengths, measure style and fluency.

Scoring (log-likelihood, KL), selection (:class:`Selection`, by likelihood or by the fluency of
generated answers), the five-condition evaluation (:func:`evaluate_users`) and the independent
measures (style attribution, lexical markers, :class:`FluencyRule`). No plotting: figures are in
:mod:`repedit.report`.
"""

from .conditions import CONDITIONS, EDITED_CONDITIONS, EVAL_SETTINGS, MeasureRequest, ModelMeasures, generate_with_edits, model_measures
from .evaluation import EvalInputs, Evaluation, eval_inputs, evaluate_users
from .fitting import FitOptions, FitOutcome, NeutralSets, fit_users, neutral_sets
from .measures import (
    MARKERS,
    FluencyRule,
    FluencyVerdict,
    StyleAttributor,
    choose_marker,
    distinct_n,
    fluency_measures,
    lexical_markers,
    marker_means,
    marker_movement,
    nonword_rate,
    rank_markers,
    repeated_ngram_rate,
    shuffled_label_accuracy,
)
from .scoring import reference_logprobs, response_kl, response_logprobs
from .select import DEFAULT_MAX_KL, HeldOut, Selection, select_layer_strength, split_for_selection, validation_items
from .strength import select_strength_by_generation

__all__ = [
    "CONDITIONS", "DEFAULT_MAX_KL", "EDITED_CONDITIONS", "EVAL_SETTINGS", "MARKERS", "EvalInputs", "Evaluation", "FitOptions", "FitOutcome",
    "FluencyRule", "MeasureRequest", "ModelMeasures", "NeutralSets", "fit_users", "model_measures", "neutral_sets",
    "FluencyVerdict", "HeldOut", "Selection", "StyleAttributor", "choose_marker", "distinct_n", "eval_inputs", "evaluate_users",
    "fluency_measures", "generate_with_edits", "lexical_markers", "marker_means", "marker_movement", "nonword_rate", "rank_markers",
    "reference_logprobs", "repeated_ngram_rate", "response_kl", "response_logprobs", "select_layer_strength",
    "select_strength_by_generation", "shuffled_label_accuracy", "split_for_selection", "validation_items",
]
