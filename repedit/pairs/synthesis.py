"""Fake it: self-generated per-user preference pairs.

For each user the model (1) sees ``k`` representative history items, chosen for diversity in its own
representation space (farthest-point sampling on mean-pooled hidden states), (2) writes a short
*insight* summary of the user's style and preferences, and (3) answers every prompt twice: a
*personalised* response conditioned on the insights and examples, and a *neutral* response with no
user information (the neutral response depends on the prompt only, so it is generated once per prompt
and shared by all users). Empty, truncated and near-duplicate pairs are dropped. When history items
carry a ``prompt``, *real-history* pairs (the StyleVector variant) pair the user's own text with the
model's neutral answer to the same prompt.

The job is resumable and lossless: pairs are appended to the output JSONL one batch at a time (a
torn last line is repaired on restart), insights, neutral answers and dropped keys are kept in
``<out>.state.json`` (written atomically), and work is cut into the same batches on every run, so a
restarted job regenerates exactly what is missing — no pair lost or duplicated.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..capture.activations import capture
from ..capture.embedding import text_representations
from ..io import InputError, check_user_id, expect, read_csv, read_json, read_jsonl, remove_stale_temps, sha256_of, write_json
from ..model.generation import Generated, GenerationSettings, generate_chat
from ..model.inputs import chunks
from ..model.loading import model_fingerprint
from .users import User

# Greedy, with a mild repetition penalty: without it the 135M default model loops in long answers.
DEFAULT_SETTINGS = GenerationSettings(max_new_tokens=96, repetition_penalty=1.2)
SELF_GENERATED = "self-generated"
REAL_HISTORY = "real-history"


@dataclass(frozen=True)
class PairTemplates:
    """Prompt templates (``str.format`` fields in braces). Override any of them to change the prompts.

    * Insight: ``insight_system``, then ``insight_user`` with ``{examples}`` (the selected history
      items, each rendered with ``example``: ``{text}``) and ``{profile}`` (``"Profile: ...\n\n"`` or empty).
    * Personalised response: ``personalized_system`` with ``{insights}``; the selected history items
      that have a ``prompt`` follow as few-shot chat turns (user: the item's prompt, assistant: the
      user's text), those without one are listed in the system message via ``personalized_examples``
      (``{examples}``); the last user turn is ``{prompt}`` through ``request``.
    * Neutral response: ``neutral_system`` and the same ``request``, with no user information.
    """

    insight_system: str = "You are an expert at describing how people write."
    insight_user: str = (
        "{profile}Here are texts written by one person:\n{examples}\n\n"
        "In two sentences, describe this person's writing style (length, tone, formality, emoji, vocabulary) "
        "and their main interests. Start with \"This user\"."
    )
    example: str = "- {text}"
    personalized_system: str = (
        "You are a helpful assistant. Write every answer exactly the way this user writes. {insights} "
        "Match the user's length, tone, punctuation, emoji and vocabulary."
    )
    personalized_examples: str = "\n\nExamples of the user's writing:\n{examples}"
    neutral_system: str = "You are a helpful assistant. Answer in at most three sentences."
    request: str = "{prompt}"

    def __post_init__(self) -> None:
        required = {
            "insight_user": ("{examples}",), "personalized_system": ("{insights}",),
            "personalized_examples": ("{examples}",), "example": ("{text}",), "request": ("{prompt}",),
        }
        for name, fields in required.items():
            for required in fields:
                if required not in getattr(self, name):
                    raise InputError(f"template {name!r} must contain {required}")

    def personalized(self, user: User, selected: Sequence[int], insights: str, prompt: str) -> list[dict[str, str]]:
        """The conversation that asks for ``user``'s personalised answer to ``prompt``."""
        items = [user.history[i] for i in selected]
        system = self.personalized_system.format(insights=insights)
        listed = [item for item in items if item.prompt is None]
        if listed:
            system += self.personalized_examples.format(examples="\n".join(self.example.format(text=i.text) for i in listed))
        turns = [{"role": "system", "content": system}]
        for item in items:
            if item.prompt is not None:
                turns += [{"role": "user", "content": self.request.format(prompt=item.prompt)}, {"role": "assistant", "content": item.text}]
        return turns + [{"role": "user", "content": self.request.format(prompt=prompt)}]

    def neutral(self, prompt: str) -> list[dict[str, str]]:
        """The conversation that asks for the neutral answer to ``prompt``."""
        return [{"role": "system", "content": self.neutral_system}, {"role": "user", "content": self.request.format(prompt=prompt)}]

    def insight(self, user: User, selected: Sequence[int]) -> list[dict[str, str]]:
        """The conversation that asks the model to summarise ``user``'s style and preferences."""
        examples = "\n".join(self.example.format(text=user.history[i].text) for i in selected)
        profile = f"Profile: {user.profile}\n\n" if user.profile else ""
        return [{"role": "system", "content": self.insight_system}, {"role": "user", "content": self.insight_user.format(examples=examples, profile=profile)}]


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``personalized`` (positive) vs ``neutral`` (negative) for one user and prompt."""

    user_id: str
    prompt: str
    personalized: str
    neutral: str
    insights: str = ""
    source: str = SELF_GENERATED
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.user_id, self.prompt, self.source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _key_string(key: tuple[str, str, str]) -> str:
    return json.dumps(list(key), ensure_ascii=False)


def select_representative(reps: torch.Tensor, k: int) -> list[int]:
    """Pick ``k`` diverse rows of ``reps`` ``[n, d]`` by farthest-point sampling (cosine distance).

    Starts from the row closest to the mean (the most typical item), then repeatedly adds the row
    farthest from everything chosen so far. Deterministic; returns indices in selection order.
    """
    n = reps.shape[0]
    if k >= n:
        return list(range(n))
    unit = torch.nn.functional.normalize(reps.double(), dim=1)
    centre = torch.nn.functional.normalize(unit.mean(0, keepdim=True), dim=1)
    chosen = [int((unit @ centre.T).squeeze(1).argmax())]
    distance = 1 - unit @ unit[chosen[0]]
    while len(chosen) < k:
        distance[chosen] = -1.0
        nxt = int(distance.argmax())
        chosen.append(nxt)
        distance = torch.minimum(distance, 1 - unit @ unit[nxt])
    return chosen


def _sentence_ends(text: str, line_breaks: bool = False) -> list[int]:
    """Character offsets just after each sentence end (``.``, ``!``, ``?`` before a space or the end;
    optionally also line breaks)."""
    pattern = r"[.!?](\s|$)|\n" if line_breaks else r"[.!?](\s|$)"
    return [m.end() for m in re.finditer(pattern, text)]


def _first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences of ``text`` (insights are asked to be two sentences; small models ramble)."""
    ends = _sentence_ends(text)
    return text[: ends[n - 1]].strip() if len(ends) >= n else text.strip()


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class PairsOutput:
    """The output JSONL (append-only, torn last line repaired) plus its ``.state.json`` sidecar."""

    def __init__(self, path: Path | None, config_key: str) -> None:
        self.path = path
        self.pairs: list[Pair] = []
        self.state: dict[str, Any] = {"config": config_key, "selected": {}, "insights": {}, "neutral": {}, "dropped": {}}
        if path is None:
            return
        self.state_path = path.with_name(path.name + ".state.json")
        for leftover in (path, self.state_path):  # temporary files of a write killed before its rename (one job per --out)
            remove_stale_temps(leftover)
        if self.state_path.exists():
            state = read_json(self.state_path, dict)
            if state.get("config") != config_key:
                raise InputError(
                    f"{path}: this output was started with other inputs, model or settings; "
                    "use a new --out path or delete it and its .state.json to start over"
                )
            self.state = _check_state(state, self.state_path)
        if path.exists():
            self._repair()
            for line_number, obj in read_jsonl(path):
                self.pairs.append(_pair_from_dict(obj, f"{path}:{line_number}"))

    def _repair(self) -> None:
        """Cut a torn last line (a kill during an append) so the file is valid JSONL again."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "rb+") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    @property
    def done(self) -> set[str]:
        return {_key_string(p.key) for p in self.pairs} | set(self.state["dropped"])

    def save_state(self) -> None:
        if self.path is not None:
            write_json(self.state_path, self.state)

    def append(self, pairs: Sequence[Pair], dropped: dict[str, str]) -> None:
        """Append ``pairs`` in one write (fsynced), then record ``dropped`` keys in the state."""
        if self.path is not None and pairs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs).encode("utf-8")
            with open(self.path, "ab") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        self.pairs.extend(pairs)
        if dropped:
            self.state["dropped"].update(dropped)
            self.save_state()

    def append_block(self, result: "BlockResult") -> None:
        """Record a finished block: its selections and insights, then its pairs and dropped keys."""
        if result.selected or result.insights:
            self.state["selected"].update(result.selected)
            self.state["insights"].update(result.insights)
            self.save_state()
        self.append(result.pairs, result.dropped)


def _pair_user(user_id: Any, where: str) -> str:
    """A pair's user id: absent or empty means ``"default"``; otherwise a valid user id, matched in full."""
    if user_id is None or user_id == "":
        return "default"
    if not isinstance(user_id, str):
        raise InputError(f"{where}: field 'user_id': expected a string, got {type(user_id).__name__} {user_id!r}", field="user_id")
    try:
        return check_user_id(user_id)
    except InputError as err:
        raise InputError(f"{where}: field 'user_id': {err}", field="user_id") from None


def _check_state(state: Any, path: Path) -> dict[str, Any]:
    """The types of a ``<out>.state.json`` (written by this module); a damaged one names the field."""
    expect(state, dict, str(path), path=path)
    for name in ("selected", "insights", "neutral", "dropped"):
        expect(state.get(name), dict, f"{path}: field {name!r}", path=path, field=name)
    for user, text in state["insights"].items():
        expect(text, str, f"{path}: field 'insights[{user!r}]'", path=path, field="insights")
    for user, chosen in state["selected"].items():
        expect(chosen, list, f"{path}: field 'selected[{user!r}]'", path=path, field="selected")
        for i in chosen:
            expect(i, int, f"{path}: field 'selected[{user!r}]' item", path=path, field="selected")
    for prompt, entry in state["neutral"].items():
        where = f"{path}: field 'neutral[{prompt[:40]!r}]'"
        expect(entry, dict, where, path=path, field="neutral")
        expect(entry.get("text"), str, f"{where}.text", path=path, field="neutral")
        expect(entry.get("finished"), bool, f"{where}.finished", path=path, field="neutral")
        expect(entry.get("n_tokens"), int, f"{where}.n_tokens", path=path, field="neutral")
    for key, reason in state["dropped"].items():
        expect(reason, str, f"{path}: field 'dropped[{key[:40]!r}]'", path=path, field="dropped")
    return state


def _pair_from_dict(obj: Any, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object for a pair")
    for name in ("user_id", "prompt", "personalized", "neutral"):
        if not isinstance(obj.get(name), str):
            raise InputError(f"{where}: missing or non-string field {name!r}")
    _pair_user(obj["user_id"], where)
    return Pair(
        obj["user_id"], obj["prompt"], obj["personalized"], obj["neutral"], obj.get("insights", "") or "",
        obj.get("source", SELF_GENERATED), obj.get("settings", {}) or {},
    )


def _response_reps(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], layer: int, batch_size: int) -> torch.Tensor:
    """Mean-pooled ``resid_post.layer`` of each response given its prompt: ``[n, d_model]``."""
    acts = capture(
        model, tokenizer, list(zip(prompts, responses)), sites=[f"resid_post.{layer}"], position="mean",
        span="response", batch_size=batch_size, progress=False,
    )
    return acts[f"resid_post.{layer}"]


def _trim(generated: Generated) -> Generated:
    """Cut a response that hit ``max_new_tokens`` back to its last complete sentence (``finished`` if any remains)."""
    if generated.finished:
        return generated
    ends = _sentence_ends(generated.text, line_breaks=True)
    if not ends:
        return generated
    return Generated(generated.text[: ends[-1]].strip(), True, generated.n_tokens)


def _filter(
    model, tokenizer, candidates: Sequence[tuple[Pair, Generated, Generated]], layer: int, threshold: float, batch_size: int,
    truncated: str,
) -> tuple[list[Pair], dict[str, str]]:
    """Split candidates into kept pairs and ``{key: reason}`` for dropped ones."""
    kept: list[Pair] = []
    dropped: dict[str, str] = {}
    checkable = []
    for pair, personalized, neutral in candidates:
        key = _key_string(pair.key)
        if truncated == "trim":
            personalized, neutral = _trim(personalized), _trim(neutral)
            pair = replace(pair, personalized=personalized.text, neutral=neutral.text)
        if not personalized.text or not neutral.text:
            dropped[key] = "empty"
        elif truncated != "keep" and (not personalized.finished or not neutral.finished):
            dropped[key] = "truncated"
        elif _normalise(personalized.text) == _normalise(neutral.text):
            dropped[key] = "near-duplicate (same text)"
        else:
            checkable.append(pair)
    if checkable:
        prompts = [p.prompt for p in checkable] * 2
        reps = _response_reps(model, tokenizer, prompts, [p.personalized for p in checkable] + [p.neutral for p in checkable], layer, batch_size)
        cosine = torch.nn.functional.cosine_similarity(reps[: len(checkable)], reps[len(checkable):], dim=1)
        for pair, value in zip(checkable, cosine.tolist()):
            if value > threshold:
                dropped[_key_string(pair.key)] = f"near-duplicate (cosine {value:.4f} > {threshold})"
            else:
                kept.append(pair)
    return kept, dropped


@dataclass(frozen=True)
class ModelFacts:
    """What a pairs job's plan needs of the model: its fingerprint and its number of layers."""

    fingerprint: str
    n_layers: int

    @classmethod
    def of(cls, model) -> "ModelFacts":
        from ..model.arch import get_adapter

        return cls(model_fingerprint(model), get_adapter(model).n_layers)


@dataclass(frozen=True)
class PairJob:
    """Everything a pairs job's units of work need besides the model: built by :func:`plan_job`.

    The job is cut into units that do not depend on who runs them — neutral answers in batches of
    ``settings.batch_size`` prompts (:func:`neutral_answers`) and users in blocks of
    ``users_per_block`` (:func:`user_block_pairs`) — so one process running them in order and many
    workers running them in any order write the same pairs (``repedit.scale`` relies on this).
    """

    prompts: tuple[str, ...]
    k: int
    settings: GenerationSettings
    templates: PairTemplates
    near_duplicate: float
    real_history: bool
    truncated: str
    layer: int
    run_settings: dict[str, Any]
    config_key: str
    users_per_block: int

    def neutral_needed(self, users: Sequence[User]) -> list[str]:
        """Prompts that need a neutral answer: the prompt set, then the users' history prompts (real-history pairs)."""
        history = [h.prompt for u in users for h in u.history if h.prompt] if self.real_history else []
        return list(dict.fromkeys(list(self.prompts) + history))

    def block_keys(self, block: Sequence[User]) -> set[str]:
        """The keys of every pair a block of users can produce (kept or dropped, the job is done with them)."""
        keys = {_key_string((u.user_id, p, SELF_GENERATED)) for u in block for p in self.prompts}
        if self.real_history:
            keys |= {_key_string((u.user_id, h.prompt, REAL_HISTORY)) for u in block for h in u.history if h.prompt is not None}
        return keys


@dataclass
class BlockResult:
    """What one block of users produced: representative items, insights, kept pairs, dropped keys with reasons."""

    selected: dict[str, list[int]]
    insights: dict[str, str]
    pairs: list[Pair]
    dropped: dict[str, str]


def plan_job(
    model, users: Sequence[User], prompts: Sequence[str], *, k: int = 4, settings: GenerationSettings = DEFAULT_SETTINGS,
    templates: PairTemplates = PairTemplates(), near_duplicate: float = 0.995, real_history: bool = True, truncated: str = "drop",
    layer: int | None = None, users_per_block: int = 8,
) -> PairJob:
    """Check the inputs of a pairs job and fix its settings and resume key (arguments as :func:`generate`;
    ``model`` may be its :class:`ModelFacts`, all a driver without the model needs)."""
    if not users:
        raise InputError("no users given")
    if not prompts:
        raise InputError("no prompts given: the prompt set is empty")
    ids = [u.user_id for u in users]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise InputError(f"duplicate user ids: {', '.join(duplicates)}")
    if len(set(prompts)) != len(prompts):
        raise InputError("duplicate prompts in the prompt set (pairs are keyed by user and prompt)")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    if users_per_block < 1:
        raise InputError(f"users_per_block must be at least 1, got {users_per_block}")
    if truncated not in ("drop", "trim", "keep"):
        raise InputError(f"truncated must be 'drop', 'trim' or 'keep', got {truncated!r}")
    facts = model if isinstance(model, ModelFacts) else ModelFacts.of(model)
    layer = facts.n_layers // 2 if layer is None else layer
    run_settings = {
        "model": facts.fingerprint, "k": k, "layer": layer, "near_duplicate": near_duplicate, "truncated": truncated,
        **settings.to_dict(), "templates": sha256_of(asdict(templates))[:12],
    }
    config_key = sha256_of({
        "settings": run_settings, "prompts": list(prompts), "real_history": real_history,
        "users": [[u.user_id, [h.text for h in u.history], [h.prompt for h in u.history], u.profile] for u in users],
    })
    return PairJob(tuple(prompts), k, settings, templates, near_duplicate, real_history, truncated, layer, run_settings,
                   config_key, users_per_block)


def neutral_answers(model, tokenizer, job: PairJob, prompts: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Neutral answers to one batch of prompts: ``{prompt: {"text", "finished", "n_tokens"}}``."""
    results = generate_chat(model, tokenizer, [job.templates.neutral(p) for p in prompts], job.settings, progress=False)
    return {p: {"text": r.text, "finished": r.finished, "n_tokens": r.n_tokens} for p, r in zip(prompts, results)}


def user_block_pairs(
    model, tokenizer, job: PairJob, block: Sequence[User], neutral: dict[str, dict[str, Any]], *,
    done: set[str] = frozenset(), selected: dict[str, list[int]] | None = None, insights: dict[str, str] | None = None,
    sink: Callable[[BlockResult], None] | None = None, progress: bool = False,
) -> BlockResult:
    """Pairs of one block of users (steps 1–2, 4–5 of the module docstring).

    Args:
        neutral: the neutral answers of (at least) ``job.neutral_needed(block)``.
        done: keys already written or dropped (a resumed block regenerates only its other batches).
        selected, insights: those the block's users already have (from an interrupted run); the
            others are computed here.
        sink: called with each part of the result as soon as it exists (first the selections and
            insights, then each batch's pairs), so a single process can write as it goes; the
            returned result holds all parts.
    """
    selected, insights = dict(selected or {}), dict(insights or {})
    settings, templates = job.settings, job.templates
    pending = [u for u in block if u.user_id not in insights]
    if pending:  # 1-2. Representative items and insights, batched across the block's users.
        texts = [h.text for u in pending for h in u.history]
        reps = text_representations(model, tokenizer, texts, job.layer, settings.batch_size)
        start = 0
        for user in pending:
            selected[user.user_id] = select_representative(reps[start:start + len(user.history)], job.k)
            start += len(user.history)
        conversations = [templates.insight(user, selected[user.user_id]) for user in pending]
        insight_settings = replace(settings, max_new_tokens=max(settings.max_new_tokens, 96))
        for user, result in zip(pending, generate_chat(model, tokenizer, conversations, insight_settings, progress=False)):
            insights[user.user_id] = _first_sentences(result.text, 2)
    block_selected = {u.user_id: selected[u.user_id] for u in block}
    block_insights = {u.user_id: insights[u.user_id] for u in block}
    if sink is not None:
        sink(BlockResult(block_selected, block_insights, [], {}))

    def neutral_of(prompt: str) -> Generated:
        entry = neutral[prompt]
        return Generated(entry["text"], entry["finished"], entry["n_tokens"])

    # 4. Personalised answers: the same batches on every run, so a rerun regenerates exactly what is missing.
    users_by_id = {u.user_id: u for u in block}
    tasks = [(u.user_id, p) for u in block for p in job.prompts]
    kept: list[Pair] = []
    dropped: dict[str, str] = {}
    for _, batch in tqdm(list(chunks(tasks, settings.batch_size)), desc="personalised", unit="batch", disable=not progress):
        if all(_key_string((uid, p, SELF_GENERATED)) in done for uid, p in batch):
            continue
        conversations = [templates.personalized(users_by_id[uid], selected[uid], insights[uid], p) for uid, p in batch]
        # Every message but the request is the user's shared prefix: its KV cache is computed once per batch.
        results = generate_chat(model, tokenizer, conversations, settings, progress=False, prefix_messages=[len(c) - 1 for c in conversations])
        candidates = [
            (Pair(uid, p, r.text, neutral_of(p).text, insights[uid], SELF_GENERATED, job.run_settings), r, neutral_of(p))
            for (uid, p), r in zip(batch, results) if _key_string((uid, p, SELF_GENERATED)) not in done
        ]
        batch_kept, batch_dropped = _filter(model, tokenizer, candidates, job.layer, job.near_duplicate, settings.batch_size, job.truncated)
        kept += batch_kept
        dropped.update(batch_dropped)
        if sink is not None:
            sink(BlockResult({}, {}, batch_kept, batch_dropped))

    # 5. Real-history (StyleVector) pairs: the user's own text vs the neutral answer to its prompt.
    if job.real_history:
        candidates = []
        for user in block:
            for item in user.history:
                if item.prompt is None:
                    continue
                pair = Pair(user.user_id, item.prompt, item.text, neutral_of(item.prompt).text, insights[user.user_id], REAL_HISTORY, job.run_settings)
                if _key_string(pair.key) not in done and all(c[0].key != pair.key for c in candidates):
                    candidates.append((pair, Generated(item.text, True, 0), neutral_of(item.prompt)))
        if candidates:
            batch_kept, batch_dropped = _filter(model, tokenizer, candidates, job.layer, job.near_duplicate, settings.batch_size, job.truncated)
            kept += batch_kept
            dropped.update(batch_dropped)
            if sink is not None:
                sink(BlockResult({}, {}, batch_kept, batch_dropped))
    return BlockResult(block_selected, block_insights, kept, dropped)


def generate(
    model,
    tokenizer,
    users: Sequence[User],
    prompts: Sequence[str],
    *,
    out: str | Path | None = None,
    k: int = 4,
    settings: GenerationSettings = DEFAULT_SETTINGS,
    templates: PairTemplates = PairTemplates(),
    near_duplicate: float = 0.995,
    real_history: bool = True,
    truncated: str = "drop",
    layer: int | None = None,
    users_per_block: int = 8,
    progress: bool = True,
) -> list[Pair]:
    """Generate preference pairs for every user and prompt (see the module docstring).

    Args:
        users: users with histories (:func:`repedit.pairs.users.read_users`).
        prompts: the prompt set; each user gets one self-generated pair per prompt.
        out: output JSONL; when given the job is resumable (rerun with the same arguments to continue).
        k: history items shown to the model per user (chosen for diversity).
        settings: decoding settings (greedy by default; sampling with a seed optional).
        near_duplicate: drop a pair when the cosine similarity of the two responses' mean-pooled
            hidden states (at ``layer``) exceeds this, or when their texts are equal.
        real_history: also make real-history pairs from history items that have a ``prompt``.
        truncated: what to do with a response cut at ``settings.max_new_tokens``: ``"drop"`` the pair,
            ``"trim"`` the response back to its last complete sentence (dropped if none is left), or
            ``"keep"`` it as it is.
        layer: the ``resid_post`` layer used for selection and de-duplication (default: middle).
        users_per_block: users whose insights and answers are batched together; the unit of work
            that ``repedit.scale`` hands to a worker (the same blocks give the same pairs).

    Returns:
        Every pair of the job (also those written by an earlier, interrupted run), in output order.
    """
    job = plan_job(model, users, prompts, k=k, settings=settings, templates=templates, near_duplicate=near_duplicate,
                   real_history=real_history, truncated=truncated, layer=layer, users_per_block=users_per_block)
    output = PairsOutput(Path(out) if out is not None else None, job.config_key)
    state = output.state
    # 3. Neutral answers, once per prompt (and per history prompt for real-history pairs).
    missing = [p for p in job.neutral_needed(users) if p not in state["neutral"]]
    for _, batch in tqdm(list(chunks(missing, settings.batch_size)), desc="neutral", unit="batch", disable=not progress):
        state["neutral"].update(neutral_answers(model, tokenizer, job, batch))
        output.save_state()
    blocks = [block for _, block in chunks(list(users), users_per_block)]
    for block in tqdm(blocks, desc="users", unit="block", disable=not progress):
        done = output.done
        if job.block_keys(block) <= done:
            continue
        user_block_pairs(model, tokenizer, job, block, state["neutral"], done=done, selected=state["selected"],
                         insights=state["insights"], sink=output.append_block)
    return list(output.pairs)


def read_pairs(path: str | Path) -> list[Pair]:
    """Read pairs you bring: JSONL or CSV with ``personalized``/``neutral`` or ``positive``/``negative``
    columns, plus optional ``user_id`` (default ``"default"``), ``prompt``, ``insights`` and ``source``.

    Errors name ``file:line`` and the missing field. Pairs written by :func:`generate` read back as is.
    """
    path = Path(path)
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        rows = [(f"{path}:{n}", row) for n, row in read_csv(path)]
    else:
        rows = [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]
    pairs = []
    for where, obj in rows:
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with 'personalized' and 'neutral' (or 'positive' and 'negative')")
        if "positive" in obj or "negative" in obj:
            positive, negative = obj.get("positive"), obj.get("negative")
            names = ("positive", "negative")
        else:
            positive, negative = obj.get("personalized"), obj.get("neutral")
            names = ("personalized", "neutral")
        for name, value in zip(names, (positive, negative)):
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{where}: missing or empty field {name!r} (expected 'personalized'/'neutral' or 'positive'/'negative')")
        pairs.append(Pair(
            _pair_user(obj.get("user_id"), where), str(obj.get("prompt") or ""), positive, negative,
            str(obj.get("insights") or ""), str(obj.get("source") or "user-provided"),
            obj.get("settings") if isinstance(obj.get("settings"), dict) else {},
        ))
    if not pairs:
        raise InputError(f"{path}: no pairs (the file is empty)")
    return pairs
