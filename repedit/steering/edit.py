"""Per-user edits: :class:`SiteEdit` (one operator at one site) and :class:`UserEdit` (a user's edits
across sites, with positions, provenance, arithmetic and safetensors + JSON persistence).

Index convention: sites use repedit's names (``resid_post.L`` is the output of 0-based block ``L``,
HF ``hidden_states[L+1]``, llama.cpp ``direction.L``); it is stored in every saved edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..io import InputError, load_tensors, read_json, save_tensors, write_json
from .operators import GATES, OPERATORS

if TYPE_CHECKING:
    from .apply import SteeringHandle

FORMAT = "repedit.user_edit"
FORMAT_VERSION = 1
INDEX_CONVENTION = "resid_post.L = output of 0-based block L = HF hidden_states[L+1] = llama.cpp direction.L"
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")

# Which tensors each operator needs.
_NEEDS = {
    "add": ("vector",),
    "project_out": (),  # direction or basis
    "chameleon": ("basis", "direction"),
    "clamp": ("direction",),
    "gated_add": ("vector",),
    "lowrank": ("basis", "weight", "bias"),
}
TENSOR_FIELDS: tuple[str, ...] = ("vector", "direction", "basis", "weight", "bias")


@dataclass(frozen=True)
class SiteEdit:
    """One operator at one site (formulas in :mod:`repedit.steering.operators`).

    ``vector`` ``[d]`` is in model units; ``direction`` ``[d]`` is normalised on construction;
    ``basis`` ``[k, d]`` must have orthonormal rows. ``a``/``b`` are strengths, ``target`` the clamp
    value, ``tau`` the gate temperature (model units), ``gate`` ``"tanh"`` or ``"relu"``. The
    ``lowrank`` operator reads ``basis`` (R), ``weight`` (W, ``[k, d]``) and ``bias`` (β, ``[k]``).
    """

    site: str
    operator: str
    vector: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    a: float = 1.0
    b: float = 1.0
    target: float = 0.0
    tau: float = 1.0
    gate: str = "tanh"
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise InputError(f"unknown operator {self.operator!r} at {self.site}: expected one of {', '.join(OPERATORS)}")
        if self.gate not in GATES:
            raise InputError(f"unknown gate {self.gate!r}: expected one of {', '.join(GATES)}")
        for name in _NEEDS[self.operator]:
            if getattr(self, name) is None:
                raise InputError(f"operator {self.operator!r} at {self.site} needs a {name}")
        if self.operator == "project_out" and self.direction is None and self.basis is None:
            raise InputError(f"operator 'project_out' at {self.site} needs a direction or a basis")
        if self.operator == "gated_add" and self.direction is None:
            object.__setattr__(self, "direction", self.vector)
        if self.direction is not None:
            norm = self.direction.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise InputError(f"the direction at {self.site} is zero or not finite")
            object.__setattr__(self, "direction", (self.direction / norm).float())
        if self.basis is not None:
            basis = self.basis.float()
            gram = basis @ basis.T
            if basis.ndim != 2 or not torch.allclose(gram, torch.eye(basis.shape[0]), atol=1e-4):
                raise InputError(f"the basis at {self.site} must be [k, d] with orthonormal rows")
            object.__setattr__(self, "basis", basis)
        if self.vector is not None:
            if not torch.isfinite(self.vector).all():
                raise InputError(f"the vector at {self.site} has NaN or inf values")
            object.__setattr__(self, "vector", self.vector.float())
        if self.operator == "lowrank":
            k, d = self.basis.shape
            if tuple(self.weight.shape) != (k, d) or tuple(self.bias.shape) != (k,):
                raise InputError(f"the lowrank edit at {self.site} needs weight [{k}, {d}] and bias [{k}] next to its basis [{k}, {d}], "
                                 f"got weight {list(self.weight.shape)} and bias {list(self.bias.shape)}")
            if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
                raise InputError(f"the lowrank edit at {self.site} has NaN or inf values")
            object.__setattr__(self, "weight", self.weight.float())
            object.__setattr__(self, "bias", self.bias.float())

    @property
    def d_model(self) -> int:
        for tensor in (self.vector, self.direction):
            if tensor is not None:
                return int(tensor.shape[-1])
        return int(self.basis.shape[-1])

    @property
    def is_additive(self) -> bool:
        """True for edits that add a fixed vector (``add``): those can be summed, scaled and exported."""
        return self.operator == "add"


@dataclass
class UserEdit:
    """A user's edit: one or more :class:`SiteEdit`, where in the sequence it applies, and provenance.

    ``positions``: ``"all"`` tokens, ``"prompt"`` tokens only, ``"generated"`` tokens only, or an
    ``int`` n = every token at position ≥ n (positions count each row's own tokens, padding excluded).
    ``model_fingerprint``/``d_model`` identify the model it was fitted on; :meth:`apply` refuses
    another model.
    """

    user_id: str
    edits: list[SiteEdit]
    model_fingerprint: str
    d_model: int
    positions: str | int = "all"
    method: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.edits:
            raise InputError(f"user {self.user_id!r}: an edit needs at least one site edit")
        if not (self.positions in POSITIONS or (isinstance(self.positions, int) and not isinstance(self.positions, bool) and self.positions >= 0)):
            raise InputError(f"positions must be one of {', '.join(POSITIONS)} or a token index ≥ 0, got {self.positions!r}")
        for edit in self.edits:
            if edit.d_model != self.d_model:
                raise InputError(f"user {self.user_id!r}: the edit at {edit.site} has d_model {edit.d_model}, expected {self.d_model}")

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(e.site for e in self.edits))

    # ----------------------------------------------------------------- arithmetic (additive edits)

    def _additive(self, what: str) -> dict[str, SiteEdit]:
        by_site: dict[str, SiteEdit] = {}
        for edit in self.edits:
            if not edit.is_additive:
                raise InputError(f"{what} needs additive ('add') edits; user {self.user_id!r} has {edit.operator!r} at {edit.site}")
            if edit.site in by_site:
                raise InputError(f"{what}: user {self.user_id!r} has two edits at {edit.site}")
            by_site[edit.site] = edit
        return by_site

    def _combine(self, other: "UserEdit", sign: float) -> "UserEdit":
        if other.model_fingerprint != self.model_fingerprint:
            raise InputError(f"cannot combine edits of different models ({self.model_fingerprint} vs {other.model_fingerprint})")
        mine, theirs = self._additive("+/-"), other._additive("+/-")
        sites = list(dict.fromkeys(list(mine) + list(theirs)))
        zero = torch.zeros(self.d_model)
        edits = [
            SiteEdit(site, "add", vector=(mine[site].a * mine[site].vector if site in mine else zero)
                     + sign * (theirs[site].a * theirs[site].vector if site in theirs else zero), a=1.0)
            for site in sites
        ]
        return replace(self, edits=edits, user_id=self.user_id, method=f"({self.method}{'+' if sign > 0 else '-'}{other.method})")

    def __add__(self, other: "UserEdit") -> "UserEdit":
        return self._combine(other, 1.0)

    def __sub__(self, other: "UserEdit") -> "UserEdit":
        return self._combine(other, -1.0)

    def __mul__(self, factor: float) -> "UserEdit":
        """Scale every edit's main strength (``a`` for add/chameleon/gated_add/lowrank, ``b`` for project_out)."""
        scaled = []
        for edit in self.edits:
            if edit.operator == "project_out":
                scaled.append(replace(edit, b=edit.b * factor))
            elif edit.operator == "clamp":
                scaled.append(replace(edit, target=edit.target * factor))
            else:
                scaled.append(replace(edit, a=edit.a * factor))
        return replace(self, edits=scaled)

    __rmul__ = __mul__

    def __neg__(self) -> "UserEdit":
        return self * -1.0

    def normalized(self) -> "UserEdit":
        """Vectors rescaled to unit norm, strengths unchanged: a strength then means the same in model
        units at every site and for every user."""
        return replace(self, edits=[
            replace(e, vector=e.vector / e.vector.norm().clamp_min(1e-12)) if e.vector is not None else e for e in self.edits
        ])

    # ----------------------------------------------------------------- application

    def apply(self, model) -> "SteeringHandle":
        """Hook this edit into ``model`` for every row; use as ``with edit.apply(model): model.generate(...)``.

        Returns a :class:`~repedit.steering.apply.SteeringHandle` (also usable without ``with``:
        call ``handle.remove()``). Refuses a model with another fingerprint or ``d_model``.
        """
        from .apply import steer

        return steer(model, [self], None)

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Save as ``<path>.safetensors`` + ``<path>.json`` (``path`` without suffix), atomically."""
        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for index, edit in enumerate(self.edits):
            entry = {"site": edit.site, "operator": edit.operator, "a": edit.a, "b": edit.b, "target": edit.target, "tau": edit.tau, "gate": edit.gate}
            for name in TENSOR_FIELDS:
                tensor = getattr(edit, name)
                if tensor is not None:
                    tensors[f"{index}.{name}"] = tensor
            entries.append(entry)
        save_tensors(base.with_name(base.name + ".safetensors"), tensors)
        write_json(base.with_name(base.name + ".json"), {
            "format": FORMAT, "version": FORMAT_VERSION, "user_id": self.user_id, "model_fingerprint": self.model_fingerprint,
            "d_model": self.d_model, "positions": self.positions, "method": self.method, "provenance": self.provenance,
            "index_convention": INDEX_CONVENTION, "edits": entries,
        })
        return base

    @classmethod
    def load(cls, path: str | Path, model=None) -> "UserEdit":
        """Load an edit saved by :meth:`save`, checking every field and tensor
        (:mod:`repedit.steering.edit_files`). With ``model``, check it is the model the edit was made
        for and that its magnitude is in proportion with the model's residual stream."""
        from .edit_files import build_edit, check_magnitudes, check_meta, check_tensors

        path = Path(path)
        base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
        json_path, tensor_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")
        meta = read_json(json_path, dict)
        if meta.get("format") != FORMAT:
            raise InputError(f"{json_path}: not a repedit user edit (field 'format' is {meta.get('format')!r}, expected {FORMAT!r})", path=json_path, field="format")
        check_meta(meta, str(json_path), path=json_path)
        by_edit = check_tensors(load_tensors(tensor_path), meta, str(tensor_path), path=tensor_path)
        edit = build_edit(meta, by_edit, str(base), path=json_path)
        if model is not None:
            check_model(edit, model)
            check_magnitudes(edit, model, str(base))
        return edit


def check_model(edit: UserEdit, model) -> None:
    """Raise :class:`InputError` when ``edit`` was made for another model (fingerprint or ``d_model``)."""
    from ..model.arch import get_adapter
    from ..model.loading import model_fingerprint

    d_model = get_adapter(model).d_model
    if edit.d_model != d_model:
        raise InputError(f"edit for user {edit.user_id!r} has d_model {edit.d_model}, but the model has d_model {d_model}")
    fingerprint = model_fingerprint(model)
    if edit.model_fingerprint != fingerprint:
        raise InputError(
            f"edit for user {edit.user_id!r} was made for model {edit.model_fingerprint}, not for this model ({fingerprint}); "
            "refit it on this model"
        )


def ablation(direction: torch.Tensor, model, *, user_id: str = "ablation", strength: float = 1.0) -> UserEdit:
    """Directional ablation (Arditi et al. 2024): remove ``direction`` from every residual-stream write.

    Projects the direction out of ``resid_pre.0`` (the embeddings) and out of every ``attn_out.L`` and
    ``mlp_out.L``, so that no layer can write it back.
    """
    from ..model.arch import get_adapter
    from ..model.loading import model_fingerprint

    adapter = get_adapter(model)
    sites = ["resid_pre.0"] + [f"{kind}.{layer}" for layer in range(adapter.n_layers) for kind in ("attn_out", "mlp_out")]
    edits = [SiteEdit(site, "project_out", direction=direction, b=strength) for site in sites]
    return UserEdit(user_id, edits, model_fingerprint(model), adapter.d_model, method="ablation")
