"""Per-user vector store: a directory of per-user edits that users can copy.

Layout (the one :func:`repedit.steering.save_edits` writes, so a ``repedit fit`` output directory is
a store): ``<user_id>.safetensors`` + ``<user_id>.json`` per user and an ``index.json``.

This module holds the read side (``list_users``/``has``/``get``); the memory operations of the
Export-and-serve issue (add, update, forget, compress) extend :class:`VectorStore` without changing it.
"""

from __future__ import annotations

from pathlib import Path

from .io import InputError, check_user_id, read_json
from .steering.edit import UserEdit

class UnknownUserError(KeyError):
    """The store has no edit for this user."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "unknown user"


class VectorStore:
    """A directory of per-user edits.

    Args:
        directory: the store's directory; it must exist and hold an ``index.json``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not (self.directory / "index.json").is_file():
            raise InputError(f"{self.directory}: not a vector store (no index.json); create one with `repedit fit` or `repedit store add`")

    def _index(self) -> dict:
        return read_json(self.directory / "index.json")

    def list_users(self) -> list[str]:
        """User ids in the store, sorted."""
        return sorted(self._index().get("users", []))

    def has(self, user_id: str) -> bool:
        return check_user_id(user_id) in self.list_users()

    def get(self, user_id: str, model=None) -> UserEdit:
        """The user's :class:`UserEdit`; with ``model``, checked against it (fingerprint, ``d_model``).

        Raises :class:`UnknownUserError` (a ``KeyError``) when the store has no such user.
        """
        if not self.has(user_id):
            raise UnknownUserError(f"no steering edit for user {user_id!r} in {self.directory}")
        return UserEdit.load(self.directory / user_id, model=model)
