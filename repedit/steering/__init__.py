"""Align it: per-user edits of hidden states at inference, one user or many users per batch.

Edits (:class:`UserEdit` of :class:`SiteEdit`), their operators, the :func:`steer` handle (also a
context manager; per-row tables, row 0 = no edit), the fused GPU wiring, and fitting: mean
differences (:func:`fit_user_edits`) and trained edits (:func:`train_user_edits`).
"""

from .apply import SteeringHandle, steer
from .edit import INDEX_CONVENTION, SiteEdit, UserEdit, ablation, check_model
from .fit import FIT_METHODS, default_layers, fit_user_edits
from .fused import FusedSteeringHandle, fused_steering, value_edit_as_attn_out
from .operators import OPERATORS, RowParams, apply_operator
from .train import TRAIN_KINDS, TrainResult, TrainSettings, train_user_edits

__all__ = [
    "FIT_METHODS", "INDEX_CONVENTION", "OPERATORS", "TRAIN_KINDS", "FusedSteeringHandle", "RowParams", "SiteEdit", "SteeringHandle",
    "TrainResult", "TrainSettings", "UserEdit", "ablation", "apply_operator", "check_model", "default_layers", "fit_user_edits",
    "fused_steering", "steer", "train_user_edits", "value_edit_as_attn_out",
]
