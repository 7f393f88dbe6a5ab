"""User data and prompt sets: formats, readers with file:line errors, and the built-in demo data.

**Users JSONL** — one user per line::

    {"user_id": "emoji_emma",                      # required, unique, non-empty string
     "profile": "free text about the user",        # optional
     "history": [                                  # required, at least one item
        {"text": "what the user wrote",           # required, non-empty
         "prompt": "what it answered",            # optional: enables real-history (StyleVector) pairs
         "label": "liked", "rating": 5,           # optional
         "timestamp": "2026-01-08T19:44:00Z"}]}   # optional

**Prompt set** — a ``.txt`` file with one prompt per line, or JSONL where each line is a JSON string
or an object with a ``prompt`` field (an ``id`` field is kept if present).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..io import InputError, read_jsonl


@dataclass(frozen=True)
class HistoryItem:
    """One thing the user wrote, optionally with the prompt it answered and a label/rating."""

    text: str
    prompt: str | None = None
    label: Any = None
    rating: float | None = None
    timestamp: str | None = None


@dataclass(frozen=True)
class User:
    """A user: id, history items (oldest first as given) and an optional free-text profile."""

    user_id: str
    history: tuple[HistoryItem, ...]
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def parse_user(obj: Any, where: str) -> User:
    """One user from a parsed JSON object (format in the module docstring); errors start with ``where``."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object for a user, got {type(obj).__name__}")
    user_id = obj.get("user_id")
    if user_id is None:
        raise InputError(f"{where}: missing field 'user_id'")
    if not isinstance(user_id, str) or not user_id.strip():
        raise InputError(f"{where}: field 'user_id' must be a non-empty string, got {user_id!r}")
    history = obj.get("history")
    if not isinstance(history, list):
        raise InputError(f"{where}: user {user_id!r}: field 'history' must be a list of items")
    if not history:
        raise InputError(f"{where}: user {user_id!r}: field 'history' is empty (at least one item is needed)")
    items = []
    for index, item in enumerate(history):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise InputError(f"{where}: user {user_id!r}: history[{index}] must be an object with a 'text' field")
        text = item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: user {user_id!r}: history[{index}].text must be a non-empty string")
        prompt = item.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError(f"{where}: user {user_id!r}: history[{index}].prompt must be a non-empty string when given")
        rating = item.get("rating")
        if rating is not None and not isinstance(rating, (int, float)):
            raise InputError(f"{where}: user {user_id!r}: history[{index}].rating must be a number, got {rating!r}")
        items.append(HistoryItem(text.strip(), prompt.strip() if prompt else None, item.get("label"), rating, item.get("timestamp")))
    profile = obj.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise InputError(f"{where}: user {user_id!r}: field 'profile' must be a string")
    extra = {k: v for k, v in obj.items() if k not in ("user_id", "history", "profile")}
    return User(user_id, tuple(items), profile, extra)


def read_users(path: str | Path) -> list[User]:
    """Read users from JSONL (format in the module docstring); errors name ``file:line`` and the field."""
    users: list[User] = []
    seen: dict[str, int] = {}
    for line_number, obj in read_jsonl(path):
        where = f"{path}:{line_number}"
        user = parse_user(obj, where)
        if user.user_id in seen:
            raise InputError(f"{where}: duplicate user_id {user.user_id!r} (first defined on line {seen[user.user_id]})")
        seen[user.user_id] = line_number
        users.append(user)
    if not users:
        raise InputError(f"{path}: no users (the file is empty)")
    return users


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompt set: ``.jsonl`` (strings or objects with ``prompt``) or plain text, one per line.

    Duplicate prompts are an error (pairs are keyed by user and prompt); so is an empty file.
    """
    path = Path(path)
    prompts: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for line_number, obj in read_jsonl(path):
            where = f"{path}:{line_number}"
            prompt = obj.get("prompt") if isinstance(obj, dict) else obj
            if isinstance(obj, dict) and "prompt" not in obj:
                raise InputError(f"{where}: missing field 'prompt'")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: a prompt must be a non-empty string")
            prompts.append((where, prompt.strip()))
    else:
        if not path.exists():
            raise InputError(f"{path}: file not found")
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                prompts.append((f"{path}:{line_number}", line.strip()))
    if not prompts:
        raise InputError(f"{path}: the prompts file is empty (one prompt per line is expected)")
    seen: dict[str, str] = {}
    for where, prompt in prompts:
        if prompt in seen:
            raise InputError(f"{where}: duplicate prompt {prompt!r} (first on {seen[prompt]})")
        seen[prompt] = where
    return [prompt for _, prompt in prompts]


def demo_users_path() -> Path:
    """Path of the built-in demo users JSONL (8 invented users with clearly different styles)."""
    return Path(str(files("repedit").joinpath("data", "demo_users.jsonl")))


def demo_prompts_path() -> Path:
    """Path of the built-in neutral prompt set (40 everyday requests)."""
    return Path(str(files("repedit").joinpath("data", "demo_prompts.txt")))


def demo_users() -> list[User]:
    """The built-in demo users (see :func:`demo_users_path`)."""
    return read_users(demo_users_path())


def demo_prompts() -> list[str]:
    """The built-in neutral prompts (see :func:`demo_prompts_path`)."""
    return read_prompts(demo_prompts_path())


def split_history(users: list[User], n_test: int) -> tuple[list[User], list[tuple[str, HistoryItem]]]:
    """Hold out each user's last ``n_test`` history items that have a prompt, for evaluation.

    Returns ``(users without those items, [(user_id, held-out item), ...])``. Generate pairs and fit
    edits on the first list only; evaluate on the second (``repedit pairs --hold-out N`` and
    ``repedit eval --hold-out N`` use this same rule, so they agree on which items are unseen).
    A user must keep at least one item: fewer than ``n_test + 1`` items with a prompt is an error.
    """
    if n_test < 0:
        raise InputError(f"the number of held-out items must be ≥ 0, got {n_test}")
    kept_users: list[User] = []
    held_out: list[tuple[str, HistoryItem]] = []
    for user in users:
        with_prompt = [i for i, item in enumerate(user.history) if item.prompt is not None]
        if n_test and len(with_prompt) < n_test + 1:
            raise InputError(
                f"user {user.user_id!r} has {len(with_prompt)} history items with a prompt; holding out {n_test} needs at least {n_test + 1}"
            )
        test = set(with_prompt[len(with_prompt) - n_test:]) if n_test else set()
        held_out += [(user.user_id, user.history[i]) for i in sorted(test)]
        kept_users.append(replace(user, history=tuple(item for i, item in enumerate(user.history) if i not in test)))
    return kept_users, held_out
