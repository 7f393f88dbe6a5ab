"""Align it: per-user edits of hidden states at inference, one user or many users per batch."""

from .apply import SteeringHandle, steer
from .scoring import response_kl, response_logprobs
from .select import DEFAULT_MAX_KL, HeldOut, Selection, select_layer_strength
from .fit import FIT_METHODS, default_layers, fit_user_edits, save_edits
from .edit import INDEX_CONVENTION, SiteEdit, UserEdit, ablation, check_model
from .operators import OPERATORS, RowParams, apply_operator

__all__ = [
    "INDEX_CONVENTION", "OPERATORS", "RowParams", "SiteEdit", "SteeringHandle", "UserEdit", "ablation", "apply_operator",
    "check_model", "steer", "DEFAULT_MAX_KL", "HeldOut", "Selection", "response_kl", "response_logprobs",
    "select_layer_strength", "FIT_METHODS", "default_layers", "fit_user_edits", "save_edits",
]
