"""Checking an edit read from disk before it is used: every JSON field's type, every tensor's name,
dtype, shape and values, and (given the model) its magnitude against the model's residual stream.

Rules (each failure is an :class:`~repedit.io.InputError` naming the file and the field):

* JSON: ``user_id`` a valid user id, ``model_fingerprint`` a string, ``d_model`` a positive integer,
  ``positions`` ``all``/``prompt``/``generated`` or an integer ≥ 0, ``method`` a string,
  ``provenance`` an object, ``edits`` a non-empty array of objects with ``site`` and ``operator``
  strings, finite numbers ``a``/``b``/``target``/``tau`` and a ``gate`` string; no other key.
* Tensors: only ``<i>.<field>`` for an existing edit ``i`` and a known field, floating point;
  ``vector`` and ``direction`` ``[d_model]``; ``basis`` and ``weight`` ``[k, d_model]`` with
  ``1 ≤ k ≤ d_model``; ``bias`` ``[k]``; every value finite and at most :data:`MAX_ABS_VALUE` in size
  (no model's residual stream comes near it).
* Magnitude (:func:`check_magnitudes`, when the model is known): the size of what an edit writes —
  ``|a|·‖v‖`` for ``add``/``gated_add``, ``|target|`` for ``clamp`` — relative to the model's
  residual scale (:func:`repedit.model.norms.residual_scale`); for the relative operators
  (``project_out``, ``chameleon``, ``lowrank``) the strengths themselves. **Refused** above
  :data:`REFUSE_RATIO` (100×: the stream is then the edit, the model's answers empty or gibberish);
  **warned** above :data:`WARN_RATIO` (10×; fluent steering sits at ~0.2–0.5×).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..io import InputError, check_user_id, expect, json_type_name

MAX_ABS_VALUE = 1e6
WARN_RATIO = 10.0
REFUSE_RATIO = 100.0
_ENTRY_NUMBERS = ("a", "b", "target", "tau")
_ENTRY_KEYS = {"site", "operator", "gate", *_ENTRY_NUMBERS}
_POSITIONS = ("all", "prompt", "generated")


def _fail(where: str, field: str, message: str, path: Path | None) -> InputError:
    return InputError(f"{where}: field {field!r}: {message}", path=path, field=field)


def check_meta(meta: Any, where: str, *, path: Path | None = None, extra_entry_keys: tuple[str, ...] = ()) -> dict:
    """Check the JSON half of an edit (rules in the module docstring); returns ``meta``."""
    expect(meta, dict, where, path=path)
    for name in ("user_id", "model_fingerprint"):
        expect(meta.get(name), str, f"{where}: field {name!r}", path=path, field=name)
    try:
        check_user_id(meta["user_id"])
    except InputError as err:
        raise _fail(where, "user_id", str(err), path) from None
    d_model = expect(meta.get("d_model"), int, f"{where}: field 'd_model'", path=path, field="d_model")
    if d_model < 1:
        raise _fail(where, "d_model", f"expected a positive integer, got {d_model}", path)
    positions = meta.get("positions")
    if not (positions in _POSITIONS or (type(positions) is int and positions >= 0)):
        raise _fail(where, "positions", f"expected one of {', '.join(_POSITIONS)} or an integer ≥ 0, got {json_type_name(positions)} {positions!r}", path)
    expect(meta.get("method", ""), str, f"{where}: field 'method'", path=path, field="method")
    expect(meta.get("provenance", {}), dict, f"{where}: field 'provenance'", path=path, field="provenance")
    entries = expect(meta.get("edits"), list, f"{where}: field 'edits'", path=path, field="edits")
    if not entries:
        raise _fail(where, "edits", "expected at least one site edit, got an empty array", path)
    allowed = _ENTRY_KEYS | set(extra_entry_keys)
    for i, entry in enumerate(entries):
        field = f"edits[{i}]"
        expect(entry, dict, f"{where}: field {field!r}", path=path, field=field)
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise _fail(where, field, f"unknown keys {unknown}; expected some of {sorted(allowed)}", path)
        for name in ("site", "operator"):
            expect(entry.get(name), str, f"{where}: field '{field}.{name}'", path=path, field=f"{field}.{name}")
        expect(entry.get("gate", "tanh"), str, f"{where}: field '{field}.gate'", path=path, field=f"{field}.gate")
        for name in _ENTRY_NUMBERS:
            if name in entry:
                value = expect(entry[name], float, f"{where}: field '{field}.{name}'", path=path, field=f"{field}.{name}")
                if not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
                    raise _fail(where, f"{field}.{name}", f"expected a finite number of size at most {MAX_ABS_VALUE:g}, got {value!r}", path)
    return meta


def check_tensors(tensors: dict[str, torch.Tensor], meta: dict, where: str, *, path: Path | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Check the tensors of an edit against its (checked) JSON; returns ``{edit index: {field: tensor}}``."""
    from .edit import TENSOR_FIELDS

    d_model, n_edits = meta["d_model"], len(meta["edits"])
    by_edit: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n_edits)}
    for name, tensor in tensors.items():
        index, _, field = name.partition(".")
        if not index.isdigit() or int(index) >= n_edits or field not in TENSOR_FIELDS:
            raise InputError(f"{where}: tensor {name!r} is not '<i>.<field>' for one of the {n_edits} edits (fields {', '.join(TENSOR_FIELDS)})",
                             path=path, field=name)
        by_edit[int(index)][field] = tensor
    for index, fields in by_edit.items():
        k = None
        for field in ("basis", "weight"):
            if field in fields and fields[field].ndim == 2:
                k = int(fields[field].shape[0])
                break
        for field, tensor in fields.items():
            name = f"{index}.{field}"
            expected = [d_model] if field in ("vector", "direction") else [k] if field == "bias" else [k if k is not None else "k", d_model]
            if list(tensor.shape) != expected or (k is not None and not 1 <= k <= d_model):
                shown = "[" + ", ".join(map(str, expected)) + "]"
                raise InputError(f"{where}: tensor {name!r} has shape {list(tensor.shape)}; expected {shown} (d_model {d_model}"
                                 f"{', k = rows of the basis, 1..d_model' if field != 'vector' and field != 'direction' else ''})", path=path, field=name)
            if not tensor.is_floating_point():
                raise InputError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; expected floating point", path=path, field=name)
            values = tensor.float()
            if not torch.isfinite(values).all():
                raise InputError(f"{where}: tensor {name!r} has NaN or inf values", path=path, field=name)
            largest = float(values.abs().max()) if values.numel() else 0.0
            if largest > MAX_ABS_VALUE:
                raise InputError(f"{where}: tensor {name!r} has a value of size {largest:.3g}; at most {MAX_ABS_VALUE:g} is expected "
                                 "(no model's residual stream is that large)", path=path, field=name)
    return by_edit


def build_edit(meta: dict, by_edit: dict[int, dict[str, torch.Tensor]], where: str, *, path: Path | None = None):
    """The :class:`~repedit.steering.edit.UserEdit` of checked JSON and tensors; a construction error
    (unknown operator, missing tensor, non-orthonormal basis) names the file."""
    from .edit import SiteEdit, UserEdit

    try:
        edits = [SiteEdit(**{k: v for k, v in entry.items() if k in _ENTRY_KEYS}, **by_edit[i]) for i, entry in enumerate(meta["edits"])]
        return UserEdit(meta["user_id"], edits, meta["model_fingerprint"], meta["d_model"], meta["positions"],
                        meta.get("method", ""), meta.get("provenance", {}))
    except InputError as err:
        raise InputError(f"{where}: {err}", path=path) from None


def check_magnitudes(edit, model, where: str = "") -> None:
    """Refuse (above :data:`REFUSE_RATIO`) or warn about (above :data:`WARN_RATIO`) an edit whose size is
    out of proportion with ``model``'s residual stream (rules in the module docstring)."""
    from ..model.norms import residual_scale

    scale = residual_scale(model)
    prefix = f"{where}: " if where else ""
    for site_edit in edit.edits:
        if site_edit.operator in ("add", "gated_add"):
            if scale is None:
                continue
            ratio, what = abs(site_edit.a) * float(site_edit.vector.norm()) / scale, "|a|·‖vector‖"
        elif site_edit.operator == "clamp":
            if scale is None:
                continue
            ratio, what = abs(site_edit.target) / scale, "|target|"
        else:
            ratio, what = max(abs(site_edit.a), abs(site_edit.b)), "the strength"
        unit = "× the model's residual norm" if site_edit.operator in ("add", "gated_add", "clamp") else "× the hidden state"
        message = (f"{prefix}user {edit.user_id!r}: the {site_edit.operator} edit at {site_edit.site} writes {ratio:.3g}{unit} "
                   f"({what}; residual scale {scale:.3g})" if scale is not None else
                   f"{prefix}user {edit.user_id!r}: the {site_edit.operator} edit at {site_edit.site} has {what} {ratio:.3g}")
        if ratio > REFUSE_RATIO:
            raise InputError(f"{message}; more than {REFUSE_RATIO:g}× is refused (the answers would be empty or gibberish)")
        if ratio > WARN_RATIO:
            warnings.warn(f"{message}; fluent steering is usually below 1×", stacklevel=3)


__all__ = ["MAX_ABS_VALUE", "REFUSE_RATIO", "WARN_RATIO", "build_edit", "check_magnitudes", "check_meta", "check_tensors"]
