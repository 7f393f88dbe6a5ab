"""The Ray actor: one model per process, and the units of work of the per-user jobs.

Each method is one unit of a job in :mod:`repedit.scale.jobs` and calls the same function the
single-process command runs (:func:`repedit.pairs.synthesis.user_block_pairs`,
:func:`repedit.evaluate.fitting.fit_users`, :func:`repedit.evaluate.evaluation.model_measures`), so a
unit's result does not depend on where it ran.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence


class ModelWorker:
    """Loads ``model`` once (:func:`repedit.model.loading.load_model`) and runs units of work on it."""

    def __init__(self, model: str, *, dtype: str | None = None, device: str = "cpu", threads: int = 1) -> None:
        import torch

        from ..model.loading import load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_model(model, dtype=dtype, device=device)

    def pid(self) -> int:
        return os.getpid()

    def model_facts(self):
        from ..pairs.synthesis import ModelFacts

        return ModelFacts.of(self.model)

    def neutral(self, job, prompts: Sequence[str]) -> dict[str, dict[str, Any]]:
        from ..pairs.synthesis import neutral_answers

        return neutral_answers(self.model, self.tokenizer, job, prompts)

    def pairs_block(self, job, block, neutral, done, selected, insights):
        from ..pairs.synthesis import user_block_pairs

        return user_block_pairs(self.model, self.tokenizer, job, block, neutral, done=done, selected=selected, insights=insights)

    def fit(self, pairs, options, neutral):
        from ..evaluate.fitting import fit_users

        return fit_users(self.model, self.tokenizer, pairs, options, neutral=neutral, progress=False)

    def measures(self, request):
        from ..evaluate.conditions import model_measures

        return model_measures(self.model, self.tokenizer, request)


@functools.cache
def remote_worker():
    """:class:`ModelWorker` as a Ray actor class (made on first use: Ray is an optional dependency)."""
    import ray

    return ray.remote(ModelWorker)
