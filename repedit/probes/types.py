"""Typed results of probing: a :class:`Direction` (one vector) or a :class:`Subspace` (k orthonormal
vectors) per site, with metrics and provenance, saved as safetensors + JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputError, expect, load_tensors, read_json, save_tensors, write_json

FORMAT = "repedit.probes"
FORMAT_VERSION = 1


@dataclass
class Direction:
    """A unit direction in model space at one site.

    ``vector`` is ``[d_model]`` with unit norm, oriented so that personalised activations score higher
    than neutral ones. ``scale`` is the method's natural magnitude in model units (for difference of
    means: the norm of the mean difference), so ``scale * vector`` is a ready-made steering vector.
    ``metrics`` holds evaluation numbers (accuracy, control accuracy, selectivity, margin, ...);
    provenance is the method, site, model fingerprint, data hash and the user (``None`` = pooled).
    """

    vector: torch.Tensor
    site: str
    method: str
    scale: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)
    model_fingerprint: str = ""
    data_hash: str = ""
    user_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    kind = "direction"

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Projection of rows of ``x`` ``[n, d]`` on the direction: ``[n]``."""
        return x.to(self.vector.dtype) @ self.vector


@dataclass
class Subspace:
    """A k-dimensional subspace in model space at one site.

    ``basis`` is ``[k, d_model]`` with orthonormal rows; ``center`` ``[d_model]`` is the point the
    subspace is anchored at (the neutral mean for the CHAMELEON personalised subspace), and
    ``explained_variance`` the fraction of variance each basis vector explains.
    """

    basis: torch.Tensor
    site: str
    method: str
    center: torch.Tensor | None = None
    explained_variance: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    model_fingerprint: str = ""
    data_hash: str = ""
    user_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    kind = "subspace"

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Norm of the component of ``x - center`` inside the subspace: ``[n]``."""
        centred = x.to(self.basis.dtype) - (self.center if self.center is not None else 0)
        return (centred @ self.basis.T).norm(dim=-1)


Probe = Direction | Subspace


def _meta(probe: Probe) -> dict[str, Any]:
    common = {
        "kind": probe.kind, "site": probe.site, "method": probe.method, "metrics": probe.metrics,
        "model_fingerprint": probe.model_fingerprint, "data_hash": probe.data_hash, "user_id": probe.user_id,
        "extra": probe.extra,
    }
    if isinstance(probe, Direction):
        return {**common, "scale": probe.scale}
    return {**common, "explained_variance": probe.explained_variance, "has_center": probe.center is not None}


def save_probes(directory: str | Path, probes: Sequence[Probe]) -> Path:
    """Save probes to ``directory/probes.safetensors`` + ``directory/probes.json`` (atomically)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for index, probe in enumerate(probes):
        if isinstance(probe, Direction):
            tensors[f"{index}.vector"] = probe.vector.float()
        else:
            tensors[f"{index}.basis"] = probe.basis.float()
            if probe.center is not None:
                tensors[f"{index}.center"] = probe.center.float()
    save_tensors(directory / "probes.safetensors", tensors)
    write_json(directory / "probes.json", {"format": FORMAT, "version": FORMAT_VERSION, "probes": [_meta(p) for p in probes]})
    return directory


def _tensor(tensors: dict[str, torch.Tensor], name: str, ndim: int, where: str) -> torch.Tensor:
    """A finite ``ndim``-dimensional float tensor of ``tensors``, else an InputError. (No width check:
    a subspace may live in a reduced space, narrower than the model.)"""
    if name not in tensors:
        raise InputError(f"{where}: missing tensor {name!r}")
    value = tensors[name]
    if value.ndim != ndim or not value.is_floating_point():
        raise InputError(f"{where}: tensor {name!r} has shape {list(value.shape)} ({value.dtype}), expected a {ndim}-D float tensor")
    if not torch.isfinite(value).all():
        raise InputError(f"{where}: tensor {name!r} has NaN or infinite values")
    return value


def load_probes(directory: str | Path) -> list[Probe]:
    """Load probes saved by :func:`save_probes`; a damaged or mismatched file is an :class:`InputError`
    naming the file, the probe's index and the field."""
    directory = Path(directory)
    json_path, tensor_path = directory / "probes.json", directory / "probes.safetensors"
    manifest = read_json(json_path, dict)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{json_path}: not a repedit probes file (field 'format')")
    metas = expect(manifest.get("probes"), list, f"{json_path}: field 'probes'")
    tensors = load_tensors(tensor_path)
    probes: list[Probe] = []
    for index, meta in enumerate(metas):
        where = f"{json_path}: probes[{index}]"
        expect(meta, dict, where)
        for name, types in (("site", str), ("method", str), ("metrics", dict), ("model_fingerprint", str), ("data_hash", str),
                            ("user_id", (str, type(None))), ("kind", str)):
            expect(meta.get(name), types, f"{where}.{name}")
        common = dict(
            site=meta["site"], method=meta["method"], metrics=meta["metrics"], model_fingerprint=meta["model_fingerprint"],
            data_hash=meta["data_hash"], user_id=meta["user_id"], extra=expect(meta.get("extra", {}), dict, f"{where}.extra"),
        )
        if meta["kind"] == "direction":
            vector = _tensor(tensors, f"{index}.vector", 1, f"{tensor_path} (probe {index})")
            probes.append(Direction(vector=vector, scale=float(expect(meta.get("scale"), float, f"{where}.scale")), **common))
        elif meta["kind"] == "subspace":
            basis = _tensor(tensors, f"{index}.basis", 2, f"{tensor_path} (probe {index})")
            center = _tensor(tensors, f"{index}.center", 1, f"{tensor_path} (probe {index})") if f"{index}.center" in tensors else None
            variance = expect(meta.get("explained_variance"), list, f"{where}.explained_variance")
            probes.append(Subspace(basis=basis, center=center, explained_variance=variance, **common))
        else:
            raise InputError(f"{where}.kind: expected 'direction' or 'subspace', got {meta['kind']!r}")
    return probes


def probes_json(probes: Sequence[Probe]) -> str:
    """A JSON summary of probes (metadata only, no vectors) for reports."""
    return json.dumps([_meta(p) for p in probes], indent=2, sort_keys=True)


POOLED = "*"
_NON_FINITE = ("inf", "-inf", "nan")


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _unfinite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, str) and v in _NON_FINITE else v) for k, v in row.items()}


@dataclass(frozen=True)
class ProbeRow:
    """Cross-validated evaluation of one method at one site, for one user (``POOLED`` = all users).

    ``accuracy``: mean held-out accuracy over group-aware folds; ``control_accuracy``: the same with
    shuffled labels (the label swapped within each pair at random); ``selectivity`` = accuracy −
    control accuracy; ``margin``: held-out separation of the two classes' scores in pooled standard
    deviations (d′); ``n_pairs``: pairs evaluated; ``folds``: folds used.
    """

    site: str
    layer: int
    method: str
    user_id: str
    accuracy: float
    accuracy_std: float
    control_accuracy: float
    selectivity: float
    margin: float
    n_pairs: int
    folds: int


@dataclass
class ProbeReport:
    """Everything probing found: evaluation rows, probes fitted on all data, and the chosen sites.

    ``selected`` lists, best first, ``{"site", "method", "user_id", "selectivity", "accuracy", "margin"}``
    dicts chosen by :func:`repedit.probes.select_sites` (its docstring gives the tie-break).
    """

    rows: list[ProbeRow]
    probes: list[Probe]
    selected: list[dict[str, Any]]
    model_fingerprint: str
    data_hash: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The numbers as plain JSON; non-finite floats (a d′ of ±inf) become the strings "inf"/"-inf"/"nan",
        which strict JSON parsers accept and ``float()`` reads back."""
        from dataclasses import asdict

        return {
            "format": "repedit.probe_report", "version": FORMAT_VERSION, "model_fingerprint": self.model_fingerprint,
            "data_hash": self.data_hash, "settings": self.settings, "selected": [_finite(s) for s in self.selected],
            "rows": [_finite(asdict(r)) for r in self.rows],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` and the probes (``probes.safetensors`` + ``probes.json``) to ``directory``."""
        directory = Path(directory)
        save_probes(directory, self.probes)
        write_json(directory / "report.json", self.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ProbeReport":
        directory = Path(directory)
        path = directory / "report.json"
        data = read_json(path, dict)
        if data.get("format") != "repedit.probe_report":
            raise InputError(f"{path}: not a repedit probe report (field 'format')")
        rows = []
        for index, row in enumerate(expect(data.get("rows"), list, f"{path}: field 'rows'")):
            expect(row, dict, f"{path}: rows[{index}]")
            try:
                rows.append(ProbeRow(**_unfinite(row)))
            except TypeError as err:  # missing or unknown fields
                raise InputError(f"{path}: rows[{index}]: {err} (expected the fields of a ProbeRow)") from None
        selected = [expect(s, dict, f"{path}: selected[{i}]") for i, s in enumerate(expect(data.get("selected"), list, f"{path}: field 'selected'"))]
        return cls(
            rows=rows, probes=load_probes(directory), selected=[_unfinite(s) for s in selected],
            model_fingerprint=expect(data.get("model_fingerprint"), str, f"{path}: field 'model_fingerprint'"),
            data_hash=expect(data.get("data_hash"), str, f"{path}: field 'data_hash'"),
            settings=expect(data.get("settings", {}), dict, f"{path}: field 'settings'"),
        )
