"""Small I/O helpers shared by every stage: atomic writes, JSON, JSONL with file:line errors.

Every file repedit writes goes through :func:`atomic_write` (write to a temporary file in the same
directory, fsync, then ``os.replace``) so that a crash never leaves a half-written file where a good
one used to be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad user input. The message names the problem: file, line, field, expected shape or model."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` atomically.

    On an exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies are made as needed)."""
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    return load_file(str(path))


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based line numbers).

    A malformed line raises :class:`InputError` naming ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno})") from None


def sha256_of(obj: Any) -> str:
    """Stable SHA-256 hex digest of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# Matched with fullmatch: "$" would also accept a trailing newline ("alice\n").
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_user_id(user_id: str) -> str:
    """Return ``user_id`` if it can be a file name in a store (no separators, no traversal), else raise."""
    shown = repr(user_id if not isinstance(user_id, str) or len(user_id) <= 64 else user_id[:64] + "...")  # error messages stay short
    if isinstance(user_id, str) and (control := next((c for c in user_id if c.isspace() or not c.isprintable()), None)) is not None:
        raise InputError(f"user id {shown} is not valid: it contains the control or space character U+{ord(control):04X}")
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id) or user_id in (".", ".."):
        raise InputError(f"user id {shown} is not valid: use 1-128 letters, digits, '_', '.', '-', starting with a letter or digit")
    if user_id.endswith((".json", ".safetensors")):  # an edit's files are <id>.json + <id>.safetensors
        raise InputError(f"user id {shown} is not valid: it cannot end in .json or .safetensors")
    return user_id
