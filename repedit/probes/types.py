"""Typed results of probing: a :class:`Direction` (one vector) or a :class:`Subspace` (k orthonormal
vectors) per site, with metrics and provenance, saved as safetensors + JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputError, load_tensors, read_json, save_tensors, write_json

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


def load_probes(directory: str | Path) -> list[Probe]:
    """Load probes saved by :func:`save_probes`."""
    directory = Path(directory)
    manifest = read_json(directory / "probes.json")
    if manifest.get("format") != FORMAT:
        raise InputError(f"{directory / 'probes.json'}: not a repedit probes file (field 'format')")
    tensors = load_tensors(directory / "probes.safetensors")
    probes: list[Probe] = []
    for index, meta in enumerate(manifest["probes"]):
        common = dict(
            site=meta["site"], method=meta["method"], metrics=meta["metrics"], model_fingerprint=meta["model_fingerprint"],
            data_hash=meta["data_hash"], user_id=meta["user_id"], extra=meta.get("extra", {}),
        )
        if meta["kind"] == "direction":
            probes.append(Direction(vector=tensors[f"{index}.vector"], scale=meta["scale"], **common))
        else:
            probes.append(Subspace(
                basis=tensors[f"{index}.basis"], center=tensors.get(f"{index}.center"),
                explained_variance=meta["explained_variance"], **common,
            ))
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
        data = read_json(directory / "report.json")
        if data.get("format") != "repedit.probe_report":
            raise InputError(f"{directory / 'report.json'}: not a repedit probe report (field 'format')")
        return cls(
            rows=[ProbeRow(**_unfinite(r)) for r in data["rows"]], probes=load_probes(directory),
            selected=[_unfinite(s) for s in data["selected"]],
            model_fingerprint=data["model_fingerprint"], data_hash=data["data_hash"], settings=data.get("settings", {}),
        )
