"""GGUF control vectors: export additive edits for llama.cpp (``--control-vector``), import vectors made elsewhere.

The file, exactly as llama.cpp reads it (``llama_control_vector_load``) and as repeng's
``ControlVector.export_gguf`` and llama.cpp's ``cvector-generator`` write it:

* metadata ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model type,
  e.g. ``"llama"``) and ``controlvector.layer_count`` (the number of direction tensors — what both
  writers store; int32 as ``cvector-generator`` writes it, repeng writes uint32; llama.cpp reads neither);
* one tensor ``direction.N`` per edited layer: F32, 1-D, length ``n_embd`` (= ``d_model``); no other tensor.

**Where llama.cpp adds it.** ``direction.N`` is added to the *output of 0-based block N*, at every
token position (prompt and generated alike): repedit's ``resid_post.N`` = HF ``hidden_states[N+1]``
(see :mod:`repedit.model.sites`; measured against llama.cpp in ``shared/notes/environment-facts.md``).

**Which edits can be exported** (anything else is an :class:`~repedit.io.InputError` that says why):

* only ``add`` edits: a control vector is a fixed vector added to the stream, so projections,
  clamps, gates and CHAMELEON edits have no GGUF form;
* only ``positions="all"``: llama.cpp cannot restrict a vector to the prompt or to generated tokens;
* only the residual stream: ``resid_post.N`` → ``direction.N``, and ``resid_pre.L`` (the same place
  as ``resid_post.{L-1}``) → ``direction.{L-1}``; sub-layer sites (``attn_out``/``mlp_out``) are refused;
* **not block 0's output**: llama.cpp's loader rejects a tensor named ``direction.0`` ("invalid
  (zero) direction layer index" — its control-vector buffer starts at layer 1), so an edit at
  ``resid_post.0`` (= ``resid_pre.1``) cannot be expressed, and neither can ``resid_pre.0``
  (the embeddings, before any block). Every later block output can.

Two edits landing on the same ``N`` are summed (llama.cpp sums duplicates across files too).

**Strength.** Baked (default): ``direction.N = s · a · v`` (``a`` the edit's strength, ``s`` an
optional strength factor), used as ``--control-vector file.gguf``. Not baked: ``direction.N = v`` and
the file records the scale ``s · a`` (``repedit.scale``) to pass as ``--control-vector-scaled
file.gguf <scale>``; this needs one common ``a`` across the edit's sites.

Extra ``repedit.*`` metadata (model fingerprint, user id, method, scale) lets :func:`import_gguf`
restore the edit exactly; llama.cpp ignores metadata it does not know.

**Import** (:func:`import_gguf`) accepts files from repeng, llama.cpp's ``cvector-generator`` or
repedit: ``direction.N`` becomes an ``add`` edit at ``resid_post.N`` with strength 1 (or the
recorded scale of an unbaked repedit file). F16/F64 tensors are converted to float32. A
``direction.0`` is imported with a warning (repedit can apply it; llama.cpp would refuse the file).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, atomic_path
from ..model.sites import parse_site
from ..steering.edit import SiteEdit, UserEdit, check_model

ARCH = "controlvector"
_DIRECTION = re.compile(r"direction\.(\d+)")
_FLOAT_TYPES = {"F32", "F16", "F64"}


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote: ``layers`` (the ``N`` of each ``direction.N``) and ``scale``
    (the value for ``--control-vector-scaled``; 1.0 when the strength is baked in)."""

    path: Path
    layers: list[int]
    scale: float
    baked: bool

    def llama_cpp_flag(self) -> str:
        return f"--control-vector {self.path}" if self.baked else f"--control-vector-scaled {self.path} {self.scale:g}"


def _model_hint(fingerprint: str) -> str:
    # repedit fingerprints are "<model_type>-<16 hex>"; repeng's hint is the model type too.
    return fingerprint.rsplit("-", 1)[0] if "-" in fingerprint else fingerprint


def direction_layer(site: str, n_layers: int | None = None) -> int:
    """The ``N`` of the ``direction.N`` tensor that carries an ``add`` at ``site`` (rules in the module docstring).

    ``n_layers`` resolves negative layers (``resid_post.-1``); without it they are an error.
    """
    if n_layers is None and re.search(r"\.-\d+$|blocks\.-", str(site)):
        raise InputError(f"site {site!r} counts layers from the end: pass the model so that the layer can be resolved")
    parsed = parse_site(site, n_layers if n_layers is not None else 1 << 30)
    if parsed.kind == "resid_post":
        layer = parsed.layer
    elif parsed.kind == "resid_pre":
        if parsed.layer == 0:
            raise InputError(f"site {site!r} (the embeddings, before block 0) has no llama.cpp control-vector form: "
                             "llama.cpp adds direction.N to the output of block N only")
        layer = parsed.layer - 1
    else:
        raise InputError(f"site {site!r} is inside a block; llama.cpp control vectors only add to block outputs "
                         "(resid_post.N, or resid_pre.N+1): refit the edit at a resid_post site")
    if layer == 0:
        raise InputError(f"site {site!r} is the output of block 0, which a llama.cpp control vector cannot express: "
                         "llama.cpp rejects direction.0 (its control-vector layers start at 1); use resid_post.1 or later")
    return layer


def export_gguf(
    edit: UserEdit, path: str | Path, *, factor: float = 1.0, bake: bool = True, model=None,
) -> GGUFExport:
    """Write ``edit`` as a llama.cpp control vector (format and rules in the module docstring), atomically.

    Args:
        edit: a user's edit made only of ``add`` edits at block outputs, applied at every position.
        factor: strength factor ``s`` multiplying each edit's own strength ``a`` (as ``UserEdit * s``).
        bake: ``True`` writes ``s·a·v``; ``False`` writes ``v`` and records ``s·a`` for ``--control-vector-scaled``.
        model: optional; checks the edit was made for it and resolves negative layers.

    Returns:
        :class:`GGUFExport` with the written layers and the scale to use in llama.cpp.
    """
    import gguf

    n_layers = None
    if model is not None:
        from ..model.arch import get_adapter

        check_model(edit, model)
        n_layers = get_adapter(model).n_layers
    if edit.positions != "all":
        raise InputError(f"user {edit.user_id!r}: the edit applies at positions {edit.positions!r}, but llama.cpp adds a "
                         "control vector at every position; only positions='all' edits can be exported")
    for site_edit in edit.edits:
        if not site_edit.is_additive:
            raise InputError(f"user {edit.user_id!r} has a {site_edit.operator!r} edit at {site_edit.site}: only additive ('add') "
                             "edits can be exported to a GGUF control vector (llama.cpp only adds a fixed vector per layer)")
    strengths = {float(e.a) for e in edit.edits}
    if not bake and len(strengths) > 1:
        raise InputError(f"user {edit.user_id!r}: the sites have different strengths {sorted(strengths)}; one "
                         "--control-vector-scaled factor cannot express them: export with the strength baked in")
    directions: dict[int, torch.Tensor] = {}
    for site_edit in edit.edits:
        layer = direction_layer(site_edit.site, n_layers)
        vector = site_edit.vector.double() * (factor * site_edit.a if bake else 1.0)
        directions[layer] = directions[layer] + vector if layer in directions else vector
    scale = 1.0 if bake else float(factor * strengths.pop())
    path = Path(path)
    written = {layer: vector.float() for layer, vector in directions.items()}
    wrong = sorted(layer for layer, vector in written.items() if vector.numel() != edit.d_model)
    if wrong:
        raise InputError(f"user {edit.user_id!r}: direction.{wrong[0]} would have {written[wrong[0]].numel()} values, but the edit's d_model is "
                         f"{edit.d_model}: llama.cpp and repedit's import-gguf read only 1-D [n_embd] directions")
    check_directions(written, f"user {edit.user_id!r}: refusing to write {path}, which llama.cpp and import-gguf would reject")
    if model is not None:
        from ..steering.edit_files import check_magnitudes

        check_magnitudes(edit * factor if bake else edit * scale, model, f"export of user {edit.user_id!r}")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", _model_hint(edit.model_fingerprint))
        writer.add_int32(f"{ARCH}.layer_count", len(directions))
        writer.add_string("repedit.model_fingerprint", edit.model_fingerprint)
        writer.add_string("repedit.user_id", edit.user_id)
        writer.add_string("repedit.method", edit.method)
        writer.add_float64("repedit.scale", scale)
        writer.add_bool("repedit.baked", bake)
        for layer in sorted(directions):
            writer.add_tensor(f"direction.{layer}", written[layer].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFExport(path, sorted(directions), scale, bake)


def _field(reader, name: str):
    field = reader.get_field(name)
    return None if field is None or not field.types else field.contents()


def check_directions(directions: dict[int, torch.Tensor], where: str) -> None:
    """What llama.cpp's loader and :func:`read_gguf_directions` require of the ``direction.N`` tensors,
    checked on both sides (export and import): at least one, 1-D, one common length, finite values of
    size at most :data:`repedit.steering.edit_files.MAX_ABS_VALUE`."""
    from ..steering.edit_files import MAX_ABS_VALUE

    if not directions:
        raise InputError(f"{where}: no direction.N tensor")
    for layer, vector in directions.items():
        if vector.ndim != 1:
            raise InputError(f"{where}: direction.{layer} has shape {list(vector.shape)}; a control vector direction is 1-D [n_embd]")
        if not torch.isfinite(vector).all():
            raise InputError(f"{where}: direction.{layer} has NaN or inf values")
        if vector.numel() and float(vector.abs().max()) > MAX_ABS_VALUE:
            raise InputError(f"{where}: direction.{layer} has a value of size {float(vector.abs().max()):.3g}; at most {MAX_ABS_VALUE:g} is accepted")
    lengths = {int(v.numel()) for v in directions.values()}
    if len(lengths) > 1:
        raise InputError(f"{where}: direction tensors have different lengths {sorted(lengths)}")


def read_gguf_directions(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, object]]:
    """Read a GGUF control vector: ``({N: vector [d] float32}, metadata)``, checking the format.

    Raises :class:`InputError` for a file that is not a readable GGUF (truncated, random bytes after
    the magic), not a control vector, a tensor that is not ``direction.N``, a non-1-D or non-float
    tensor, unequal lengths, NaN/inf or huge values, or no tensor at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found", path=path)
    try:
        return _read_directions(path)
    except InputError:
        raise
    except Exception as err:  # gguf's reader indexes and memory-maps whatever the header claims
        raise InputError(f"{path}: not a readable GGUF file ({type(err).__name__}: {str(err)[:200]})", path=path) from None


def _read_directions(path: Path) -> tuple[dict[int, torch.Tensor], dict[str, object]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise InputError(f"{path}: general.architecture is {arch!r}, not {ARCH!r}: not a control-vector file", path=path)
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if not match:
            raise InputError(f"{path}: tensor {tensor.name!r} is not 'direction.N' (llama.cpp refuses such files)", path=path)
        type_name = gguf.GGMLQuantizationType(int(tensor.tensor_type)).name
        if type_name not in _FLOAT_TYPES:
            raise InputError(f"{path}: {tensor.name} has type {type_name}; control vectors are F32 (F16/F64 also read)", path=path)
        if len(tensor.shape) != 1:
            raise InputError(f"{path}: {tensor.name} has shape {list(tensor.shape)}; a control vector direction is 1-D [n_embd]", path=path)
        layer = int(match.group(1))
        if layer in directions:
            raise InputError(f"{path}: {tensor.name} appears twice", path=path)
        directions[layer] = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
    check_directions(directions, str(path))
    metadata = {name: _field(reader, name) for name in reader.fields if not name.startswith("GGUF.")}
    return directions, metadata


def import_gguf(path: str | Path, *, user_id: str | None = None, model=None, model_fingerprint: str | None = None) -> UserEdit:
    """Read a GGUF control vector (repeng, llama.cpp's ``cvector-generator`` or repedit) into a :class:`UserEdit`.

    ``direction.N`` becomes ``SiteEdit("resid_post.N", "add", vector)`` with ``positions="all"``.
    The edit is tied to ``model`` (its fingerprint; ``d_model`` and the layer range are checked), or
    to ``model_fingerprint``, or to the fingerprint a repedit-written file records; one of the three
    is needed because an edit only means something for one model. ``user_id`` defaults to the
    recorded one, else the file name.
    """
    path = Path(path)
    directions, metadata = read_gguf_directions(path)
    d_model = next(iter(directions.values())).numel()
    hint = metadata.get(f"{ARCH}.model_hint")
    if model is not None:
        from ..model.arch import get_adapter
        from ..model.loading import model_fingerprint as fingerprint_of

        adapter = get_adapter(model)
        if d_model != adapter.d_model:
            raise InputError(f"{path}: directions have length {d_model}, but the model has d_model {adapter.d_model}")
        beyond = sorted(n for n in directions if n >= adapter.n_layers)
        if beyond:
            raise InputError(f"{path}: direction.{beyond[0]} is beyond the model's {adapter.n_layers} layers "
                             "(llama.cpp ignores such tensors silently): is this vector for another model?")
        model_fingerprint = fingerprint_of(model)
        if isinstance(hint, str) and hint and hint not in (adapter.model_type, _model_hint(model_fingerprint)):
            warnings.warn(f"{path}: controlvector.model_hint is {hint!r}, the model is {adapter.model_type!r}", stacklevel=2)
    model_fingerprint = model_fingerprint or metadata.get("repedit.model_fingerprint")
    if not model_fingerprint:
        raise InputError(f"{path}: the file does not say which exact model it is for (model_hint {hint!r}): pass the model")
    if 0 in directions:
        warnings.warn(f"{path}: direction.0 (output of block 0) imported as resid_post.0; llama.cpp itself rejects direction.0", stacklevel=2)
    scale = 1.0
    if metadata.get("repedit.baked") is False and metadata.get("repedit.scale") is not None:
        scale = float(metadata["repedit.scale"])
    edits = [SiteEdit(f"resid_post.{n}", "add", vector=directions[n], a=scale) for n in sorted(directions)]
    user = user_id or metadata.get("repedit.user_id") or path.stem
    edit = UserEdit(
        str(user), edits, str(model_fingerprint), int(d_model), positions="all", method=str(metadata.get("repedit.method") or "gguf"),
        provenance={"source": "gguf", "file": path.name, "model_hint": hint},
    )
    if model is not None:
        from ..steering.edit_files import check_magnitudes

        check_magnitudes(edit, model, str(path))
    return edit
