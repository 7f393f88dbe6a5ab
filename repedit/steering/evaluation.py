"""Did personalisation improve? Held-out evaluation of unsteered, prompt-only and steered answers.

For each user, on history items that were **not** used to make pairs, fit or select edits
(:func:`repedit.userdata.split_history`), three conditions answer the same held-out prompts:

* ``unsteered`` — the plain prompt;
* ``prompt_only`` — the user's *insights* (the style summary made by ``repedit pairs``) placed in a
  system message (:attr:`repedit.pairs.PairTemplates.personalized_system`), no edit;
* ``steered`` — the plain prompt with the user's edit (users without an edit are unsteered here).

Metrics, per user and condition:

* ``loglik`` — mean log-probability (nats/token) of the user's real held-out texts given their
  prompts (teacher-forced; higher = the model finds this user's way of writing more likely);
* ``style_similarity`` — mean cosine between each generated answer and the centroid of the user's
  (training) history in an embedding space (:mod:`repedit.embedding`; MiniLM when installed), and
  ``style_margin`` = that minus the mean similarity to the *other* users' centroids (> 0: the answer
  looks more like this user than like the others);
* ``perplexity`` — of the generated answers under the unsteered model given the plain prompt
  (fluency; exp of the mean negative log-probability per token, averaged over answers);
* ``kl`` (steered only) — KL(unsteered ‖ steered) on neutral answers to neutral prompts (nats/token),
  the same fluency constraint the selection used.

``strength_curve`` repeats ``loglik`` and ``kl`` for the steered condition with each user's edit
scaled by factors (1 = the evaluated edit) — effect vs strength on the held-out data.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..embedding import Embedder
from ..generation import Generated, GenerationSettings, generate_batch
from ..inputs import chunks
from ..io import InputError, read_json, write_json
from ..pairs import PairTemplates
from .apply import steer
from .edit import UserEdit
from .scoring import reference_logprobs, response_kl, response_logprobs
from .select import DEFAULT_MAX_KL, HeldOut

CONDITIONS: tuple[str, ...] = ("unsteered", "prompt_only", "steered")
DEFAULT_FACTORS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
# Short answers: held-out history texts are a few sentences; 64 tokens keeps three conditions affordable on a CPU.
EVAL_SETTINGS = GenerationSettings(max_new_tokens=64, repetition_penalty=1.2, batch_size=16)


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


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def _perplexities(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int) -> list[float]:
    """Perplexity of each answer under the unsteered model (NaN for an empty answer)."""
    scored = [i for i, a in enumerate(answers) if a.strip()]
    out = [float("nan")] * len(answers)
    if scored:
        logprobs = response_logprobs(model, tokenizer, [prompts[i] for i in scored], [answers[i] for i in scored], batch_size=batch_size)
        for i, lp in zip(scored, logprobs.tolist()):
            out[i] = math.exp(-lp)
    return out


def evaluate_users(
    model, tokenizer, test_items: Sequence[HeldOut], edits: dict[str, UserEdit], *,
    insights: dict[str, str], history: dict[str, Sequence[str]], neutral: Sequence[tuple[str, str]],
    embedder: Embedder, factors: Sequence[float] = DEFAULT_FACTORS, settings: GenerationSettings = EVAL_SETTINGS,
    templates: PairTemplates = PairTemplates(), max_kl: float = DEFAULT_MAX_KL, progress: bool = True,
) -> Evaluation:
    """Evaluate every user of ``test_items`` under the three conditions (module docstring).

    Args:
        test_items: held-out (user, prompt, text) items, unseen by pair generation, fitting and selection.
        edits: the users' edits; a user without one is reported with ``steered`` = unsteered.
        insights: per-user insight text for the prompt-only condition (from the pairs file).
        history: per-user training history texts (the style centroid for style similarity).
        neutral: neutral ``(prompt, response)`` pairs for the KL of the steered condition.
        factors: strength multipliers of each edit for ``strength_curve``.
    """
    users = list(dict.fromkeys(item.user_id for item in test_items))
    missing = [u for u in users if not insights.get(u)] + [u for u in users if not history.get(u)]
    if missing:
        raise InputError(f"users without insights or training history: {sorted(set(missing))} (insights come from `repedit pairs`)")
    if not neutral:
        raise InputError("the KL of the steered condition needs neutral (prompt, response) pairs")
    batch = settings.batch_size
    edit_list = [edits.get(u) for u in users]
    user_index = {u: i for i, u in enumerate(users)}
    rows = [user_index[item.user_id] for item in test_items]
    prompts = [item.prompt for item in test_items]
    texts = [item.text for item in test_items]
    personal_prompts = [
        [{"role": "system", "content": templates.personalized_system.format(insights=insights[item.user_id])}, {"role": "user", "content": item.prompt}]
        for item in test_items
    ]
    stages = tqdm(total=6, desc="evaluate", unit="stage", disable=not progress)

    # (a) held-out log-likelihood, three conditions.
    loglik = {
        "unsteered": response_logprobs(model, tokenizer, prompts, texts, batch_size=batch),
        "prompt_only": response_logprobs(model, tokenizer, personal_prompts, texts, batch_size=batch),
        "steered": response_logprobs(model, tokenizer, prompts, texts, edits=edit_list, rows=rows, batch_size=batch),
    }
    stages.update()

    # (b) generations, three conditions; style similarity to the users' training histories.
    plain = [[{"role": "user", "content": p}] for p in prompts]
    answers = {
        "unsteered": [g.text for g in generate_with_edits(model, tokenizer, plain, [None], [None] * len(plain), settings)],
        "prompt_only": [g.text for g in generate_with_edits(model, tokenizer, personal_prompts, [None], [None] * len(plain), settings)],
        "steered": [g.text for g in generate_with_edits(model, tokenizer, plain, edit_list, rows, settings)],
    }
    stages.update()
    centroids = torch.stack([embedder(list(history[u])).mean(0) for u in users])  # [n_users, d]
    reference_sim = embedder(texts) @ centroids.T  # the users' own held-out texts: the ceiling
    similarity = {c: embedder([a if a.strip() else " " for a in answers[c]]) @ centroids.T for c in CONDITIONS}
    stages.update()

    # (c) fluency: perplexity of the answers under the unsteered model; KL on neutral text when steered.
    perplexity = {c: _perplexities(model, tokenizer, prompts, answers[c], batch) for c in CONDITIONS}
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

    per_user: dict[str, dict[str, dict[str, float]]] = {}
    for i, user in enumerate(users):
        mine = [j for j, r in enumerate(rows) if r == i]
        others = [k for k in range(len(users)) if k != i]
        per_user[user] = {}
        for condition in CONDITIONS:
            own = similarity[condition][mine, i]
            margin = own - (similarity[condition][mine][:, others].mean(1) if others else 0.0)
            per_user[user][condition] = {
                "loglik": float(loglik[condition][mine].mean()),
                "style_similarity": float(own.mean()),
                "style_margin": float(margin.mean()),
                "perplexity": _mean([perplexity[condition][j] for j in mine]),
                **({"kl": kl[user]} if condition == "steered" else {}),
            }
        own_ref = reference_sim[mine, i]
        per_user[user]["reference"] = {
            "style_similarity": float(own_ref.mean()),
            "style_margin": float((own_ref - (reference_sim[mine][:, others].mean(1) if others else 0.0)).mean()),
        }
        per_user[user]["steered"]["has_edit"] = float(edits.get(user) is not None)

    # Effect vs strength on the held-out data: each user's edit scaled by each factor, all users per batch.
    curve: list[dict[str, Any]] = []
    for factor in factors:
        if factor == 1.0:  # the evaluated edits themselves: already scored above
            steered_ll, factor_kl = loglik["steered"], kl
        else:
            scaled = [e * factor if e is not None else None for e in edit_list]
            steered_ll = response_logprobs(model, tokenizer, prompts, texts, edits=scaled, rows=rows, batch_size=batch)
            factor_kl = kl_per_user(scaled)
        for i, user in enumerate(users):
            if edit_list[i] is None:
                continue
            mine = [j for j, r in enumerate(rows) if r == i]
            curve.append({
                "user_id": user, "factor": float(factor),
                "gain": float((steered_ll[mine] - loglik["unsteered"][mine]).mean()), "kl": factor_kl[user],
            })
    stages.update()
    stages.close()

    samples = [
        {"user_id": item.user_id, "prompt": item.prompt, "reference": item.text, **{c: answers[c][j] for c in CONDITIONS}}
        for j, item in enumerate(test_items)
    ]
    return Evaluation(per_user, summarize(per_user, max_kl), curve, samples, embedder.name, max_kl, {
        "generation": settings.to_dict(), "factors": list(factors), "n_test_items": len(test_items), "n_neutral": len(neutral),
    })


def summarize(per_user: dict[str, dict[str, dict[str, float]]], max_kl: float = DEFAULT_MAX_KL) -> dict[str, Any]:
    """Means over users and win counts: how many users each condition beats ``unsteered`` for."""
    users = list(per_user)
    out: dict[str, Any] = {"n_users": len(users), "max_kl": max_kl}
    for condition in CONDITIONS:
        rows = [per_user[u][condition] for u in users]
        out[condition] = {metric: _mean([r[metric] for r in rows]) for metric in ("loglik", "style_similarity", "style_margin", "perplexity")}
    for condition in ("prompt_only", "steered"):
        gains = [per_user[u][condition]["loglik"] - per_user[u]["unsteered"]["loglik"] for u in users]
        margins = [per_user[u][condition]["style_margin"] - per_user[u]["unsteered"]["style_margin"] for u in users]
        out[condition]["loglik_gain"] = _mean(gains)
        out[condition]["users_loglik_better"] = sum(g > 0 for g in gains)
        out[condition]["users_style_margin_better"] = sum(m > 0 for m in margins)
    out["steered"]["users_with_edit"] = int(sum(per_user[u]["steered"]["has_edit"] for u in users))
    out["steered"]["users_within_kl"] = sum(per_user[u]["steered"]["kl"] <= max_kl for u in users)
    out["steered"]["kl"] = _mean([per_user[u]["steered"]["kl"] for u in users])
    out["reference"] = {m: _mean([per_user[u]["reference"][m] for u in users]) for m in ("style_similarity", "style_margin")}
    return out


@dataclass(frozen=True)
class EvalInputs:
    """What :func:`evaluate_users` needs besides the model and the edits (see :func:`eval_inputs`)."""

    test_items: list[HeldOut]
    insights: dict[str, str]
    history: dict[str, list[str]]
    neutral: list[tuple[str, str]]


def eval_inputs(users: Sequence[Any], pairs: Sequence[Any], hold_out: int, *, max_neutral: int = 12) -> EvalInputs:
    """Held-out items, insights, training histories and neutral text from users and their pairs.

    ``users`` are the *full* users (:class:`repedit.userdata.User`); their last ``hold_out`` history
    items with a prompt are the test items (:func:`repedit.userdata.split_history`, the rule
    ``repedit pairs --hold-out`` uses), the rest is the training history. Insights come from the
    users' pairs; neutral text is the neutral answers of the first ``max_neutral`` distinct prompts
    of self-generated pairs (of any pairs when none is self-generated). Only users that have pairs are evaluated.
    """
    from ..pairs import SELF_GENERATED
    from ..userdata import split_history

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
    )
