"""Cross-validated probing: group-aware folds, a shuffled-label control, and site selection.

Why group-aware: the two members of a pair, and different pairs written for the same prompt, share
most of their representation. If any of them were on both sides of a split, a probe could score
well by recognising prompts instead of personalisation. :func:`group_kfold` therefore splits by
prompt (``PairData.groups``), merged with ``pair_id`` so that the two members of a pair can never be
separated even if their prompts differ.

Why a control: with ``d_model`` much larger than the number of pairs, a flexible probe can separate
almost anything. The control runs the same pipeline with each pair's labels swapped at random;
``selectivity = accuracy - control_accuracy`` says how much of the accuracy is due to the real
labels (Hewitt & Liang 2019 use the same idea with control tasks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import torch

from ..capture.activations import Activations
from ..io import InputError
from ..model.sites import site_layer
from .data import PairData
from .methods import ProbeMethod, get_method, pair_index
from .types import POOLED, Direction, Probe, ProbeReport, ProbeRow, Subspace

DEFAULT_METHODS: tuple[str, ...] = ("diff_of_means", "logistic_regression", "pca_of_differences", "svd_subspace")
"""Methods :func:`probe_sites` runs by default (CCS is left out: it trains ``n_restarts`` probes per fold)."""

TIE_TOLERANCE = 0.01
"""Selectivities within this of the best count as tied in :func:`select_sites`."""


def check_same_model(*acts: Activations) -> str:
    """Check that all activations were captured from the same model; return its fingerprint.

    Raises :class:`~repedit.io.InputError` naming the two models (name and fingerprint) otherwise:
    directions from different models live in unrelated spaces and must never be mixed.
    """
    if not acts:
        raise InputError("no activations given")
    first = acts[0]
    for index, other in enumerate(acts[1:], start=1):
        if other.model_fingerprint != first.model_fingerprint:
            raise InputError(
                f"activations come from different models: #0 is {first.model_name or '?'} (fingerprint "
                f"{first.model_fingerprint}) but #{index} is {other.model_name or '?'} (fingerprint "
                f"{other.model_fingerprint}); capture every input with the same model"
            )
    return first.model_fingerprint


def combine_activations(*acts: Activations) -> Activations:
    """Concatenate activations of the same model, sites, position and span into one in-memory set.

    Pair ids are renumbered (offset per input) so that pairs from different captures never collide;
    the prompt (group) is kept, so the same prompt in two captures stays one group for splitting.
    """
    check_same_model(*acts)
    first = acts[0]
    for index, other in enumerate(acts[1:], start=1):
        for field in ("sites", "position", "span", "d_model"):
            if getattr(other, field) != getattr(first, field):
                raise InputError(
                    f"cannot combine activations: {field} differs (#0: {getattr(first, field)!r}, "
                    f"#{index}: {getattr(other, field)!r})"
                )
    metadata: list[dict[str, Any]] = []
    offset = 0
    for one in acts:
        ids = [int(m.get("pair_id", i)) for i, m in enumerate(one.metadata)]
        for meta, pair in zip(one.metadata, ids):
            metadata.append({**meta, "pair_id": pair + offset})
        offset += (max(ids) + 1) if ids else 0
    return Activations(
        sites=list(first.sites), position=first.position, span=first.span, d_model=first.d_model,
        n_tokens=torch.cat([a.n_tokens for a in acts]), model_fingerprint=first.model_fingerprint,
        model_name=first.model_name, metadata=metadata, backend=first.backend,
        _tensors={site: torch.cat([a[site] for a in acts]) for site in first.sites},
    )


def group_kfold(groups: Sequence[int] | np.ndarray | torch.Tensor, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split rows into ``min(n_folds, n_groups)`` folds so that no group has rows on both sides.

    Groups are shuffled with ``seed``, then taken largest first (stable, so equal sizes keep the
    shuffled order) and each is put in the fold with the fewest rows so far, which balances fold
    sizes. Returns ``[(train_rows, test_rows), ...]``, sorted int arrays, one per fold.
    Raises :class:`~repedit.io.InputError` with fewer than 2 groups or ``n_folds < 2``.
    """
    if isinstance(groups, torch.Tensor):
        groups = groups.cpu().numpy()
    groups = np.asarray(groups)
    if n_folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds, got {n_folds}")
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(unique) < 2:
        raise InputError(
            f"group-aware cross-validation needs at least 2 groups (prompts); all {len(groups)} items share one"
        )
    n_folds = min(n_folds, len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    sizes = np.zeros(n_folds, dtype=np.int64)
    for group in order:
        fold = int(np.argmin(sizes))
        fold_of_group[group] = fold
        sizes[fold] += counts[group]
    fold_of_row = fold_of_group[inverse]
    rows = np.arange(len(groups))
    return [(rows[fold_of_row != f], rows[fold_of_row == f]) for f in range(n_folds)]


def _split_groups(pair_data: PairData) -> np.ndarray:
    """Union of prompt groups and pairs (union-find): one id per row, so pairs are never split."""
    groups = pair_data.groups.cpu().numpy()
    pairs = pair_data.pair_ids.cpu().numpy()
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(node: tuple[str, int]) -> tuple[str, int]:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for group, pair in zip(groups.tolist(), pairs.tolist()):
        parent[find(("g", group))] = find(("p", pair))
    roots = [find(("g", g)) for g in groups.tolist()]
    index = {root: i for i, root in enumerate(dict.fromkeys(roots))}
    return np.asarray([index[r] for r in roots], dtype=np.int64)


def _subset(pair_data: PairData, rows: np.ndarray) -> PairData:
    index = torch.as_tensor(rows, dtype=torch.long)
    return PairData(pair_data.labels[index], pair_data.pair_ids[index], pair_data.groups[index],
                    [pair_data.users[i] for i in rows.tolist()], pair_data.data_hash)


def _validate(pair_data: PairData, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Check both classes, complete pairs, at least 2 pairs; return ``(pos, neg)`` row indices per pair."""
    labels = pair_data.labels.cpu().numpy()
    suffix = f" ({where})" if where else ""
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        only = "personalised (label 1)" if n_neg == 0 else "neutral (label 0)"
        raise InputError(
            f"probing needs both classes, but all {len(labels)} items are {only}{suffix}: give pairs of one "
            "personalised and one neutral item"
        )
    pos, neg = pair_index(labels, pair_data.pair_ids)
    if len(pos) < 2:
        raise InputError(
            f"probing needs at least 2 pairs (one personalised + one neutral item sharing a pair_id) to fit on "
            f"one and test on another; got {len(pos)}{suffix}"
        )
    return pos, neg


def _as_float64(x: torch.Tensor | np.ndarray, n: int, site: str | None) -> torch.Tensor:
    x64 = torch.as_tensor(x).detach().cpu().double()
    name = f"at site {site} " if site else ""
    if x64.ndim != 2 or x64.shape[0] != n:
        raise InputError(f"activations {name}must be [n_items, d_model] with n_items = {n}, got {tuple(x64.shape)}")
    finite = torch.isfinite(x64).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise InputError(
            f"activations {name}contain NaN or inf in {len(bad)} of {n} items (first: item {int(bad[0])}); "
            "recapture in float32 or check the model's dtype"
        )
    return x64


def _cross_validate(
    x: torch.Tensor, labels: np.ndarray, pair_ids: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], method: ProbeMethod,
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Held-out accuracy per fold, and the held-out signed scores of each class (all folds together).

    Each fold's probe is fitted on the train rows; its threshold is the midpoint of the train class-mean
    scores and its orientation the sign of (personalised mean - neutral mean) on train (always + for
    directions, which are oriented by construction; subspace norms could go either way). The signed
    score ``(score - threshold) * orientation`` is > 0 for a predicted personalised item; being
    centred per fold, signed scores of different folds can be pooled for the margin.
    """
    accuracies, signed_pos, signed_neg = [], [], []
    labels_t = torch.as_tensor(labels)
    pairs_t = torch.as_tensor(pair_ids)
    for train, test in folds:
        probe = method.fit(x[train], labels_t[train], pairs_t[train])
        train_scores = probe.score(x[train]).double().numpy()
        mean_pos = train_scores[labels[train] == 1].mean()
        mean_neg = train_scores[labels[train] == 0].mean()
        threshold = (mean_pos + mean_neg) / 2
        orientation = 1.0 if mean_pos >= mean_neg else -1.0
        signed = (probe.score(x[test]).double().numpy() - threshold) * orientation
        accuracies.append(float(((signed > 0).astype(np.int64) == labels[test]).mean()))
        signed_pos.append(signed[labels[test] == 1])
        signed_neg.append(signed[labels[test] == 0])
    return accuracies, np.concatenate(signed_pos), np.concatenate(signed_neg)


def _d_prime(pos: np.ndarray, neg: np.ndarray) -> float:
    """(mean_pos - mean_neg) / sqrt((var_pos + var_neg) / 2); ±inf for perfectly separated constant scores."""
    diff = float(pos.mean() - neg.mean())
    spread = math.sqrt((float(pos.var()) + float(neg.var())) / 2)
    if spread == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / spread


def evaluate_site(
    x: torch.Tensor | np.ndarray,
    pair_data: PairData,
    method: "str | ProbeMethod",
    folds: int = 5,
    seed: int = 0,
    *,
    controls: int = 5,
    site: str | None = None,
) -> dict[str, float]:
    """Cross-validate one probe method on one site's activations.

    Args:
        x: ``[n_items, d_model]`` activations (any float dtype; computed in float64), rows matching
            ``pair_data``.
        pair_data: labels, pair ids and prompt groups (:meth:`PairData.from_activations`).
        method: a method object or a :data:`~repedit.probes.methods.METHODS` name.
        folds: number of group-aware folds (fewer if there are fewer prompt groups).
        seed: seeds the fold assignment and the control label swaps.
        controls: number of independently shuffled controls averaged into ``control_accuracy``.
            Each costs as much as the real evaluation, but one is noisy: with a strong signal and
            few pairs a fold's control accuracy is roughly the fraction of its pairs that happened
            not to be swapped (std ~0.085 for 32 pairs in 5 folds); averaging 5 divides that by ~2.2.
        site: only used in error messages.

    Each fold's probe scores held-out rows with ``probe.score``; the decision threshold is the
    midpoint of the two class-mean scores on the *train* rows (no held-out information, and for a
    difference-of-means probe it is exactly the nearest-class-mean rule along the direction).

    Returns a dict: ``accuracy`` (mean held-out accuracy over folds), ``accuracy_std`` (its std over
    folds), ``control_accuracy`` (same pipeline, same folds, labels swapped within each pair with
    probability 1/2, seeded), ``selectivity`` (accuracy - control_accuracy), ``margin`` (d′ of the
    held-out signed scores: class-mean difference in pooled standard deviations), ``n_pairs``,
    ``folds`` (folds actually used).
    """
    method = get_method(method)
    if controls < 1:
        raise InputError(f"controls must be at least 1, got {controls}")
    pos, neg = _validate(pair_data, f"site {site}" if site else "")
    labels = pair_data.labels.cpu().numpy().astype(np.int64)
    pair_ids = pair_data.pair_ids.cpu().numpy().astype(np.int64)
    x64 = _as_float64(x, len(labels), site)
    fold_list = group_kfold(_split_groups(pair_data), folds, seed)
    accuracies, signed_pos, signed_neg = _cross_validate(x64, labels, pair_ids, fold_list, method)
    control_scores = []
    for repeat in range(controls):
        # A fresh, seeded coin per pair: swapped pairs keep their rows but exchange labels, so the control
        # task has the same class balance and pairing, with labels unrelated to the representations.
        swap = np.random.default_rng([seed, 1 + repeat]).random(len(pos)) < 0.5
        control = labels.copy()
        control[pos[swap]], control[neg[swap]] = 0, 1
        control_scores.append(float(np.mean(_cross_validate(x64, control, pair_ids, fold_list, method)[0])))
    accuracy = float(np.mean(accuracies))
    control_accuracy = float(np.mean(control_scores))
    return {
        "accuracy": accuracy,
        "accuracy_std": float(np.std(accuracies)),
        "control_accuracy": control_accuracy,
        "selectivity": accuracy - control_accuracy,
        "margin": _d_prime(signed_pos, signed_neg),
        "n_pairs": len(pos),
        "folds": len(fold_list),
    }


def _layer(site: str) -> int:
    try:
        return site_layer(site)
    except InputError:  # not a layer site: sorts first
        return -1


def _finalise(probe: Probe, site: str, fingerprint: str, data_hash: str, user_id: str | None, metrics: dict[str, float]) -> Probe:
    """Attach site and provenance; store tensors as float32 (what :func:`save_probes` writes)."""
    common = dict(site=site, model_fingerprint=fingerprint, data_hash=data_hash, user_id=user_id, metrics=dict(metrics))
    if isinstance(probe, Direction):
        return dataclasses.replace(probe, vector=probe.vector.float(), **common)
    assert isinstance(probe, Subspace)
    center = probe.center.float() if probe.center is not None else None
    return dataclasses.replace(probe, basis=probe.basis.float(), center=center, **common)


def probe_sites(
    acts: Activations | Sequence[Activations],
    methods: Sequence["str | ProbeMethod"] = DEFAULT_METHODS,
    sites: Sequence[str] | None = None,
    users: bool | Sequence[str] = True,
    folds: int = 5,
    seed: int = 0,
    *,
    min_user_pairs: int = 8,
    controls: int = 5,
    top: int = 3,
) -> ProbeReport:
    """Evaluate every method at every site, pooled and per user, and fit the probes on all data.

    Args:
        acts: activations of pairs (:func:`~repedit.probes.capture_pairs`, position ``"mean"`` or
            ``"last"``), or several of them from the same model (combined with
            :func:`combine_activations`; different models raise :class:`~repedit.io.InputError`).
        methods: method names (:data:`~repedit.probes.methods.METHODS`) or objects; names must be unique.
        sites: sites to probe (default: every captured site).
        users: ``True``: per-user rows for every user with at least ``min_user_pairs`` pairs, when
            there is more than one user (with one user they would repeat the pooled rows);
            ``False``: pooled only; a list: exactly those users (each needs ``min_user_pairs``).
        folds, seed, controls: see :func:`evaluate_site`.
        top: how many sites :func:`select_sites` picks (pooled rows, all methods).

    Returns:
        :class:`ProbeReport`: one :class:`ProbeRow` per site × method × (pooled + each user); for each
        of them a probe fitted on all of that data with its metrics and provenance (model fingerprint,
        data hash, ``user_id``; ``None`` = pooled), float32 tensors; ``selected`` from
        :func:`select_sites`; ``settings`` records the arguments and skipped users with the reason.
    """
    if isinstance(acts, Activations):
        combined = acts
    else:
        acts = list(acts)
        if not acts:
            raise InputError("no activations given")
        combined = acts[0] if len(acts) == 1 else combine_activations(*acts)
    pair_data = PairData.from_activations(combined)
    method_objs = [get_method(m) for m in methods]
    if not method_objs:
        raise InputError("no probe methods given")
    names = [m.name for m in method_objs]
    if len(set(names)) != len(names):
        raise InputError(f"probe method names must be unique (rows are keyed by name), got {names}")
    site_list = list(combined.sites) if sites is None else [str(s) for s in sites]
    unknown = [s for s in site_list if s not in combined.sites]
    if unknown:
        raise InputError(f"sites {unknown} were not captured; captured sites: {', '.join(combined.sites)}")
    if not site_list:
        raise InputError("no sites to probe")
    _validate(pair_data)

    # Which subsets get rows: pooled always, then users (rows of each user, in first-seen order).
    user_rows: dict[str, np.ndarray] = {}
    all_users = list(dict.fromkeys(pair_data.users))
    user_array = np.asarray(pair_data.users, dtype=object)
    skipped: dict[str, str] = {}
    if users is True:
        wanted = all_users if len(all_users) > 1 else []
    elif users is False:
        wanted = []
    else:
        wanted = [str(u) for u in users]
        missing = [u for u in wanted if u not in all_users]
        if missing:
            raise InputError(f"users {missing} have no items; users present: {', '.join(all_users)}")
    for user in wanted:
        rows = np.flatnonzero(user_array == user)
        n_pairs = len(np.unique(pair_data.pair_ids[torch.as_tensor(rows)].numpy()))
        n_groups = len(np.unique(_split_groups(_subset(pair_data, rows))))
        reason = None
        if n_pairs < min_user_pairs:
            reason = f"{n_pairs} pairs, fewer than min_user_pairs={min_user_pairs}"
        elif n_groups < 2:
            reason = "all pairs share one prompt: no group-aware split possible"
        if reason is None:
            user_rows[user] = rows
        elif users is True:
            skipped[user] = reason
        else:
            raise InputError(f"user {user!r}: {reason}")

    rows_out: list[ProbeRow] = []
    probes: list[Probe] = []
    fingerprint = combined.model_fingerprint
    for site in site_list:
        x = _as_float64(combined[site], len(pair_data.labels), site)
        subsets: list[tuple[str, PairData, np.ndarray | None]] = [(POOLED, pair_data, None)]
        subsets += [(user, _subset(pair_data, rows), rows) for user, rows in user_rows.items()]
        for method in method_objs:
            for user, data, rows in subsets:
                x_sub = x if rows is None else x[torch.as_tensor(rows)]
                metrics = evaluate_site(x_sub, data, method, folds, seed, controls=controls, site=site)
                rows_out.append(ProbeRow(
                    site=site, layer=_layer(site), method=method.name, user_id=user, accuracy=metrics["accuracy"],
                    accuracy_std=metrics["accuracy_std"], control_accuracy=metrics["control_accuracy"],
                    selectivity=metrics["selectivity"], margin=metrics["margin"], n_pairs=int(metrics["n_pairs"]),
                    folds=int(metrics["folds"]),
                ))
                fitted = method.fit(x_sub, data.labels, data.pair_ids)
                probes.append(_finalise(fitted, site, fingerprint, pair_data.data_hash,
                                        None if user == POOLED else user, metrics))
    settings = {
        "methods": names, "method_params": {m.name: dataclasses.asdict(m) if dataclasses.is_dataclass(m) else {} for m in method_objs}, "sites": site_list,
        "users": sorted(user_rows), "skipped_users": skipped, "folds": folds, "seed": seed, "controls": controls,
        "min_user_pairs": min_user_pairs, "top": top, "position": combined.position,
        "span": list(combined.span) if isinstance(combined.span, tuple) else combined.span,
    }
    return ProbeReport(rows=rows_out, probes=probes, selected=select_sites(rows_out, top=top), model_fingerprint=fingerprint,
                       data_hash=pair_data.data_hash, settings=settings)


def select_sites(
    rows: Sequence[ProbeRow], top: int = 3, method: str | None = None, user_id: str = POOLED, tolerance: float = TIE_TOLERANCE,
) -> list[dict[str, Any]]:
    """Pick the ``top`` best sites by selectivity, one entry per site, best first.

    Only rows of ``user_id`` (default: pooled) and, if given, of ``method`` are considered. Greedy:
    among the remaining rows, those whose selectivity is within ``tolerance`` of the best are tied;
    the tie is broken by higher margin (d′), then the earlier layer, then site and method name; the
    pick's site is then removed (a site's other methods do not compete again). A NaN margin ranks
    last.

    Returns dicts ``{"rank", "site", "layer", "method", "user_id", "selectivity", "accuracy",
    "control_accuracy", "margin", "tied_with"}``; ``tied_with`` lists ``"site/method"`` of the rows
    that were tied with the pick but lost the tie-break (empty when selectivity alone decided).
    """
    candidates = [r for r in rows if r.user_id == user_id and (method is None or r.method == method)]
    chosen: list[dict[str, Any]] = []
    while candidates and len(chosen) < top:
        best = max(r.selectivity for r in candidates)
        tied = [r for r in candidates if r.selectivity >= best - tolerance]
        pick = min(tied, key=lambda r: (-(r.margin if not math.isnan(r.margin) else -math.inf), r.layer, r.site, r.method))
        chosen.append({
            "rank": len(chosen) + 1, "site": pick.site, "layer": pick.layer, "method": pick.method, "user_id": pick.user_id,
            "selectivity": pick.selectivity, "accuracy": pick.accuracy, "control_accuracy": pick.control_accuracy,
            "margin": pick.margin, "tied_with": [f"{r.site}/{r.method}" for r in tied if r is not pick],
        })
        candidates = [r for r in candidates if r.site != pick.site]
    return chosen
