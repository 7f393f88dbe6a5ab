"""Probe methods: small strategy objects that turn labelled activations into a direction or a subspace.

Every method is a frozen dataclass with a ``name``, a ``kind`` (``"direction"`` or ``"subspace"``)
and ``fit(x, labels, pair_ids)`` (also reachable by calling the object):

* ``x`` ``[n, d_model]`` activations (converted to float64),
* ``labels`` ``[n]`` 1 = personalised, 0 = neutral,
* ``pair_ids`` ``[n]``: the two members of a preference pair share a pair id.

A direction method returns a :class:`~repedit.probes.types.Direction` whose ``vector`` is a unit
vector in model space, oriented so that the personalised class scores higher (its class mean
projects higher than the neutral one), with ``scale`` = the distance between the class means along
that vector, ``(mean_pos - mean_neg) · vector`` in model units (for plain difference of means this
is ``‖Δμ‖``). A subspace method returns a :class:`~repedit.probes.types.Subspace`. The returned
probes carry ``method`` and the method's parameters (``extra["params"]``) but no site or provenance;
:func:`repedit.probes.probe_sites` fills those in.

Factories, steering-vectors style: :func:`logistic_regression`, :func:`diff_of_means`,
:func:`pca_of_differences`, :func:`svd_subspace`, :func:`ccs`; :data:`METHODS` maps names to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Union

import numpy as np
import torch

from ..io import InputError
from .types import Direction, Probe, Subspace

ArrayLike = Union[torch.Tensor, np.ndarray]


class ProbeMethod(Protocol):
    """What :func:`repedit.probes.evaluate_site` and :func:`repedit.probes.probe_sites` need of a method."""

    name: str
    kind: str

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Probe: ...

    def __call__(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Probe: ...


def _as_numpy(array: ArrayLike, dtype: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


def _inputs(x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert: ``x`` float64 ``[n, d]``, ``labels`` int ``[n]`` in {0, 1}, ``pair_ids`` int ``[n]``."""
    x_np = _as_numpy(x, np.float64)
    labels_np = _as_numpy(labels, np.int64)
    pair_np = _as_numpy(pair_ids, np.int64)
    if x_np.ndim != 2:
        raise InputError(f"activations must be [n_items, d_model], got shape {tuple(x_np.shape)}")
    n = x_np.shape[0]
    if labels_np.shape != (n,) or pair_np.shape != (n,):
        raise InputError(
            f"labels and pair_ids must be [n_items] = [{n}], got {tuple(labels_np.shape)} and {tuple(pair_np.shape)}"
        )
    if not np.isin(labels_np, (0, 1)).all():
        raise InputError("labels must be 0 (neutral) or 1 (personalised)")
    counts = np.bincount(labels_np, minlength=2)
    if counts.min() == 0:
        missing = "personalised (label 1)" if counts[1] == 0 else "neutral (label 0)"
        raise InputError(f"a probe needs both classes; there is no {missing} item among the {n} items")
    if not np.isfinite(x_np).all():
        raise InputError("activations contain NaN or inf")
    return x_np, labels_np, pair_np


def pair_index(labels: ArrayLike, pair_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the personalised and neutral member of each pair, pairs in ascending ``pair_id`` order.

    Returns ``(pos, neg)``, two int arrays ``[n_pairs]``. Raises :class:`~repedit.io.InputError` if a
    pair id does not have exactly one personalised (label 1) and one neutral (label 0) item.
    """
    labels_np = _as_numpy(labels, np.int64)
    pair_np = _as_numpy(pair_ids, np.int64)
    members: dict[int, list[int]] = {}
    for row, pair in enumerate(pair_np.tolist()):
        members.setdefault(pair, []).append(row)
    pos, neg = [], []
    for pair in sorted(members):
        rows = members[pair]
        found = sorted(labels_np[rows].tolist())
        if found != [0, 1]:
            raise InputError(
                f"pair_id {pair} has labels {found}: each pair needs exactly one personalised (label 1) and one "
                "neutral (label 0) item"
            )
        pos.append(rows[0] if labels_np[rows[0]] == 1 else rows[1])
        neg.append(rows[1] if labels_np[rows[0]] == 1 else rows[0])
    return np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64)


def _orient(vector: np.ndarray, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """Normalise ``vector`` and flip it so the personalised class mean projects higher.

    Returns ``(unit_vector, scale, flipped)`` with ``scale = (mean_pos - mean_neg) · unit_vector >= 0``.
    """
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise InputError("the probe found no direction (all-zero or non-finite weights); are the two classes identical?")
    unit = vector / norm
    delta = x[labels == 1].mean(0) - x[labels == 0].mean(0)
    scale = float(delta @ unit)
    flipped = scale < 0
    if flipped:
        unit, scale = -unit, -scale
    return unit, scale, flipped


def _direction(name: str, params: dict[str, Any], unit: np.ndarray, scale: float, **extra: Any) -> Direction:
    return Direction(vector=torch.from_numpy(unit.copy()), site="", method=name, scale=scale,
                     extra={"params": params, **extra})


@dataclass(frozen=True)
class LogisticRegressionMethod:
    """L2-regularised logistic regression (scikit-learn, lbfgs) on standardised features.

    Standardising puts every feature on the same footing for the penalty (residual streams have a few
    huge-variance dimensions). The scale is each feature's *within-class* standard deviation (a
    ``StandardScaler`` fitted on rows centred on their class mean): with the overall standard
    deviation, a strong personalisation signal would inflate the scale of exactly the features it
    lives in, and the penalty would then tilt the direction away from it (measured on planted data
    with a Gaussian direction: cosine ~0.85 instead of ~0.99). The weights are mapped back to model
    space by dividing by the scale (``w_model = w / scaler.scale_``), because a score
    ``w · (x - m) / s`` equals ``(w / s) · x`` plus a constant.
    """

    C: float = 1.0
    max_iter: int = 2000

    name = "logistic_regression"
    kind = "direction"

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Direction:
        """Fit on ``x`` ``[n, d]``; returns a unit :class:`Direction` in model space (see module docstring)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x_np, labels_np, _ = _inputs(x, labels, pair_ids)
        centred = x_np.copy()
        for label in (0, 1):
            centred[labels_np == label] -= centred[labels_np == label].mean(0)
        scaler = StandardScaler().fit(centred)  # scale_ = within-class std (1 where a feature is constant)
        features = (x_np - x_np.mean(0)) / scaler.scale_
        model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(features, labels_np)
        weights = model.coef_[0] / scaler.scale_
        unit, scale, _ = _orient(weights, x_np, labels_np)
        return _direction(self.name, asdict(self), unit, scale)

    __call__ = fit


@dataclass(frozen=True)
class DiffOfMeansMethod:
    """Difference of class means (mass-mean probe), optionally covariance-corrected.

    Plain: ``v = Δμ / ‖Δμ‖`` with ``Δμ = mean(personalised) - mean(neutral)``, ``scale = ‖Δμ‖``.
    With ``covariance=True``: ``v ∝ Σ⁻¹ Δμ`` (Fisher LDA direction), where ``Σ`` is the covariance of
    the within-class-centred rows (each row minus its class mean), shrunk towards a scaled identity
    because ``d_model`` is usually larger than the number of items: ``shrinkage="ledoit_wolf"``
    picks the amount with scikit-learn's Ledoit-Wolf estimator, a float ``α`` in [0, 1] uses
    ``(1-α) Σ + α tr(Σ)/d I`` (scikit-learn's ``ShrunkCovariance`` formula).
    """

    covariance: bool = False
    shrinkage: str | float = "ledoit_wolf"

    kind = "direction"

    @property
    def name(self) -> str:
        """``"diff_of_means"``, or ``"diff_of_means_cov"`` for the covariance-corrected variant."""
        return "diff_of_means_cov" if self.covariance else "diff_of_means"

    def __post_init__(self) -> None:
        if not (self.shrinkage == "ledoit_wolf" or (isinstance(self.shrinkage, (int, float)) and 0 <= self.shrinkage <= 1)):
            raise InputError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {self.shrinkage!r}")

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Direction:
        """Fit on ``x`` ``[n, d]``; returns a unit :class:`Direction` (see class docstring)."""
        x_np, labels_np, _ = _inputs(x, labels, pair_ids)
        delta = x_np[labels_np == 1].mean(0) - x_np[labels_np == 0].mean(0)
        if not self.covariance:
            unit, scale, _ = _orient(delta, x_np, labels_np)
            return _direction(self.name, asdict(self), unit, scale)
        from sklearn.covariance import ledoit_wolf_shrinkage

        centred = x_np.copy()
        for label in (0, 1):
            centred[labels_np == label] -= centred[labels_np == label].mean(0)
        if self.shrinkage == "ledoit_wolf":
            alpha = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
        else:
            alpha = float(self.shrinkage)
        weights = _shrunk_solve(centred, alpha, delta)
        unit, scale, _ = _orient(weights, x_np, labels_np)
        return _direction(self.name, asdict(self), unit, scale, shrinkage_used=alpha)

    __call__ = fit


def _shrunk_solve(centred: np.ndarray, alpha: float, vector: np.ndarray) -> np.ndarray:
    """``Σ⁻¹ vector`` for ``Σ = (1-α) S + α μ I``, ``S = CᵀC / n`` (``C`` = ``centred`` ``[n, d]``), ``μ = tr(S) / d``.

    With ``n < d`` this uses the Woodbury identity, an ``[n, n]`` solve instead of ``[d, d]``:
    ``Σ⁻¹ v = (v - Cᵀ (r n / (1-α) I + C Cᵀ)⁻¹ C v) / r`` with ``r = α μ``. Without shrinkage
    (``r = 0``) ``S`` is singular when ``n <= d``; the minimum-norm least-squares solution is used.
    """
    n, d = centred.shape
    ridge = alpha * float((centred ** 2).sum()) / (n * d)
    if ridge <= 0.0:
        return np.linalg.lstsq(centred.T @ centred / n, vector, rcond=None)[0]
    if alpha >= 1.0:
        return vector / ridge
    if n < d:
        inner = ridge * n / (1.0 - alpha) * np.eye(n) + centred @ centred.T
        return (vector - centred.T @ np.linalg.solve(inner, centred @ vector)) / ridge
    sigma = (1.0 - alpha) * (centred.T @ centred) / n + ridge * np.eye(d)
    return np.linalg.solve(sigma, vector)


@dataclass(frozen=True)
class PCAOfDifferencesMethod:
    """First principal component of paired differences (RepE "PCA" reader, Zou et al. 2023).

    For each pair (in ascending ``pair_id`` order) ``d_i = x_personalised - x_neutral``. As RepE does,
    each difference is multiplied by a random sign (``np.random.default_rng(seed).choice([-1.0, 1.0],
    size=n_pairs)``): without the flips the differences share a large common mean, which centring
    would remove together with the very direction we want; with the flips the mean is ~0 and the
    first component follows the axis along which the pairs differ. The flipped differences are
    centred, the first right singular vector is taken, and its sign is fixed with the labels (mean
    projection of personalised minus neutral > 0).
    """

    seed: int = 0

    name = "pca_of_differences"
    kind = "direction"

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Direction:
        """Fit on ``x`` ``[n, d]`` (paired); returns a unit :class:`Direction` (see class docstring)."""
        x_np, labels_np, pair_np = _inputs(x, labels, pair_ids)
        pos, neg = pair_index(labels_np, pair_np)
        if len(pos) < 2:
            raise InputError(f"pca_of_differences needs at least 2 pairs, got {len(pos)}")
        signs = np.random.default_rng(self.seed).choice([-1.0, 1.0], size=len(pos))
        diffs = (x_np[pos] - x_np[neg]) * signs[:, None]
        diffs -= diffs.mean(0)
        _, singular, vt = np.linalg.svd(diffs, full_matrices=False)
        explained = float(singular[0] ** 2 / (singular ** 2).sum()) if singular.sum() > 0 else 0.0
        unit, scale, _ = _orient(vt[0], x_np, labels_np)
        return _direction(self.name, asdict(self), unit, scale, explained_variance=explained)

    __call__ = fit


@dataclass(frozen=True)
class SVDSubspaceMethod:
    """CHAMELEON-style personalised subspace: SVD of the personalised rows centred on the neutral mean.

    ``P = x[personalised] - mean(x[neutral])``; the right singular vectors of ``P`` ordered by
    singular value span the subspace; ``k`` is the smallest number whose explained-variance fraction
    (``s_i² / Σ s²``) reaches ``variance``, capped at ``max_k`` and at the rank. ``center`` is the
    neutral mean, so :meth:`Subspace.score` measures how far a row departs from "neutral" inside the
    subspace.
    """

    variance: float = 0.9
    max_k: int = 16

    name = "svd_subspace"
    kind = "subspace"

    def __post_init__(self) -> None:
        if not 0 < self.variance <= 1:
            raise InputError(f"variance must be in (0, 1], got {self.variance}")
        if self.max_k < 1:
            raise InputError(f"max_k must be at least 1, got {self.max_k}")

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Subspace:
        """Fit on ``x`` ``[n, d]``; returns a :class:`Subspace` with ``basis`` ``[k, d]``, ``center`` ``[d]``."""
        x_np, labels_np, _ = _inputs(x, labels, pair_ids)
        center = x_np[labels_np == 0].mean(0)
        _, singular, vt = np.linalg.svd(x_np[labels_np == 1] - center, full_matrices=False)
        energy = singular ** 2
        if energy.sum() == 0:
            raise InputError("svd_subspace: every personalised row equals the neutral mean; there is no subspace")
        fractions = energy / energy.sum()
        rank = int((singular > singular[0] * 1e-10).sum())
        k = int(np.searchsorted(np.cumsum(fractions), self.variance - 1e-12) + 1)
        k = max(1, min(k, self.max_k, rank))
        return Subspace(
            basis=torch.from_numpy(vt[:k].copy()), site="", method=self.name, center=torch.from_numpy(center),
            explained_variance=[float(f) for f in fractions[:k]], extra={"params": asdict(self)},
        )

    __call__ = fit


@dataclass(frozen=True)
class CCSMethod:
    """Contrast-Consistent Search (Burns et al. 2022), unsupervised; labels only fix the final sign.

    Data: the two members of each pair are put in two slots A and B by row order, then swapped with
    probability 1/2 (``np.random.default_rng(seed)``): if slot A were always the personalised member,
    mean-normalising each slot (as CCS does, to remove what is common to a slot) would also remove
    the personalisation signal itself. Each slot is centred on its own mean and all rows are divided
    by one global scalar (RMS feature value 1; a scalar does not change the direction and makes
    ``weight_decay`` scale-free).

    Objective, as in the paper: a linear probe ``p(x) = sigmoid(w·x + b)`` with loss
    ``mean((p(A) - (1 - p(B)))²) + mean(min(p(A), p(B))²)`` (consistency + confidence), plus an
    explicit ``weight_decay · ‖w‖²``. Optimiser: full-batch L-BFGS for at most ``epochs``
    iterations, from ``n_restarts`` random initialisations (seeded), keeping the lowest objective.
    This deviates from the paper's AdamW on purpose: when the pairs are separable the loss has no
    finite minimiser, so the direction reached depends on the optimiser's path, and Adam's
    per-coordinate step normalisation pulls it towards sign patterns (a Gaussian planted direction
    comes out at cosine ~0.8); the ℓ2 penalty makes the optimum well defined and L-BFGS is
    rotation-equivariant. ``w`` is the direction in model space; its sign is then fixed with the
    labels. ``extra`` records ``loss`` (objective of the kept restart), ``restart_losses`` and
    ``sign_flipped`` (whether the label-based fix flipped the unsupervised solution).
    """

    n_restarts: int = 5
    epochs: int = 200
    weight_decay: float = 0.1
    seed: int = 0

    name = "ccs"
    kind = "direction"

    def __post_init__(self) -> None:
        if self.n_restarts < 1 or self.epochs < 1:
            raise InputError(f"ccs needs n_restarts >= 1 and epochs >= 1, got {self.n_restarts} and {self.epochs}")
        if self.weight_decay < 0:
            raise InputError(f"ccs weight_decay must be >= 0, got {self.weight_decay}")

    def fit(self, x: ArrayLike, labels: ArrayLike, pair_ids: ArrayLike) -> Direction:
        """Fit on ``x`` ``[n, d]`` (paired); returns a unit :class:`Direction` (see class docstring)."""
        x_np, labels_np, pair_np = _inputs(x, labels, pair_ids)
        pair_index(labels_np, pair_np)  # validates the pairing; the slots below do not look at labels
        members: dict[int, list[int]] = {}
        for row, pair in enumerate(pair_np.tolist()):
            members.setdefault(pair, []).append(row)
        slots = np.asarray([members[p] for p in sorted(members)], dtype=np.int64)  # [n_pairs, 2], row order
        if len(slots) < 2:
            raise InputError(f"ccs needs at least 2 pairs, got {len(slots)}")
        swap = np.random.default_rng(self.seed).random(len(slots)) < 0.5
        slots[swap] = slots[swap][:, ::-1]
        a, b = x_np[slots[:, 0]], x_np[slots[:, 1]]
        a, b = a - a.mean(0), b - b.mean(0)
        rms = float(np.sqrt((np.concatenate([a, b]) ** 2).mean()))
        if rms == 0.0:
            raise InputError("ccs: the two members of every pair are identical after normalisation")
        a_t, b_t = torch.from_numpy(a / rms), torch.from_numpy(b / rms)
        d = a_t.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        results: list[tuple[float, torch.Tensor]] = []
        for _ in range(self.n_restarts):
            weight = (torch.randn(d, generator=generator, dtype=torch.float64) / np.sqrt(d)).requires_grad_()
            bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.epochs, history_size=20,
                                          tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

            def objective() -> torch.Tensor:
                p_a = torch.sigmoid(a_t @ weight + bias)
                p_b = torch.sigmoid(b_t @ weight + bias)
                consistency = ((p_a - (1 - p_b)) ** 2).mean()
                confidence = (torch.minimum(p_a, p_b) ** 2).mean()
                return consistency + confidence + self.weight_decay * (weight @ weight)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            with torch.enable_grad():
                optimizer.step(closure)
            with torch.no_grad():
                results.append((float(objective()), weight.detach().clone()))
        best = min(range(len(results)), key=lambda i: results[i][0])
        raw = results[best][1].numpy()
        unit, scale, flipped = _orient(raw, x_np, labels_np)
        return _direction(self.name, asdict(self), unit, scale, loss=results[best][0],
                          restart_losses=[r[0] for r in results], sign_flipped=bool(flipped))

    __call__ = fit


def logistic_regression(C: float = 1.0, max_iter: int = 2000) -> LogisticRegressionMethod:
    """Logistic-regression probe (``C``: inverse L2 strength on standardised features)."""
    return LogisticRegressionMethod(C=C, max_iter=max_iter)


def diff_of_means(covariance: bool = False, shrinkage: str | float = "ledoit_wolf") -> DiffOfMeansMethod:
    """Difference-of-means probe; ``covariance=True`` gives the shrunk ``Σ⁻¹Δμ`` (LDA) direction."""
    return DiffOfMeansMethod(covariance=covariance, shrinkage=shrinkage)


def pca_of_differences(seed: int = 0) -> PCAOfDifferencesMethod:
    """RepE-style first principal component of sign-flipped paired differences."""
    return PCAOfDifferencesMethod(seed=seed)


def svd_subspace(variance: float = 0.9, max_k: int = 16) -> SVDSubspaceMethod:
    """CHAMELEON-style personalised subspace reaching ``variance`` explained variance (at most ``max_k`` vectors)."""
    return SVDSubspaceMethod(variance=variance, max_k=max_k)


def ccs(n_restarts: int = 5, epochs: int = 200, seed: int = 0, weight_decay: float = 0.1) -> CCSMethod:
    """Contrast-Consistent Search probe (unsupervised; labels only orient the result); ``epochs``: L-BFGS iterations."""
    return CCSMethod(n_restarts=n_restarts, epochs=epochs, weight_decay=weight_decay, seed=seed)


# Name -> factory with default settings, for the CLI and for ``probe_sites(methods=["diff_of_means", ...])``.
METHODS: dict[str, Callable[[], ProbeMethod]] = {
    "logistic_regression": logistic_regression,
    "diff_of_means": diff_of_means,
    "diff_of_means_cov": lambda: diff_of_means(covariance=True),
    "pca_of_differences": pca_of_differences,
    "svd_subspace": svd_subspace,
    "ccs": ccs,
}


def get_method(method: "str | ProbeMethod") -> ProbeMethod:
    """A method object from a :data:`METHODS` name (default settings) or a method object (returned as is)."""
    if isinstance(method, str):
        if method not in METHODS:
            raise InputError(f"unknown probe method {method!r}: choose one of {', '.join(METHODS)}")
        return METHODS[method]()
    if not (hasattr(method, "name") and callable(getattr(method, "fit", None))):
        raise InputError(f"{method!r} is not a probe method: expected a name from {', '.join(METHODS)} or a method object")
    return method
