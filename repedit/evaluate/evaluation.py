"""Did personalisation improve? Held-out evaluation of five conditions against honest baselines.

For each user, on history items that were **not** used to make pairs, fit or select edits
(:func:`repedit.pairs.users.split_history`), five conditions answer the same held-out prompts:

* ``unsteered`` — the plain prompt;
* ``prompt_only`` — the user's *insights* (the style summary made by ``repedit pairs``) placed in a
  system message (:attr:`repedit.pairs.synthesis.PairTemplates.personalized_system`), no edit;
* ``few_shot`` — the user's own training history items (prompt → their text) as earlier turns of
  the conversation, no edit: the in-context baseline;
* ``steered`` — the plain prompt with the user's edit (users without an edit are unsteered here);
* ``prompt_steered`` — the insights prompt *and* the edit.

Metrics, per user and condition:

* ``loglik`` — mean log-probability (nats/token) of the user's real held-out texts given their
  prompts (teacher-forced; higher = the model finds this user's way of writing more likely);
* ``attribution`` — share of the generated answers that an independent classifier, trained on the
  users' real *training* texts (character n-gram TF-IDF + logistic regression,
  :class:`repedit.evaluate.measures.StyleAttributor`), attributes to this user; ``summary`` holds the
  accuracy over all answers per condition, chance, the users' real held-out texts (ceiling) and a
  shuffled-label control;
* ``marker`` — the user's lexical style marker (emoji rate, sentence length, …), chosen per user
  *before* any steered answer is seen, from the users' training texts and the unsteered answers
  (:func:`repedit.evaluate.measures.choose_marker`); ``marker_value`` is its mean over the answers and
  ``marker_movement`` how far the condition moved it from the unsteered answers toward the user's
  real texts (0 = not at all, 1 = all the way);
* ``style_similarity`` / ``style_margin`` — cosine of each answer to the centroid of the user's
  training history in an embedding space (:mod:`repedit.capture.embedding`), and that minus the mean cosine to
  the other users' centroids;
* ``perplexity`` — of the generated answers under the unsteered model given the plain prompt;
  ``repeated_3gram_max`` — the largest repeated-3-gram rate of the user's answers (loops);
  ``fluent`` — 1 when the answers pass the :class:`repedit.evaluate.measures.FluencyRule` (no loops or
  gibberish; perplexity not far beyond that of the user's own texts);
* ``kl`` (edited conditions) — KL(unsteered ‖ steered) on neutral answers to neutral prompts (nats/token);
* ``context_tokens`` — mean prompt tokens per request (what the condition costs in context) and
  ``latency_s`` — wall seconds per request of the condition's batched generation.

``strength_curve`` repeats ``loglik`` and ``kl`` for the steered condition with each user's edit
scaled by factors (1 = the evaluated edit) — effect vs strength on the held-out data.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..capture.embedding import Embedder
from ..io import InputError, read_json, write_json
from ..model.generation import GenerationSettings
from ..pairs.synthesis import PairTemplates
from ..steering.edit import UserEdit
from .conditions import (
    CONDITIONS,
    DEFAULT_FACTORS,
    EDITED_CONDITIONS,
    EVAL_SETTINGS,
    MeasureRequest,
    ModelMeasures,
    fluency_controls,
    generate_with_edits,  # noqa: F401  (re-exported: its home before conditions.py; notebooks import it here)
    model_measures,
)
from .measures import FluencyRule, StyleAttributor, marker_means, marker_movement, rank_markers, repeated_ngram_rate, shuffled_label_accuracy
from .select import DEFAULT_MAX_KL, HeldOut


@dataclass
class Evaluation:
    """The numbers of one evaluation run (see the module docstring); JSON-serialisable.

    ``per_user[user][condition][metric]``; ``summary`` aggregates over users; ``samples`` holds each
    held-out prompt with the user's real text and the three generated answers.
    """

    per_user: dict[str, dict[str, dict[str, float]]]
    summary: dict[str, Any]
    strength_curve: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)
    embedder: str = ""
    fluency_points: list[dict[str, Any]] = field(default_factory=list)
    max_kl: float = DEFAULT_MAX_KL
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        write_json(path, {"format": "repedit.evaluation", **asdict(self)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Evaluation":
        data = read_json(path)
        if data.pop("format", None) != "repedit.evaluation":
            raise InputError(f"{path}: not a repedit evaluation (field 'format')")
        return cls(**data)


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.median(finite)) if finite else float("nan")


def evaluate_users(
    model, tokenizer, test_items: Sequence[HeldOut], edits: dict[str, UserEdit], *,
    insights: dict[str, str], history: dict[str, Sequence[str]], neutral: Sequence[tuple[str, str]],
    embedder: Embedder, examples: dict[str, Sequence[tuple[str, str]]] | None = None,
    factors: Sequence[float] = DEFAULT_FACTORS, settings: GenerationSettings = EVAL_SETTINGS,
    templates: PairTemplates = PairTemplates(), max_kl: float = DEFAULT_MAX_KL, fluency: FluencyRule = FluencyRule(),
    progress: bool = True, measures: ModelMeasures | None = None,
) -> Evaluation:
    """Evaluate every user of ``test_items`` under the five conditions (module docstring).

    Args:
        test_items: held-out (user, prompt, text) items, unseen by pair generation, fitting and selection.
        edits: the users' edits; a user without one is reported with the edited conditions unedited.
        insights: per-user insight text for the prompt conditions (from the pairs file).
        history: per-user training history texts (the style centroid, the attribution classifier's
            training data and the marker's target).
        neutral: neutral ``(prompt, response)`` pairs for the KL of the edited conditions.
        examples: per-user (prompt, text) training items shown in the few-shot condition (default:
            none, so ``few_shot`` equals ``unsteered``; :func:`eval_inputs` gives 4 per user).
        factors: strength multipliers of each edit for ``strength_curve``.
        measures: the model-bound numbers, when already computed elsewhere (``repedit eval --ray``
            merges them from workers, :mod:`repedit.evaluate.conditions`); ``model`` is then unused.
    """
    users = list(dict.fromkeys(item.user_id for item in test_items))
    missing = [u for u in users if not insights.get(u)] + [u for u in users if not history.get(u)]
    if missing:
        raise InputError(f"users without insights or training history: {sorted(set(missing))} (insights come from `repedit pairs`)")
    if not neutral:
        raise InputError("the KL of the steered condition needs neutral (prompt, response) pairs")
    if measures is None:
        request = MeasureRequest(list(test_items), dict(edits), dict(insights), {u: list(v) for u, v in (examples or {}).items()},
                                 list(neutral), tuple(factors), settings, templates)
        measures = model_measures(model, tokenizer, request, progress=progress)
    user_index = {u: i for i, u in enumerate(users)}
    rows = [user_index[item.user_id] for item in test_items]
    texts = [item.text for item in test_items]
    loglik = {c: torch.tensor(v, dtype=torch.float64) for c, v in measures.loglik.items()}
    answers, perplexity, context, kl = measures.answers, measures.perplexity, measures.context_tokens, measures.kl
    latency = {c: measures.seconds[c] / max(len(rows), 1) for c in CONDITIONS}
    edited = {c: c in EDITED_CONDITIONS for c in CONDITIONS}

    # (c) style: embedding similarity, attribution by an independent classifier, lexical markers.
    centroids = torch.stack([embedder(list(history[u])).mean(0) for u in users])  # [n_users, d]
    reference_sim = embedder(texts) @ centroids.T  # the users' own held-out texts: the ceiling
    similarity = {c: embedder([a if a.strip() else " " for a in answers[c]]) @ centroids.T for c in CONDITIONS}
    history_texts = [t for u in users for t in history[u]]
    history_users = [u for u in users for _ in history[u]]
    attributor = StyleAttributor().fit(history_texts, history_users)
    predicted = {c: attributor.predict(answers[c]) for c in CONDITIONS}
    predicted["reference"] = attributor.predict(texts)
    # The pre-registered marker rule (choose_marker); the best-ranked marker is kept even when none is eligible, and says so.
    ranked = {u: rank_markers(list(history[u]), [answers["unsteered"][j] for j, r in enumerate(rows) if r == i], {v: list(history[v]) for v in users})[0]
              for i, u in enumerate(users)}
    markers = {u: m.marker for u, m in ranked.items()}
    repeats = {c: [repeated_ngram_rate(a, 3) for a in answers[c]] for c in CONDITIONS}

    unsteered_perplexity = {u: _median([perplexity["unsteered"][j] for j, r in enumerate(rows) if r == i]) for i, u in enumerate(users)}
    per_user: dict[str, dict[str, dict[str, Any]]] = {}
    for i, user in enumerate(users):
        mine = [j for j, r in enumerate(rows) if r == i]
        others = [k for k in range(len(users)) if k != i]
        marker = markers[user]
        real_marker = marker_means(list(history[user]))[marker]
        unsteered_marker = marker_means([answers["unsteered"][j] for j in mine])[marker]
        own_perplexity = _median([math.exp(-float(loglik["unsteered"][j])) for j in mine])  # of the user's real held-out texts
        per_user[user] = {}
        for condition in CONDITIONS:
            own = similarity[condition][mine, i]
            margin = own - (similarity[condition][mine][:, others].mean(1) if others else 0.0)
            mine_answers = [answers[condition][j] for j in mine]
            value = marker_means(mine_answers)[marker]
            verdict = fluency.check(mine_answers, [perplexity[condition][j] for j in mine], own_perplexity, unsteered_perplexity[user])
            per_user[user][condition] = {
                "loglik": float(loglik[condition][mine].mean()),
                "attribution": sum(predicted[condition][j] == user for j in mine) / len(mine),
                "marker_value": value,
                "marker_movement": marker_movement(unsteered_marker, value, real_marker),
                "style_similarity": float(own.mean()),
                "style_margin": float(margin.mean()),
                "perplexity": _mean([perplexity[condition][j] for j in mine]),
                "repeated_3gram_max": max(repeats[condition][j] for j in mine),
                "fluent": float(verdict.admissible),
                "context_tokens": sum(context[condition][j] for j in mine) / len(mine),
                **({"kl": kl[user]} if edited[condition] else {}),
            }
        own_ref = reference_sim[mine, i]
        per_user[user]["reference"] = {
            "style_similarity": float(own_ref.mean()),
            "style_margin": float((own_ref - (reference_sim[mine][:, others].mean(1) if others else 0.0)).mean()),
            "attribution": sum(predicted["reference"][j] == user for j in mine) / len(mine),
            "marker": marker, "marker_eligible": float(ranked[user].eligible), "marker_value": real_marker, "perplexity": own_perplexity,
        }
        per_user[user]["steered"]["has_edit"] = float(edits.get(user) is not None)

    curve: list[dict[str, Any]] = []
    for factor, (steered_values, factor_kl) in measures.curve.items():
        steered_ll = torch.tensor(steered_values, dtype=torch.float64)
        for i, user in enumerate(users):
            if edits.get(user) is None:
                continue
            mine = [j for j, r in enumerate(rows) if r == i]
            curve.append({
                "user_id": user, "factor": float(factor),
                "gain": float((steered_ll[mine] - loglik["unsteered"][mine]).mean()), "kl": factor_kl[user],
            })

    samples = [
        {"user_id": item.user_id, "prompt": item.prompt, "reference": item.text, **{c: answers[c][j] for c in CONDITIONS}}
        for j, item in enumerate(test_items)
    ]
    summary = summarize(per_user, max_kl)
    summary["attribution"] = {
        **{c: sum(p == item.user_id for p, item in zip(predicted[c], test_items)) / len(test_items) for c in (*CONDITIONS, "reference")},
        "chance": attributor.chance,
        "shuffled_labels": shuffled_label_accuracy(history_texts, history_users, texts, [item.user_id for item in test_items]),
    }
    summary["latency_s"] = latency
    points, controls = _fluency_points(test_items, rows, users, answers, loglik["unsteered"], perplexity, measures.control_perplexity,
                                       unsteered_perplexity, fluency)
    summary["fluency_controls"] = controls
    return Evaluation(per_user, summary, curve, samples, embedder.name, max_kl=max_kl, fluency_points=points, settings={
        "generation": settings.to_dict(), "factors": list(factors), "n_test_items": len(test_items), "n_neutral": len(neutral),
        "fluency_rule": asdict(fluency), "n_shots": max((len(v) for v in (examples or {}).values()), default=0),
    })


def _fluency_points(test_items, rows, users, answers, unsteered_loglik, perplexity, control_perplexity, unsteered_perplexity,
                    rule: FluencyRule) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per answer, the fluency rule's measures (for the report's figure), for every condition, the
    users' real held-out texts and the two constructed controls per user that the rule must reject
    (:func:`repedit.evaluate.conditions.fluency_controls`: a loop and gibberish)."""
    loops, gibberish = fluency_controls(test_items, answers["unsteered"])
    groups = {**{c: (answers[c], perplexity[c]) for c in CONDITIONS},
              "users' real texts": ([item.text for item in test_items], [math.exp(-float(x)) for x in unsteered_loglik]),
              "constructed loop (control)": (loops, control_perplexity["loop"]),
              "constructed gibberish (control)": (gibberish, control_perplexity["gibberish"])}
    points: list[dict[str, Any]] = []
    admitted: dict[str, int] = {}
    for group, (texts, ppls) in groups.items():
        admitted[group] = 0
        for i, user in enumerate(users):
            mine = [j for j, r in enumerate(rows) if r == i]
            own = _median([math.exp(-float(unsteered_loglik[j])) for j in mine])
            verdict = rule.check([texts[j] for j in mine], [ppls[j] for j in mine], own, unsteered_perplexity[user])
            admitted[group] += int(verdict.admissible)
            points += [{"group": group, "user_id": user, "text": texts[j][:300], **m} for j, m in zip(mine, verdict.per_answer)]
    return points, {"admitted_users": admitted, "n_users": len(users)}


_METRICS = ("loglik", "attribution", "marker_movement", "style_similarity", "style_margin", "perplexity", "repeated_3gram_max", "fluent", "context_tokens")


def summarize(per_user: dict[str, dict[str, dict[str, Any]]], max_kl: float = DEFAULT_MAX_KL) -> dict[str, Any]:
    """Means over users and win counts: how many users each condition beats ``unsteered`` (and, for
    the edited conditions, ``prompt_only``) for; markers moved ≥ 30% of the way; fluent users."""
    users = list(per_user)
    out: dict[str, Any] = {"n_users": len(users), "max_kl": max_kl}
    for condition in CONDITIONS:
        rows = [per_user[u][condition] for u in users]
        out[condition] = {metric: _mean([r[metric] for r in rows if metric in r]) for metric in _METRICS}
        out[condition]["repeated_3gram_max"] = max((r["repeated_3gram_max"] for r in rows), default=float("nan"))
    for condition in CONDITIONS[1:]:
        gains = [per_user[u][condition]["loglik"] - per_user[u]["unsteered"]["loglik"] for u in users]
        margins = [per_user[u][condition]["style_margin"] - per_user[u]["unsteered"]["style_margin"] for u in users]
        out[condition]["loglik_gain"] = _mean(gains)
        out[condition]["nll_reduction"] = _mean([1 - per_user[u][condition]["loglik"] / per_user[u]["unsteered"]["loglik"] for u in users])
        out[condition]["users_loglik_better"] = sum(g > 0 for g in gains)
        out[condition]["users_style_margin_better"] = sum(m > 0 for m in margins)
        out[condition]["users_marker_moved_30"] = sum(per_user[u][condition]["marker_movement"] >= 0.3 for u in users)
        out[condition]["users_loglik_above_prompt_only"] = sum(per_user[u][condition]["loglik"] > per_user[u]["prompt_only"]["loglik"] for u in users)
        out[condition]["users_fluent"] = int(sum(per_user[u][condition]["fluent"] for u in users))
    for condition in EDITED_CONDITIONS:
        out[condition]["kl"] = _mean([per_user[u][condition]["kl"] for u in users])
        out[condition]["users_within_kl"] = sum(per_user[u][condition]["kl"] <= max_kl for u in users)
    out["steered"]["users_with_edit"] = int(sum(per_user[u]["steered"]["has_edit"] for u in users))
    out["reference"] = {m: _mean([per_user[u]["reference"][m] for u in users]) for m in ("style_similarity", "style_margin", "attribution", "perplexity")}
    return out


@dataclass(frozen=True)
class EvalInputs:
    """What :func:`evaluate_users` needs besides the model and the edits (see :func:`eval_inputs`)."""

    test_items: list[HeldOut]
    insights: dict[str, str]
    history: dict[str, list[str]]
    neutral: list[tuple[str, str]]
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def eval_inputs(users: Sequence[Any], pairs: Sequence[Any], hold_out: int, *, max_neutral: int = 12, n_shots: int = 4) -> EvalInputs:
    """Held-out items, insights, training histories and neutral text from users and their pairs.

    ``users`` are the *full* users (:class:`repedit.pairs.users.User`); their last ``hold_out`` history
    items with a prompt are the test items (:func:`repedit.pairs.users.split_history`, the rule
    ``repedit pairs --hold-out`` uses), the rest is the training history. Insights come from the
    users' pairs; neutral text is the neutral answers of the first ``max_neutral`` distinct prompts
    of self-generated pairs (of any pairs when none is self-generated). The few-shot examples are
    each user's last ``n_shots`` training items with a prompt (the most recent, as a user's chat
    history would be). Only users that have pairs are evaluated.
    """
    from ..pairs.synthesis import SELF_GENERATED
    from ..pairs.users import split_history

    if hold_out < 1:
        raise InputError("evaluation needs at least one held-out history item per user (hold_out >= 1)")
    paired_users = {p.user_id for p in pairs}
    kept = [u for u in users if u.user_id in paired_users]
    if not kept:
        raise InputError(f"none of the users {[u.user_id for u in users][:5]}... has pairs (pair users: {sorted(paired_users)[:5]}...)")
    train_users, held = split_history(kept, hold_out)
    seen = {(p.user_id, p.personalized) for p in pairs}
    leaked = [f"{user_id}: {item.text[:40]!r}" for user_id, item in held if (user_id, item.text) in seen]
    if leaked:
        raise InputError(
            f"{len(leaked)} held-out texts were used in the pairs (e.g. {leaked[0]}): generate the pairs with "
            f"`repedit pairs --hold-out {hold_out}` so that evaluation items stay unseen"
        )
    insights: dict[str, str] = {}
    for pair in pairs:
        if pair.insights and pair.user_id not in insights:
            insights[pair.user_id] = pair.insights
    # Neutral answers to the neutral prompt set; answers to history prompts when no such pair survived.
    self_generated = [p for p in pairs if p.source == SELF_GENERATED] or list(pairs)
    neutral = list(dict.fromkeys((p.prompt, p.neutral) for p in self_generated))[:max_neutral]
    return EvalInputs(
        [HeldOut(user_id, item.prompt, item.text) for user_id, item in held], insights,
        {u.user_id: [item.text for item in u.history] for u in train_users}, neutral,
        {u.user_id: [(item.prompt, item.text) for item in u.history if item.prompt][-n_shots:] if n_shots > 0 else [] for u in train_users},
    )
