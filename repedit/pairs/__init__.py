"""Pairs ("fake it"): users and their histories, the model's self-generated preference pairs, LaMP I/O.

A :class:`Pair` is (prompt, personalised response, neutral response) for one user; ``source`` says
whether the personalised side is the user's own text (``real-history``) or the model's
(``self-generated``).
"""

from .builtin import style_texts
from .lamp import LABELS, TASKS, LampData, LampItem, lamp_metrics, read_lamp, score_files, write_lamp
from .synthesis import DEFAULT_SETTINGS, REAL_HISTORY, SELF_GENERATED, Pair, PairTemplates, generate, read_pairs, select_representative
from .users import HistoryItem, User, demo_prompts, demo_prompts_path, demo_users, demo_users_path, read_prompts, read_users, split_history

__all__ = [
    "DEFAULT_SETTINGS", "LABELS", "REAL_HISTORY", "SELF_GENERATED", "TASKS", "HistoryItem", "LampData", "LampItem", "Pair",
    "PairTemplates", "User", "demo_prompts", "demo_prompts_path", "demo_users", "demo_users_path", "generate", "lamp_metrics",
    "read_lamp", "read_pairs", "read_prompts", "read_users", "score_files", "select_representative", "split_history", "style_texts",
    "write_lamp",
]
