"""Strength selection by the generated answers: the fluency rule that lets style through.

A KL limit on neutral text (:func:`repedit.steering.select_layer_strength`) penalises exactly the
shift a strong style needs. Here a strength is admissible when the answers it *generates* are fluent
(:class:`repedit.evaluate.measures.FluencyRule`: no loops, no gibberish, perplexity under the
unsteered model not far beyond that of the user's own texts); among admissible strengths each user
gets the one whose validation log-likelihood gain is highest. KL on neutral text is still measured
and reported for every candidate.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..io import InputError
from ..model.generation import GenerationSettings
from ..model.sites import site_layer
from ..steering.edit import UserEdit
from .conditions import _perplexities, generate_with_edits
from .measures import FluencyRule, repeated_ngram_rate
from .scoring import reference_logprobs, response_kl, response_logprobs
from .select import HeldOut, Selection

DEFAULT_FACTORS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
SELECT_SETTINGS = GenerationSettings(max_new_tokens=48, repetition_penalty=1.2, batch_size=16)


def select_strength_by_generation(
    model, tokenizer, edits: dict[str, UserEdit], validation: Sequence[HeldOut], *,
    neutral: Sequence[tuple[str, str]] = (), factors: Sequence[float] = DEFAULT_FACTORS, rule: FluencyRule = FluencyRule(),
    settings: GenerationSettings = SELECT_SETTINGS, progress: bool = True,
) -> Selection:
    """Per user, the strength factor (× the edit) with the best validation gain among those whose
    generated answers pass ``rule``; users with no admissible factor stay unsteered.

    Args:
        validation: the users' validation items (prompt and their real text): the gain is the mean
            log-likelihood of the texts (nats/token) steered minus unsteered; the answers to these
            prompts are the ones the rule judges, against the perplexity of the user's own texts.
        neutral: neutral (prompt, response) pairs: KL on them is measured and reported (not a limit);
            their prompts are also answered and judged, so that an edit must stay fluent off-topic too.

    Returns:
        a :class:`Selection` whose ``choices[user]`` has ``strength`` (the factor), ``gain``, ``kl``,
        ``fluent`` and ``reasons``; ``grid`` has every (user, factor) row.
    """
    users = [u for u in edits if any(h.user_id == u for h in validation)]
    if not users:
        raise InputError("no validation items for any of the edited users")
    items = [h for h in validation if h.user_id in edits]
    index = {u: i for i, u in enumerate(users)}
    rows = [index[h.user_id] for h in items]
    prompts, texts = [h.prompt for h in items], [h.text for h in items]
    base = response_logprobs(model, tokenizer, prompts, texts, batch_size=settings.batch_size)
    # The median per-text perplexity of the user's own texts: the rule's reference (see FluencyRule).
    own_perplexity = {u: statistics.median(math.exp(-float(base[j])) for j, r in enumerate(rows) if r == i) for u, i in index.items()}
    neutral_prompts = list(dict.fromkeys(p for p, _ in neutral))[:2]
    judged = [(r, p) for r, p in zip(rows, prompts)] + [(i, p) for i in range(len(users)) for p in neutral_prompts]
    reference = reference_logprobs(model, tokenizer, [p for p, _ in neutral], [r for _, r in neutral], batch_size=settings.batch_size) if neutral else None
    grid: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    best_edit: dict[str, UserEdit] = {}
    for factor in tqdm(list(factors), desc="select strength", unit="factor", disable=not progress):
        scaled = [edits[u] * factor for u in users]
        steered = response_logprobs(model, tokenizer, prompts, texts, edits=scaled, rows=rows, batch_size=settings.batch_size)
        answers = [g.text for g in generate_with_edits(model, tokenizer, [[{"role": "user", "content": p}] for _, p in judged],
                                                       scaled, [r for r, _ in judged], settings)]
        perplexity = _perplexities(model, tokenizer, [p for _, p in judged], answers, settings.batch_size)
        if reference is not None:
            kl = response_kl(model, tokenizer, [p for _ in users for p, _ in neutral], [r for _ in users for _, r in neutral],
                             edits=scaled, rows=[i for i in range(len(users)) for _ in neutral], batch_size=settings.batch_size,
                             reference=reference * len(users))
        for user, i in index.items():
            mine = [j for j, r in enumerate(rows) if r == i]
            judged_rows = [j for j, (r, _) in enumerate(judged) if r == i]
            verdict = rule.check([answers[j] for j in judged_rows], [perplexity[j] for j in judged_rows], own_perplexity[user])
            row = {"user_id": user, "layer": ",".join(e.site for e in edits[user].edits), "strength": float(factor), "gain": float((steered[mine] - base[mine]).mean()),
                   "kl": float(kl[i * len(neutral):(i + 1) * len(neutral)].mean()) if reference is not None else float("nan"),
                   "fluent": bool(verdict.admissible), "reasons": list(verdict.reasons),
                   "repeated_3gram_max": max(repeated_ngram_rate(answers[j], 3) for j in judged_rows),
                   "sample": answers[judged_rows[0]]}
            grid.append(row)
            current = best.get(user)
            if row["fluent"] and row["gain"] > 0 and (current is None or row["gain"] > current["gain"]):
                best[user] = {k: row[k] for k in ("strength", "gain", "kl", "fluent", "reasons")}
                best_edit[user] = scaled[i]
    choices = {u: best.get(u, {"strength": 0.0, "gain": 0.0, "kl": 0.0, "fluent": True, "reasons": ["no admissible strength helped"]}) for u in users}
    for user, choice in choices.items():
        sites = edits[user].sites
        choice["layer"] = site_layer(sites[0]) if user in best_edit and len(sites) == 1 else None
        choice["sites"] = sites if user in best_edit else []
    return Selection(choices, best_edit, grid, max_kl=None, rule="fluency")
