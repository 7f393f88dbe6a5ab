"""LaMP benchmark files (Salemi et al. 2023, https://lamp-benchmark.github.io): read, convert, score.

**Questions** (``LaMP_4_dev_questions.json``): a JSON list of ``{"id": str, "input": str, "profile":
[{"id": ..., <task fields>}, ...]}``. **Outputs** (``LaMP_4_dev_outputs.json``, also the format of
predictions): ``{"task": "LaMP_4", "golds": [{"id": str, "output": str}, ...]}``.

Each question is one repedit :class:`~repedit.pairs.users.User` (``lamp<n>-<question id>``); its profile
items become history items and its input plus gold output one held-out :class:`LampItem`. Profile
fields and history items: LaMP_1 citation identification (title, abstract -> text "title\\nabstract");
LaMP_2 movie tagging (description, tag -> text, label); LaMP_3 product rating (text, score -> text,
rating 1-5); LaMP_4 news headlines (title, text -> prompt "Write a headline for this article: {text}",
text title); LaMP_5 scholarly titles (title, abstract -> prompt "Write a title for this paper abstract:
{abstract}", text title); LaMP_7 tweet paraphrasing (text -> text, no prompt). A profile ``date``
becomes the timestamp. LaMP_6 (Avocado emails) is private and refused.

**Metrics** as in the official ``eval/evaluation.py`` of github.com/LaMP-Benchmark/LaMP (same keys):
LaMP_1/2 ``accuracy`` and macro ``f1`` over the task's whole label set (a prediction outside it is
wrong for every label; a label absent from golds and predictions has F1 0); LaMP_3 ``MAE``/``RMSE`` in
rating points, a prediction ``float()`` cannot parse counting as whichever of 1 and 5 is farther from
the gold (5 on a tie), parsable numbers as given (not clamped or rounded; ``nan``/``inf``, which would
poison the official mean, count as unparsable); LaMP_4/5/7 ``rouge-1``/``rouge-L`` F-measure
(``rouge-score``), mean over items. Official ROUGE (HF ``evaluate``) does not stem and reports a
bootstrap median of the mean, which differs from the exact mean here by resampling noise only;
``use_stemmer=True`` turns Porter stemming on (not the official setting).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..io import InputError, atomic_write_text, check_user_id, read_json, read_jsonl
from .users import HistoryItem, User

TASKS: dict[str, tuple[str, tuple[str, ...]]] = {  # task -> (what, required profile fields)
    "LaMP_1": ("citation identification", ("title", "abstract")),
    "LaMP_2": ("movie tagging", ("description", "tag")),
    "LaMP_3": ("product rating", ("text", "score")),
    "LaMP_4": ("news headline generation", ("title", "text")),
    "LaMP_5": ("scholarly title generation", ("title", "abstract")),
    "LaMP_7": ("tweet paraphrasing", ("text",)),
}
LABELS: dict[str, tuple[str, ...]] = {  # label sets of the official eval/evaluation.py
    "LaMP_1": ("[1]", "[2]"),
    "LaMP_2": ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
               "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story"),
}


@dataclass(frozen=True)
class LampItem:
    """One held-out LaMP question: the user it belongs to, its LaMP id, input text and gold output (None: test split)."""

    user_id: str
    id: str
    input: str
    target: str | None


@dataclass(frozen=True)
class LampData:
    """A converted LaMP split: the canonical task name, one user per question, one item per question (same order)."""

    task: str
    users: list[User]
    items: list[LampItem]


def normalize_task(task: Any, where: str = "task") -> str:
    """Canonical task name ``LaMP_<n>`` from ``LaMP_4``, ``LaMP-4``, ``lamp4`` or ``4``; unknown or private ones raise."""
    match = re.fullmatch(r"(?i)\s*(?:lamp[-_ ]?)?(\d+)\s*", task) if isinstance(task, str) else None
    name = f"LaMP_{match.group(1)}" if match else None
    if name == "LaMP_6":
        raise InputError(f"{where}: LaMP_6 (Avocado email subject generation) is private and not supported; supported: {', '.join(TASKS)}")
    if name not in TASKS:
        raise InputError(f"{where}: unknown LaMP task {task!r}; supported: {', '.join(TASKS)} (LaMP_6 is private)")
    return name


def _resolve_task(override: str | None, in_file: Any, where: str) -> str:
    """The override if given (it must not contradict a recognisable task in the file), else the file's task."""
    if override is None:
        if in_file is None:
            raise InputError(f"{where}: missing field 'task' (e.g. \"LaMP_4\"); or name the task explicitly (task= / --task)")
        return normalize_task(in_file, f"{where}: field 'task'")
    task = normalize_task(override)
    try:
        mentioned = normalize_task(in_file) if in_file is not None else task
    except InputError:
        mentioned = task  # an unrecognisable task field is what the override is for
    if mentioned != task:
        raise InputError(f"{where}: field 'task' says {in_file!r}, but the task here is {task}")
    return task


def _load_json(path: str | Path) -> Any:
    return read_json(path)  # bad UTF-8, unreadable paths: an InputError naming file:line:column (repedit.io)


def _text(obj: dict, name: str, where: str) -> str:
    if name not in obj:
        raise InputError(f"{where}: missing field {name!r} (a non-empty string); found {sorted(obj)}")
    value = obj[name]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _rating(value: Any, where: str, field: str = "score") -> int | float:
    if value is None:
        raise InputError(f"{where}: missing field {field!r} (a rating 1..5)")
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not 1 <= number <= 5:
        raise InputError(f"{where}: field {field!r} must be a rating 1..5 (number or numeric string), got {value!r}")
    return int(number) if number.is_integer() else number


def _history_item(task: str, p: dict, where: str) -> HistoryItem:
    f = {name: (_rating(p.get(name), where) if name == "score" else _text(p, name, where)) for name in TASKS[task][1]}
    date = p.get("date")
    stamp = str(date) if isinstance(date, (str, int)) and not isinstance(date, bool) and str(date).strip() else None
    if task == "LaMP_1":
        return HistoryItem(f"{f['title']}\n{f['abstract']}", timestamp=stamp)
    if task == "LaMP_2":
        return HistoryItem(f["description"], label=f["tag"], timestamp=stamp)
    if task == "LaMP_3":
        return HistoryItem(f["text"], rating=f["score"], timestamp=stamp)
    if task == "LaMP_4":
        return HistoryItem(f["title"], prompt=f"Write a headline for this article: {f['text']}", timestamp=stamp)
    if task == "LaMP_5":
        return HistoryItem(f["title"], prompt=f"Write a title for this paper abstract: {f['abstract']}", timestamp=stamp)
    return HistoryItem(f["text"], timestamp=stamp)  # LaMP_7


def _check_gold(task: str, output: str, where: str) -> None:
    if task in LABELS and output.strip() not in LABELS[task]:
        raise InputError(f"{where}: field 'output' {output!r} is not a {task} label; labels: {list(LABELS[task])}")
    if task == "LaMP_3":
        _rating(output, where, "output")


def _id_outputs(entries: Any, where: str, field: str, gold_task: str | None = None, lines: Sequence[int] | None = None) -> dict[str, str]:
    """``{id: output}`` of a list of ``{"id", "output"}`` objects; golds must be strings, predictions may be numbers."""
    if not isinstance(entries, list):
        raise InputError(f"{where}: field {field!r} must be a list of {{\"id\", \"output\"}} objects, got {type(entries).__name__}")
    out: dict[str, str] = {}
    for index, entry in enumerate(entries):
        at = f"{where}:{lines[index]}" if lines else f"{where}: {field}[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{at}: expected an object with 'id' and 'output', got {type(entry).__name__}")
        key = entry.get("id")
        if not isinstance(key, str) or not key:
            raise InputError(f"{at}: field 'id' must be a non-empty string, got {key!r}")
        value = entry.get("output")
        if gold_task is None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise InputError(f"{at} (id {key!r}): field 'output' must be a string, got {value!r:.60}")
        if key in out:
            raise InputError(f"{at}: duplicate id {key!r}")
        if gold_task is not None:
            _check_gold(gold_task, value, f"{at} (id {key!r})")
        out[key] = value
    return out


def read_outputs(path: str | Path, task: str | None = None) -> tuple[str, dict[str, str]]:
    """Read a LaMP outputs (golds) file: ``(canonical task, {id: gold output})``; ``task`` overrides the file's field."""
    obj = _load_json(path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object {{\"task\": ..., \"golds\": [...]}}, got {type(obj).__name__}")
    resolved = _resolve_task(task, obj.get("task"), str(path))
    if "golds" not in obj:
        raise InputError(f"{path}: missing field 'golds' (a list of {{\"id\", \"output\"}} objects)")
    golds = _id_outputs(obj["golds"], str(path), "golds", gold_task=resolved)
    if not golds:
        raise InputError(f"{path}: field 'golds' is empty (at least one {{\"id\", \"output\"}} object is needed)")
    return resolved, golds


def read_predictions(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """Read predictions: LaMP's own ``{"task", "golds": [{"id", "output"}]}`` JSON, a JSON list, or ``.jsonl`` of ``{id, output}``."""
    if Path(path).suffix == ".jsonl":
        rows = list(read_jsonl(path))
        if not rows:
            raise InputError(f"{path}: no predictions (the file is empty)")
        return None, _id_outputs([obj for _, obj in rows], str(path), "predictions", lines=[n for n, _ in rows])
    obj = _load_json(path)
    if isinstance(obj, list):
        return None, _id_outputs(obj, str(path), "predictions")
    if not isinstance(obj, dict) or "golds" not in obj:
        raise InputError(f"{path}: expected {{\"task\": ..., \"golds\": [{{\"id\", \"output\"}}, ...]}} (field 'golds'), a JSON list, or a .jsonl file")
    return obj.get("task"), _id_outputs(obj["golds"], str(path), "golds")


def read_lamp(questions: str | Path, outputs: str | Path | None = None, task: str | None = None) -> LampData:
    """Convert a LaMP questions file (and optionally its outputs file) into repedit users and held-out items.

    The task comes from the outputs file's ``task`` field, or ``task`` (needed without an outputs file;
    then every item's ``target`` is None). Question and gold ids must match one to one.
    """
    if outputs is None and task is None:
        raise InputError(f"{questions}: no outputs file to take the task from; name it explicitly (task= / --task LaMP_4)")
    golds: dict[str, str] | None
    task, golds = read_outputs(outputs, task) if outputs is not None else (normalize_task(task), None)
    number = task.split("_")[1]
    data = _load_json(questions)
    if not isinstance(data, list) or not data:
        raise InputError(f"{questions}: expected a non-empty JSON list of questions {{\"id\", \"input\", \"profile\"}}, got {type(data).__name__}")
    users: list[User] = []
    items: list[LampItem] = []
    seen: set[str] = set()
    for index, question in enumerate(data):
        where = f"{questions}: question [{index}]"
        if not isinstance(question, dict):
            raise InputError(f"{where}: expected an object with 'id', 'input', 'profile', got {type(question).__name__}")
        qid = _text(question, "id", where)
        where += f" (id {qid!r})"
        try:
            user_id = check_user_id(f"lamp{number}-{qid}")
        except InputError as err:
            raise InputError(f"{where}: field 'id' cannot make a repedit user id: {err}") from None
        if qid in seen:
            raise InputError(f"{where}: duplicate question id {qid!r}")
        seen.add(qid)
        text = _text(question, "input", where)
        profile = question.get("profile")
        if not isinstance(profile, list) or not profile:
            raise InputError(f"{where}: field 'profile' must be a non-empty list of {TASKS[task][0]} items with {list(TASKS[task][1])}")
        history = []
        for j, p in enumerate(profile):
            if not isinstance(p, dict):
                raise InputError(f"{where}: profile[{j}]: expected an object with {list(TASKS[task][1])}, got {type(p).__name__}")
            history.append(_history_item(task, p, f"{where}: profile[{j}]"))
        if golds is not None and qid not in golds:
            raise InputError(f"{where}: no gold output for this id in {outputs}")
        users.append(User(user_id, tuple(history)))
        items.append(LampItem(user_id, qid, text, None if golds is None else golds[qid]))
    if golds is not None and len(golds) != len(items):
        extra = sorted(set(golds) - seen)
        raise InputError(f"{outputs}: {len(extra)} gold ids have no question in {questions}, e.g. {extra[:3]}")
    return LampData(task, users, items)


def user_record(user: User) -> dict[str, Any]:
    """The users-JSONL object of a user (format in :mod:`repedit.pairs.users`); None fields are left out."""
    history = [{k: v for k, v in (("text", h.text), ("prompt", h.prompt), ("label", h.label), ("rating", h.rating),
                                   ("timestamp", h.timestamp)) if v is not None} for h in user.history]
    return {"user_id": user.user_id, "history": history, **({"profile": user.profile} if user.profile is not None else {})}


def write_lamp(data: LampData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/users.jsonl`` (read by :func:`repedit.pairs.users.read_users`) and ``out_dir/items.jsonl``
    (``{"task", "user_id", "id", "input", "target"}`` per line), each atomically. Returns both paths."""
    out = Path(out_dir)
    users, items = out / "users.jsonl", out / "items.jsonl"
    line = lambda obj: json.dumps(obj, ensure_ascii=False) + "\n"  # noqa: E731
    atomic_write_text(users, "".join(line(user_record(u)) for u in data.users))
    atomic_write_text(items, "".join(line({"task": data.task, **vars(i)}) for i in data.items))
    return users, items


def _number_or_far(prediction: str, gold: float) -> float:
    """Official LaMP_3 mapping: a parsable finite number as given, else whichever of 1 and 5 is farther from the gold."""
    try:
        value = float(prediction)
    except ValueError:
        value = math.nan
    return value if math.isfinite(value) else (1.0 if abs(1 - gold) > abs(5 - gold) else 5.0)


def lamp_metrics(task: str, golds: Sequence[str], predictions: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """Official metrics of aligned gold and predicted outputs (see the module docstring).

    LaMP_1/2: ``accuracy``, ``f1`` (macro, fractions in [0, 1]); LaMP_3: ``MAE``, ``RMSE`` (rating points);
    LaMP_4/5/7: ``rouge-1``, ``rouge-L`` (mean F-measure in [0, 1]). Outputs are stripped first.
    """
    task = normalize_task(task)
    if len(golds) != len(predictions) or not golds:
        raise InputError(f"{task}: need as many predictions as golds (at least one), got {len(predictions)} and {len(golds)}")
    for index, gold in enumerate(golds):
        _check_gold(task, gold, f"golds[{index}]")
    golds, preds = [g.strip() for g in golds], [str(p).strip() for p in predictions]
    n = len(golds)
    if task in LABELS:
        from sklearn.metrics import f1_score

        f1 = f1_score(golds, preds, labels=list(LABELS[task]), average="macro", zero_division=0)
        return {"accuracy": sum(g == p for g, p in zip(golds, preds)) / n, "f1": float(f1)}
    if task == "LaMP_3":
        errors = [_number_or_far(p, float(g)) - float(g) for g, p in zip(golds, preds)]
        return {"MAE": sum(abs(e) for e in errors) / n, "RMSE": math.sqrt(sum(e * e for e in errors) / n)}
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the rouge-score package: pip install 'repedit[lamp]' (or pip install rouge-score)") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(g, p) for g, p in zip(golds, preds)]
    return {"rouge-1": sum(s["rouge1"].fmeasure for s in scores) / n, "rouge-L": sum(s["rougeL"].fmeasure for s in scores) / n}


def score_files(outputs: str | Path, predictions: str | Path, task: str | None = None, use_stemmer: bool = False) -> dict[str, Any]:
    """Score a predictions file against a LaMP outputs file: ``{"task", "n", <metrics>}``; the id sets must be equal."""
    task, golds = read_outputs(outputs, task)
    pred_task, preds = read_predictions(predictions)
    if pred_task is not None:
        _resolve_task(task, pred_task, str(predictions))
    missing, extra = sorted(set(golds) - set(preds)), sorted(set(preds) - set(golds))
    if missing or extra:
        raise InputError(f"{predictions}: prediction ids do not match the gold ids of {outputs}: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")
    ids = list(golds)
    metrics = lamp_metrics(task, [golds[i] for i in ids], [preds[i] for i in ids], use_stemmer=use_stemmer)
    return {"task": task, "n": len(ids), **metrics}
