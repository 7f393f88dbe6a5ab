"""The model-bound half of the evaluation: every condition's prompts, held-out likelihoods, answers,
perplexities and KL — per held-out item, for any subset of the users.

Nothing here compares users with each other, so the users can be split into groups, each measured
on its own worker (``repedit eval --ray``), and the groups' :class:`ModelMeasures` merged:
:func:`repedit.evaluate.evaluation.evaluate_users` then computes the cross-user measures (style
attribution, markers, margins, summary) once, from the merged numbers.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..io import InputError
from ..model.generation import Generated, GenerationSettings, generate_batch, render_chat
from ..model.inputs import chunks
from ..pairs.synthesis import PairTemplates
from ..steering.apply import steer
from ..steering.edit import UserEdit
from .scoring import reference_logprobs, response_kl, response_logprobs
from .select import HeldOut

CONDITIONS: tuple[str, ...] = ("unsteered", "prompt_only", "few_shot", "steered", "prompt_steered")
EDITED_CONDITIONS: tuple[str, ...] = ("steered", "prompt_steered")
DEFAULT_FACTORS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
# Short answers: held-out history texts are a few sentences; 64 tokens keeps three conditions affordable on a CPU.
EVAL_SETTINGS = GenerationSettings(max_new_tokens=64, repetition_penalty=1.2, batch_size=16)


def generate_with_edits(
    model, tokenizer, conversations: Sequence[list[dict[str, str]]], edits: Sequence[UserEdit | None],
    rows: Sequence[int | None], settings: GenerationSettings = EVAL_SETTINGS, *, progress: bool = False, desc: str = "generate",
) -> list[Generated]:
    """Generate one answer per conversation, row ``i`` steered by ``edits[rows[i]]`` (``None``: unsteered).

    Batches of ``settings.batch_size`` mix users; each row gets its own edit (:func:`steer`).
    """
    if len(rows) != len(conversations):
        raise InputError(f"rows has {len(rows)} entries for {len(conversations)} conversations")
    results: list[Generated] = []
    for start, batch in tqdm(list(chunks(list(conversations), settings.batch_size)), desc=desc, unit="batch", disable=not progress):
        batch_rows = list(rows[start:start + len(batch)])
        steered = any(r is not None and edits[r] is not None for r in batch_rows)
        context = steer(model, edits, batch_rows) if steered else contextlib.nullcontext()
        with context:
            results.extend(generate_batch(model, tokenizer, batch, settings, seed_offset=start))
    return results


def _perplexities(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int) -> list[float]:
    """Perplexity of each answer under the unsteered model (NaN for an empty answer)."""
    scored = [i for i, a in enumerate(answers) if a.strip()]
    out = [float("nan")] * len(answers)
    if scored:
        logprobs = response_logprobs(model, tokenizer, [prompts[i] for i in scored], [answers[i] for i in scored], batch_size=batch_size)
        for i, lp in zip(scored, logprobs.tolist()):
            out[i] = math.exp(-lp)
    return out


def _conversations(test_items: Sequence[HeldOut], insights: dict[str, str], examples: dict[str, Sequence[tuple[str, str]]],
                   templates: PairTemplates) -> dict[str, list[list[dict[str, str]]]]:
    """The prompt of every held-out item under each condition (edited conditions share their prompt's)."""
    plain = [[{"role": "user", "content": item.prompt}] for item in test_items]
    personal = [[{"role": "system", "content": templates.personalized_system.format(insights=insights[item.user_id])},
                 {"role": "user", "content": item.prompt}] for item in test_items]
    shots = [[turn for prompt, text in examples.get(item.user_id, ()) for turn in
              ({"role": "user", "content": prompt}, {"role": "assistant", "content": text})] + [{"role": "user", "content": item.prompt}]
             for item in test_items]
    return {"unsteered": plain, "prompt_only": personal, "few_shot": shots, "steered": plain, "prompt_steered": personal}


def fluency_controls(test_items: Sequence[HeldOut], unsteered_answers: Sequence[str]) -> tuple[list[str], list[str]]:
    """Two constructed controls per held-out item that a fluency rule must reject: a loop (the
    unsteered answer's first six words, six times) and gibberish (seeded random letter strings)."""
    rng = random.Random(0)
    loops = [(" ".join(a.split()[:6]) + " ") * 6 for a in unsteered_answers]
    gibberish = [" ".join("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 9))) for _ in range(20))
                 for _ in unsteered_answers]
    return loops, gibberish


@dataclass(frozen=True)
class MeasureRequest:
    """What :func:`model_measures` needs: the held-out items of some users and everything the
    conditions and measures of those items depend on (arguments of :func:`evaluate_users`)."""

    test_items: list[HeldOut]
    edits: dict[str, UserEdit]
    insights: dict[str, str]
    examples: dict[str, list[tuple[str, str]]]
    neutral: list[tuple[str, str]]
    factors: tuple[float, ...] = DEFAULT_FACTORS
    settings: GenerationSettings = EVAL_SETTINGS
    templates: PairTemplates = PairTemplates()


@dataclass
class ModelMeasures:
    """Per held-out item (in the request's order) and condition: ``loglik`` (nats/token of the user's
    real text), ``answers``, ``perplexity`` of the answers under the unsteered model and
    ``context_tokens``; ``seconds`` of each condition's generation (all its items); ``kl[user]`` of
    the edited conditions; ``curve[factor]`` = (steered loglik per item, KL per user) with each edit
    × factor; ``control_perplexity`` of the constructed loop and gibberish controls per item."""

    users: list[str]
    loglik: dict[str, list[float]]
    answers: dict[str, list[str]]
    perplexity: dict[str, list[float]]
    context_tokens: dict[str, list[int]]
    seconds: dict[str, float]
    kl: dict[str, float]
    curve: dict[float, tuple[list[float], dict[str, float]]]
    control_perplexity: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Sequence["ModelMeasures"], order: Sequence[int]) -> "ModelMeasures":
        """Measures of disjoint groups of items as one; ``order[j]`` is the position (in the merged
        item list) of the ``j``-th item of the concatenated parts."""
        def place(lists: list[list[Any]]) -> list[Any]:
            flat = [v for values in lists for v in values]
            out: list[Any] = [None] * len(flat)
            for j, position in enumerate(order):
                out[position] = flat[j]
            return out

        conditions = list(parts[0].loglik)
        users = [u for part in parts for u in part.users]
        return cls(
            users,
            {c: place([p.loglik[c] for p in parts]) for c in conditions},
            {c: place([p.answers[c] for p in parts]) for c in conditions},
            {c: place([p.perplexity[c] for p in parts]) for c in conditions},
            {c: place([p.context_tokens[c] for p in parts]) for c in conditions},
            {c: sum(p.seconds[c] for p in parts) for c in conditions},
            {u: k for p in parts for u, k in p.kl.items()},
            {f: (place([p.curve[f][0] for p in parts]), {u: k for p in parts for u, k in p.curve[f][1].items()}) for f in parts[0].curve},
            {name: place([p.control_perplexity[name] for p in parts]) for name in parts[0].control_perplexity},
        )


def model_measures(model, tokenizer, request: MeasureRequest, *, progress: bool = False) -> ModelMeasures:
    """Everything :func:`evaluate_users` needs the model for, for the users of ``request.test_items``."""
    test_items, edits, neutral, settings = request.test_items, request.edits, request.neutral, request.settings
    users = list(dict.fromkeys(item.user_id for item in test_items))
    if not neutral:
        raise InputError("the KL of the steered condition needs neutral (prompt, response) pairs")
    batch = settings.batch_size
    edit_list = [edits.get(u) for u in users]
    user_index = {u: i for i, u in enumerate(users)}
    rows = [user_index[item.user_id] for item in test_items]
    texts = [item.text for item in test_items]
    conversations = _conversations(test_items, request.insights, request.examples, request.templates)
    edited = {c: c in EDITED_CONDITIONS for c in CONDITIONS}
    stages = tqdm(total=len(CONDITIONS) * 2 + 3, desc="evaluate", unit="stage", disable=not progress)

    loglik: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for condition in CONDITIONS:  # (a) held-out log-likelihood of the users' real texts
        loglik[condition] = response_logprobs(model, tokenizer, conversations[condition], texts, batch_size=batch,
                                              **({"edits": edit_list, "rows": rows} if edited[condition] else {})).tolist()
        stages.update()
    for condition in CONDITIONS:  # (b) generated answers, timed
        started = time.perf_counter()
        generated = generate_with_edits(model, tokenizer, conversations[condition], edit_list if edited[condition] else [None],
                                        rows if edited[condition] else [None] * len(rows), settings)
        seconds[condition] = time.perf_counter() - started
        answers[condition] = [g.text for g in generated]
        stages.update()
    context = {c: [len(render_chat(tokenizer, conv)) for conv in conversations[c]] for c in CONDITIONS}
    plain_prompts = [item.prompt for item in test_items]
    perplexity = {c: _perplexities(model, tokenizer, plain_prompts, answers[c], batch) for c in CONDITIONS}
    loops, gibberish = fluency_controls(test_items, answers["unsteered"])
    controls = {"loop": _perplexities(model, tokenizer, plain_prompts, loops, batch),
                "gibberish": _perplexities(model, tokenizer, plain_prompts, gibberish, batch)}
    stages.update()
    reference = reference_logprobs(model, tokenizer, [p for p, _ in neutral], [r for _, r in neutral], batch_size=batch)

    def kl_per_user(scaled: list[UserEdit | None]) -> dict[str, float]:
        steered_users = [i for i, e in enumerate(scaled) if e is not None]
        result = {u: 0.0 for u in users}
        if not steered_users:
            return result
        kl = response_kl(
            model, tokenizer, [p for _ in steered_users for p, _ in neutral], [r for _ in steered_users for _, r in neutral],
            edits=scaled, rows=[i for i in steered_users for _ in neutral], batch_size=batch, reference=reference * len(steered_users),
        )
        for k, i in enumerate(steered_users):
            result[users[i]] = float(kl[k * len(neutral):(k + 1) * len(neutral)].mean())
        return result

    kl = kl_per_user(edit_list)
    stages.update()
    # Effect vs strength on the held-out data: each user's edit scaled by each factor, all users per batch.
    curve: dict[float, tuple[list[float], dict[str, float]]] = {}
    for factor in request.factors:
        if factor == 1.0:  # the evaluated edits themselves: already scored above
            curve[float(factor)] = (loglik["steered"], kl)
        else:
            scaled = [e * factor if e is not None else None for e in edit_list]
            steered_ll = response_logprobs(model, tokenizer, plain_prompts, texts, edits=scaled, rows=rows, batch_size=batch).tolist()
            curve[float(factor)] = (steered_ll, kl_per_user(scaled))
    stages.update()
    stages.close()
    return ModelMeasures(users, loglik, answers, perplexity, context, seconds, kl, curve, controls)
