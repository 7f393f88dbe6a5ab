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

**Input limits**, applied while reading, before any tokenising or generating (so a 10 MB history item
costs no more than a short one): a history item's ``text`` or ``prompt`` longer than
``max_text_chars`` (:data:`MAX_TEXT_CHARS`) is cut to that many characters, and a user with more than
``max_items`` (:data:`MAX_HISTORY_ITEMS`) history items keeps the latest ones — both with one warning
per file naming the first case; a prompt of the prompt set longer than ``max_chars``
(:data:`MAX_PROMPT_CHARS`) is refused (prompts key the pairs, so they are never changed silently).
``None`` lifts a limit. User ids must be valid store names (:func:`repedit.io.check_user_id`, matched in full).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

from ..io import InputError, check_user_id, read_jsonl, read_text

MAX_TEXT_CHARS = 4000
MAX_HISTORY_ITEMS = 1000
MAX_PROMPT_CHARS = 4000


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


class InputCuts:
    """Collects what the limits cut while a file is read, for one warning at the end."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.users: list[str] = []

    def text(self, value: str, limit: int | None, where: str) -> str:
        if limit is not None and len(value) > limit:
            self.texts.append(f"{where} ({len(value)} characters)")
            return value[:limit]
        return value

    def warn(self, path, max_text_chars: int | None, max_items: int | None) -> None:
        if self.texts:
            warnings.warn(f"{path}: {len(self.texts)} history texts/prompts longer than {max_text_chars} characters were truncated to it "
                          f"(first: {self.texts[0]}); set the limit with max_text_chars / --max-text-chars", stacklevel=3)
        if self.users:
            warnings.warn(f"{path}: {len(self.users)} users have more than {max_items} history items and keep only their latest {max_items} "
                          f"(first: {self.users[0]}); set the limit with max_items / --max-history-items", stacklevel=3)


def parse_user(obj: Any, where: str, max_text_chars: int | None = None, max_items: int | None = None, cuts: InputCuts | None = None) -> User:
    """One user from a parsed JSON object (format in the module docstring); errors start with ``where``;
    texts and items over the limits are cut and recorded in ``cuts``."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object for a user, got {type(obj).__name__}")
    user_id = obj.get("user_id")
    if user_id is None:
        raise InputError(f"{where}: missing field 'user_id'")
    if not isinstance(user_id, str) or not user_id.strip():
        raise InputError(f"{where}: field 'user_id' must be a non-empty string, got {user_id!r}", field="user_id")
    try:
        check_user_id(user_id)
    except InputError as err:
        raise InputError(f"{where}: field 'user_id': {err}", field="user_id") from None
    history = obj.get("history")
    if not isinstance(history, list):
        raise InputError(f"{where}: user {user_id!r}: field 'history' must be a list of items")
    if not history:
        raise InputError(f"{where}: user {user_id!r}: field 'history' is empty (at least one item is needed)")
    cuts = cuts or InputCuts()
    first = 0
    if max_items is not None and len(history) > max_items:
        first = len(history) - max_items
        cuts.users.append(f"{where} user {user_id!r}, {len(history)} items")
    items = []
    for index, item in enumerate(history[first:], start=first):
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
        text = cuts.text(text.strip(), max_text_chars, f"{where} user {user_id!r} history[{index}].text")
        prompt = cuts.text(prompt.strip(), max_text_chars, f"{where} user {user_id!r} history[{index}].prompt") if prompt else None
        items.append(HistoryItem(text, prompt, item.get("label"), rating, item.get("timestamp")))
    profile = obj.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise InputError(f"{where}: user {user_id!r}: field 'profile' must be a string")
    extra = {k: v for k, v in obj.items() if k not in ("user_id", "history", "profile")}
    return User(user_id, tuple(items), profile, extra)


def read_users(path: str | Path, *, max_text_chars: int | None = MAX_TEXT_CHARS, max_items: int | None = MAX_HISTORY_ITEMS) -> list[User]:
    """Read users from JSONL (format and limits in the module docstring); errors name ``file:line`` and the field."""
    users: list[User] = []
    seen: dict[str, int] = {}
    cuts = InputCuts()
    for line_number, obj in read_jsonl(path):
        where = f"{path}:{line_number}"
        user = parse_user(obj, where, max_text_chars, max_items, cuts)
        if user.user_id in seen:
            raise InputError(f"{where}: duplicate user_id {user.user_id!r} (first defined on line {seen[user.user_id]})")
        seen[user.user_id] = line_number
        users.append(user)
    if not users:
        raise InputError(f"{path}: no users (the file is empty)")
    cuts.warn(path, max_text_chars, max_items)
    return users


def read_prompts(path: str | Path, *, max_chars: int | None = MAX_PROMPT_CHARS) -> list[str]:
    """Read a prompt set: ``.jsonl`` (strings or objects with ``prompt``) or plain text, one per line.

    Duplicate prompts are an error (pairs are keyed by user and prompt); so is an empty file, and a
    prompt longer than ``max_chars`` (``None``: no limit).
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
        for line_number, line in enumerate(read_text(path).splitlines(), start=1):
            if line.strip():
                prompts.append((f"{path}:{line_number}", line.strip()))
    for where, prompt in prompts:
        if max_chars is not None and len(prompt) > max_chars:
            raise InputError(f"{where}: the prompt has {len(prompt)} characters, more than the limit of {max_chars}; "
                             "shorten it or raise the limit (max_chars / --max-prompt-chars)")
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
