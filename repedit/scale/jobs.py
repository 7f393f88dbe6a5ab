"""Per-user jobs sharded across Ray actors, written into the same resumable outputs as one process.

* :func:`pairs_on_ray` — ``repedit pairs --ray``: neutral answers in batches, then users in blocks
  (:class:`repedit.pairs.synthesis.PairJob`), each unit on a free actor; the driver appends each
  finished unit to the pairs JSONL and its ``.state.json`` *in the units' order*, so the files are
  those of the single-process run, and a rerun after a kill regenerates only unfinished units.
* :func:`fit_on_ray` — ``repedit fit --ray``: users in groups of ``users_per_task``; each finished
  group goes into the vector store at once (one atomic store write), then into
  ``fit-progress.json``; a rerun skips the groups the progress file lists.
* :func:`eval_on_ray` — ``repedit eval --ray``: the model-bound measures (held-out likelihood,
  generation, perplexity, KL) per group of users on the actors; the cross-user measures (style
  attribution, markers, margins) once on the driver.

A killed actor is restarted by Ray and its unit retried there (:class:`~repedit.scale.runtime.WorkerPool`);
the driver writes a unit only when it has come back whole, so nothing is lost or written twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from ..evaluate.fitting import FitOptions, FitOutcome, neutral_sets, shard_invariant
from ..io import InputError, read_json, sha256_of, write_json
from ..model.inputs import chunks
from ..pairs.synthesis import DEFAULT_SETTINGS, Pair, PairsOutput, PairTemplates, plan_job
from ..pairs.users import User
from .runtime import WorkerPool

PROGRESS_FILE = "fit-progress.json"


def pairs_on_ray(
    model: str, users: Sequence[User], prompts: Sequence[str], out: str | os.PathLike, *, actors: int = 2,
    num_gpus: float = 0.0, users_per_block: int = 8, k: int = 4, settings=DEFAULT_SETTINGS, templates: PairTemplates = PairTemplates(),
    near_duplicate: float = 0.995, real_history: bool = True, truncated: str = "drop", layer: int | None = None,
    dtype: str | None = None, progress: bool = True, on_unit: Callable[[str, int], None] | None = None,
) -> list[Pair]:
    """:func:`repedit.pairs.synthesis.generate` with the units of work on ``actors`` Ray actors.

    Needs a connected Ray (:func:`repedit.scale.ray_session`). ``model`` is what each actor loads
    (an alias, HF id or local folder). Arguments otherwise as ``generate``; ``on_unit(phase, index)``
    is called after each unit is written (``phase`` ``"neutral"`` or ``"block"``).

    Returns:
        Every pair of the job, in output order (equal to the single-process run's).
    """
    with WorkerPool(model, actors, num_gpus=num_gpus, dtype=dtype) as pool:
        job = plan_job(pool.call("model_facts"), users, prompts, k=k, settings=settings, templates=templates,
                       near_duplicate=near_duplicate, real_history=real_history, truncated=truncated, layer=layer,
                       users_per_block=users_per_block)
        output = PairsOutput(Path(out), job.config_key)
        state = output.state
        missing = [p for p in job.neutral_needed(users) if p not in state["neutral"]]
        batches = [batch for _, batch in chunks(missing, settings.batch_size)]
        for i, answers in enumerate(tqdm(pool.map("neutral", [(job, b) for b in batches]), total=len(batches), desc="neutral",
                                         unit="batch", disable=not progress)):
            state["neutral"].update(answers)
            output.save_state()
            if on_unit is not None:
                on_unit("neutral", i)
        done = output.done
        blocks = [block for _, block in chunks(list(users), users_per_block) if not job.block_keys(block) <= done]
        units = []
        for block in blocks:
            ids = [u.user_id for u in block]
            neutral = {p: state["neutral"][p] for p in job.neutral_needed(block)}
            units.append((job, block, neutral, job.block_keys(block) & done, {u: state["selected"][u] for u in ids if u in state["selected"]},
                          {u: state["insights"][u] for u in ids if u in state["insights"]}))
        for i, result in enumerate(tqdm(pool.map("pairs_block", units), total=len(units), desc="users", unit="block", disable=not progress)):
            output.append_block(result)
            if on_unit is not None:
                on_unit("block", i)
    return list(output.pairs)


def fit_job_key(pairs: Sequence[Pair], options: FitOptions, model: str) -> str:
    """Identity of a fitting job: its pairs, options and model (a rerun resumes only the same job)."""
    return sha256_of({"pairs": [[p.user_id, p.prompt, p.personalized, p.neutral, p.source] for p in pairs],
                      "options": options.to_dict(), "model": str(model)})


def fit_on_ray(
    model: str, pairs: Sequence[Pair], out: str | os.PathLike, *, options: FitOptions = FitOptions(), actors: int = 2,
    num_gpus: float = 0.0, users_per_task: int = 8, dtype: str | None = None, progress: bool = True,
    on_unit: Callable[[int], None] | None = None,
) -> FitOutcome:
    """:func:`repedit.evaluate.fitting.fit_users` with groups of users on ``actors`` Ray actors.

    Writes the vector store at ``out`` group by group (plus ``selection.json`` / ``training.json``
    for selected / trained edits, and ``fit-progress.json``); a rerun of the same job (same pairs,
    options, model) skips the groups already written. The neutral texts are drawn from all pairs
    once (:func:`repedit.evaluate.fitting.neutral_sets`), so each user's edit is the one the
    single-process run fits. Returns the merged outcome of all groups, also earlier runs'.
    """
    from ..evaluate.select import Selection
    from ..store.vectors import VectorStore, save_edits

    if users_per_task < 1:
        raise InputError(f"users_per_task must be at least 1, got {users_per_task}")
    out = Path(out)
    options = shard_invariant(pairs, options)
    key = fit_job_key(pairs, options, model)
    by_user: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_user.setdefault(pair.user_id, []).append(pair)
    groups = [group for _, group in chunks(list(by_user), users_per_task)]
    progress_path = out / PROGRESS_FILE
    done_groups: list[int] = []
    parts: list[FitOutcome] = []
    if progress_path.exists():
        record = read_json(progress_path)
        if record.get("job") == key:
            done_groups = list(record.get("done", []))
            parts.append(_written_outcome(out, record, Selection))
    neutral = neutral_sets(pairs, options)
    todo = [i for i in range(len(groups)) if i not in set(done_groups)]
    units = [([p for u in groups[i] for p in by_user[u]], options, neutral) for i in todo]
    with WorkerPool(model, actors, num_gpus=num_gpus, dtype=dtype) as pool:
        for i, part in zip(todo, tqdm(pool.map("fit", units), total=len(units), desc="fit", unit="group", disable=not progress)):
            parts.append(part)
            merged = FitOutcome.merge(parts)
            if part.edits:
                save_edits(part.edits, out)  # one atomic store write per group
            else:
                VectorStore(out, create=True)
            if merged.selection is not None:
                merged.selection.save(out / "selection.json")
            if merged.training is not None:
                write_json(out / "training.json", merged.training)
            done_groups.append(i)
            write_json(progress_path, {"job": key, "done": done_groups, "users": [u for g in done_groups for u in groups[g]],
                                       "lines": merged.lines})
            if on_unit is not None:
                on_unit(i)
    return FitOutcome.merge(parts)


def _written_outcome(out: Path, record: dict[str, Any], selection_type) -> FitOutcome:
    """The outcome of the groups an earlier run wrote (edits from the store, selection and training from their files)."""
    from ..store.vectors import VectorStore

    store = VectorStore(out)
    users = set(record.get("users", []))
    edits = {u: store.get(u) for u in store.list_users() if u in users}
    selection = selection_type.load(out / "selection.json", edits) if (out / "selection.json").exists() else None
    training = read_json(out / "training.json") if (out / "training.json").exists() else None
    return FitOutcome(edits, selection, training, list(record.get("lines", [])))


def _measures_to_json(measures) -> dict[str, Any]:
    from dataclasses import asdict

    record = asdict(measures)
    record["curve"] = [[factor, values, kl] for factor, (values, kl) in measures.curve.items()]
    return record


def _measures_from_json(record: dict[str, Any]):
    from ..evaluate.conditions import ModelMeasures

    record = dict(record)
    record["curve"] = {float(factor): (values, kl) for factor, values, kl in record["curve"]}
    return ModelMeasures(**record)


def _edit_digest(edit) -> str:
    """A hash of everything an edit does (its sites' tensors and numbers, positions, model)."""
    import dataclasses
    import hashlib

    import torch

    digest = hashlib.sha256(repr((edit.user_id, edit.model_fingerprint, edit.positions)).encode())
    for site_edit in edit.edits:
        for f in dataclasses.fields(site_edit):
            value = getattr(site_edit, f.name)
            digest.update(value.detach().cpu().double().numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()


def eval_on_ray(
    model: str, test_items: Sequence, edits: dict, *, insights: dict[str, str], history: dict[str, Sequence[str]],
    neutral: Sequence[tuple[str, str]], embedder, examples: dict[str, Sequence[tuple[str, str]]] | None = None,
    factors: Sequence[float] | None = None, settings=None, templates: PairTemplates = PairTemplates(), max_kl: float | None = None,
    actors: int = 2, num_gpus: float = 0.0, users_per_task: int = 8, progress_dir: str | os.PathLike | None = None,
    dtype: str | None = None, progress: bool = True, on_unit: Callable[[int], None] | None = None,
):
    """:func:`repedit.evaluate.evaluation.evaluate_users` with the model-bound measures of groups of
    ``users_per_task`` users on Ray actors (arguments as ``evaluate_users``).

    Each group's measures are kept in ``progress_dir`` (``group-<i>.json``, with the job's key) when
    given, so a rerun measures only the groups not yet there. Returns the :class:`Evaluation`.
    """
    from ..evaluate.conditions import DEFAULT_FACTORS, EVAL_SETTINGS, MeasureRequest, ModelMeasures
    from ..evaluate.evaluation import evaluate_users
    from ..evaluate.select import DEFAULT_MAX_KL

    factors = tuple(DEFAULT_FACTORS if factors is None else factors)
    settings = EVAL_SETTINGS if settings is None else settings
    examples = {u: list(v) for u, v in (examples or {}).items()}
    users = list(dict.fromkeys(item.user_id for item in test_items))
    groups = [group for _, group in chunks(users, users_per_task)]
    requests, order = [], []
    for group in groups:
        members = set(group)
        positions = [j for j, item in enumerate(test_items) if item.user_id in members]
        order += positions
        requests.append(MeasureRequest([test_items[j] for j in positions], {u: edits[u] for u in group if u in edits},
                                       {u: insights[u] for u in group if u in insights}, {u: examples[u] for u in group if u in examples},
                                       list(neutral), factors, settings, templates))
    key = sha256_of({"model": str(model), "items": [[i.user_id, i.prompt, i.text] for i in test_items], "factors": list(factors),
                     "settings": settings.to_dict(), "edits": {u: _edit_digest(e) for u, e in edits.items()},
                     "insights": insights, "examples": examples, "neutral": [list(n) for n in neutral]})
    parts: dict[int, ModelMeasures] = {}
    folder = Path(progress_dir) if progress_dir is not None else None
    if folder is not None:
        for i in range(len(groups)):
            path = folder / f"group-{i}.json"
            if path.exists():
                record = read_json(path)
                if record.get("job") == key:
                    parts[i] = _measures_from_json(record["measures"])
    todo = [i for i in range(len(groups)) if i not in parts]
    if todo:
        with WorkerPool(model, actors, num_gpus=num_gpus, dtype=dtype) as pool:
            for i, part in zip(todo, tqdm(pool.map("measures", [(requests[i],) for i in todo]), total=len(todo), desc="evaluate",
                                          unit="group", disable=not progress)):
                parts[i] = part
                if folder is not None:
                    write_json(folder / f"group-{i}.json", {"job": key, "measures": _measures_to_json(part)})
                if on_unit is not None:
                    on_unit(i)
    merged = ModelMeasures.merge([parts[i] for i in range(len(groups))], order)
    return evaluate_users(None, None, test_items, edits, insights=insights, history=history, neutral=neutral, embedder=embedder,
                          examples=examples, factors=factors, settings=settings, templates=templates,
                          max_kl=DEFAULT_MAX_KL if max_kl is None else max_kl, measures=merged, progress=progress)
