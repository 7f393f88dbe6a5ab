"""Large users files through Ray Data: Parquet (a file or a folder of files) or JSONL, read in parallel blocks.

Rows are checked by the same rules as :func:`repedit.pairs.users.read_users` (errors name the file
and the row or line) and come back in file order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ..io import InputError
from ..pairs.users import MAX_HISTORY_ITEMS, MAX_TEXT_CHARS, InputCuts, User, parse_user
from .runtime import import_ray


def _plain(value: Any) -> Any:
    """Arrow/NumPy values of a Ray Data row as plain Python (lists, dicts, str, numbers, None)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def iter_users_dataset(path: str | Path, *, max_text_chars: int | None = MAX_TEXT_CHARS, max_items: int | None = MAX_HISTORY_ITEMS,
                       cuts: InputCuts | None = None) -> Iterator[User]:
    """Users of ``path`` one by one, read with Ray Data (needs a connected Ray, :func:`repedit.scale.ray_session`);
    the limits as :func:`repedit.pairs.users.read_users` (what they cut is recorded in ``cuts``)."""
    cuts = cuts if cuts is not None else InputCuts()
    ray = import_ray()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # users in file order, as read_users gives them
    parquet = path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")))
    if parquet:
        for number, row in enumerate(ray.data.read_parquet(str(path)).iter_rows(), start=1):
            yield parse_user(_plain(row), f"{path}: row {number}", max_text_chars, max_items, cuts)
        return
    for number, row in enumerate(ray.data.read_text(str(path), drop_empty_lines=False).iter_rows(), start=1):
        line = row["text"]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
        yield parse_user(obj, f"{path}:{number}", max_text_chars, max_items, cuts)


def read_users_dataset(path: str | Path, *, max_text_chars: int | None = MAX_TEXT_CHARS,
                       max_items: int | None = MAX_HISTORY_ITEMS) -> list[User]:
    """All users of a Parquet or JSONL users file (:func:`iter_users_dataset`); duplicate ids are an
    error; one warning names what the limits cut."""
    users: list[User] = []
    seen: set[str] = set()
    cuts = InputCuts()
    for user in iter_users_dataset(path, max_text_chars=max_text_chars, max_items=max_items, cuts=cuts):
        if user.user_id in seen:
            raise InputError(f"{path}: duplicate user_id {user.user_id!r}")
        seen.add(user.user_id)
        users.append(user)
    if not users:
        raise InputError(f"{path}: no users (the file is empty)")
    cuts.warn(path, max_text_chars, max_items)
    return users
