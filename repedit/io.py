"""The reading and writing layer every stage uses: atomic writes, and readers of JSON, JSONL, CSV,
text and safetensors files whose every failure is an :class:`InputError` naming the file, the line or
field, and what was expected.

Every file repedit writes goes through :func:`atomic_path` (write to a temporary file in the same
directory, fsync, then ``os.replace``) so that a crash never leaves a half-written file where a good
one used to be; :func:`remove_stale_temps` deletes what an interrupted write left behind. Every file
repedit reads goes through :func:`read_text`, :func:`read_json`, :func:`read_jsonl`, :func:`read_csv`
or :func:`load_tensors`: truncated files, random bytes, invalid UTF-8 and unreadable paths become an
:class:`InputError` (never a ``UnicodeDecodeError``, ``SafetensorError`` or ``IsADirectoryError``);
:func:`expect` checks the JSON type of a field.
"""

from __future__ import annotations

import contextlib
import csv
import glob
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
    """Bad user input. The message names the problem: file, line, field, expected shape or model.

    ``path``, ``line`` and ``field`` (when known) are also kept as attributes, e.g. for the server to
    log the damaged file while its answer names only the user.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line, self.field = line, field


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
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # again: a writer that replaced the file (safetensors) made it 0600
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


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left next to ``path`` when a write was killed
    before its rename (``.<name>.<random>.tmp``); returns what was deleted. Call it only where no other
    process writes ``path`` at the same time."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found", path=path) from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a file", path=path) from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})", path=path) from None


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text of ``data``; invalid bytes are an error naming ``file:line:column``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputError(f"{path}:{line}:{column}: invalid UTF-8 (byte 0x{data[err.start]:02x}); expected a UTF-8 text file",
                         path=path, line=line) from None


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file (a leading BOM is dropped); errors name the file (and line for bad UTF-8)."""
    path = Path(path)
    text = _decode(_read_bytes(path), path)
    return text[1:] if text.startswith("\ufeff") else text


def read_json(path: str | os.PathLike, expected: type | tuple[type, ...] | None = None) -> Any:
    """Read a JSON file; a parse error names the file, line and column. With ``expected``, the top-level
    value must be of that JSON type (``dict``, ``list``)."""
    path = Path(path)
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}", path=path, line=err.lineno) from None
    except (ValueError, RecursionError) as err:  # 4300-digit ints, absurd nesting
        raise InputError(f"{path}: invalid JSON ({type(err).__name__}: {str(err)[:200]})", path=path) from None
    if expected is not None:
        expect(obj, expected, f"{path}", path=path)
    return obj


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}


def json_type_name(value: Any) -> str:
    """The JSON name of ``value``'s type (``object``, ``array``, ``string``, ...), for error messages."""
    for kind, name in _JSON_NAMES.items():
        if type(value) is kind:
            return name.split(" ", 1)[-1]  # "null", "true/false" have no article
    return type(value).__name__


def expect(value: Any, types: type | tuple[type, ...], where: str, *, path: str | os.PathLike | None = None,
           line: int | None = None, field: str | None = None) -> Any:
    """Return ``value`` if it has one of the JSON ``types`` (``bool`` is not a number; ``int`` counts as
    ``float``), else raise :class:`InputError` ``"<where>: expected <types>, got <type>"``."""
    kinds = types if isinstance(types, tuple) else (types,)
    ok = any(
        (type(value) is bool) if kind is bool
        else (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float
        else (isinstance(value, int) and not isinstance(value, bool)) if kind is int
        else value is None if kind is type(None)
        else isinstance(value, kind)
        for kind in kinds
    )
    if not ok:
        wanted = " or ".join(_JSON_NAMES.get(kind, kind.__name__) for kind in kinds)
        raise InputError(f"{where}: expected {wanted}, got {json_type_name(value)} {_short(value)}", path=path, line=line, field=field)
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies are made as needed)."""
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU; a truncated or damaged file is an :class:`InputError` naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found", path=path)
    if not path.is_file():
        raise InputError(f"{path}: is not a file, expected a safetensors file", path=path)
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError, OSError, ...: the file is not what a save wrote
        raise InputError(f"{path}: not a readable safetensors file ({type(err).__name__}: {str(err)[:200]})", path=path) from None


def read_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read lazily (only that tensor's bytes); a missing, truncated or
    damaged file, or a missing tensor, is an :class:`InputError` naming the file and the tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected a safetensors file", path=path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            if name not in handle.keys():
                raise InputError(f"{path}: no tensor {name!r} (it has {', '.join(sorted(handle.keys())[:8])})", path=path, field=name)
            return handle.get_tensor(name)
    except InputError:
        raise
    except Exception as err:  # SafetensorError, OSError, ...: the file is not what a save wrote
        raise InputError(f"{path}: not a readable safetensors file ({type(err).__name__}: {str(err)[:200]})", path=path) from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based line numbers).

    A malformed line raises :class:`InputError` naming ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found", path=path)
    if not path.is_file():
        raise InputError(f"{path}: is not a file, expected a JSONL file", path=path)
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, line_number)
            if line_number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno})", path=path, line=line_number) from None
            except (ValueError, RecursionError) as err:
                raise InputError(f"{path}:{line_number}: invalid JSON ({str(err)[:200]})", path=path, line=line_number) from None


def read_csv(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` of a CSV file with a header row; bad UTF-8 or CSV names ``file:line``."""
    path = Path(path)
    text = read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for row in reader:
            if None in row:  # more cells than the header has columns
                raise InputError(f"{path}:{reader.line_num}: {len(row) - 1 + len(row[None])} cells, but the header has {len(reader.fieldnames)} columns",
                                 path=path, line=reader.line_num)
            yield reader.line_num, dict(row)
    except csv.Error as err:
        raise InputError(f"{path}:{reader.line_num}: invalid CSV ({err})", path=path, line=reader.line_num) from None


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
