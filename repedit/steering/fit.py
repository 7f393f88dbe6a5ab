"""Fit: pairs -> capture -> probes -> one :class:`UserEdit` per user.

=============  ===========================================================================
method         edit at each chosen ``resid_post.L``
=============  ===========================================================================
``caa``        ``add`` of the user's mean difference personalised − neutral (CAA, Rimsky et al.)
``pca``        ``add`` along the first PC of the user's paired differences (RepE), scaled to the
               mean projection difference
``chameleon``  ``chameleon``: add the component in the user's personalised subspace (SVD of the
               personalised rows) and remove the non-personalised direction (CCS), strengths ``a``/``b``
``stylevector`` ``add`` of the mean difference of the user's *real-history* pairs (their own texts vs
               the model's neutral answers; StyleVector)
=============  ===========================================================================

``caa``, ``pca`` and ``chameleon`` use every pair of the user except real-history ones unless
``sources`` says otherwise; activations are the mean over response tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..io import InputError
from ..model.arch import get_adapter
from ..model.loading import model_fingerprint
from ..pairs.synthesis import REAL_HISTORY, Pair
from ..probes.data import PairData, capture_pairs
from ..probes.methods import ccs, diff_of_means, pca_of_differences, svd_subspace
from .edit import SiteEdit, UserEdit

FIT_METHODS: tuple[str, ...] = ("caa", "pca", "chameleon", "stylevector")


def default_layers(model) -> list[int]:
    """One layer at 40% depth (layer 12 of 30 for the default model), where style steers well."""
    return [int(get_adapter(model).n_layers * 0.4)]


def _select(pairs: Sequence[Pair], method: str, sources: Sequence[str] | None) -> list[Pair]:
    if sources is not None:
        return [p for p in pairs if p.source in sources]
    if method == "stylevector":
        return [p for p in pairs if p.source == REAL_HISTORY]
    return [p for p in pairs if p.source != REAL_HISTORY]


def fit_user_edits(
    model,
    tokenizer,
    pairs: Sequence[Pair],
    *,
    method: str = "caa",
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    neutral_strength: float = 1.0,
    positions: str | int = "all",
    sources: Sequence[str] | None = None,
    min_pairs: int = 2,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, UserEdit]:
    """Fit one edit per user from preference pairs (methods in the module docstring).

    Args:
        layers: ``resid_post`` layers to edit (default :func:`default_layers`).
        strength: ``a`` of every edit (1.0 = the fitted vector as is); ``neutral_strength``: ``b`` of
            the CHAMELEON edit.
        sources: pair sources to use (default: see module docstring).
        min_pairs: users with fewer usable pairs are an error (the message names them).

    Returns:
        ``{user_id: UserEdit}`` in order of first appearance.
    """
    if method not in FIT_METHODS:
        raise InputError(f"unknown fit method {method!r}: expected one of {', '.join(FIT_METHODS)}")
    used = _select(pairs, method, sources)
    if not used:
        raise InputError(f"no pairs to fit {method!r} on (it uses {'real-history' if method == 'stylevector' else 'self-generated'} pairs; got sources {sorted({p.source for p in pairs})})")
    adapter = get_adapter(model)
    layers = list(layers) if layers is not None else default_layers(model)
    sites = [f"resid_post.{layer}" for layer in layers]
    acts = capture_pairs(model, tokenizer, used, sites, batch_size=batch_size, progress=progress)
    data = PairData.from_activations(acts)
    fingerprint = model_fingerprint(model)
    users = list(dict.fromkeys(p.user_id for p in used))
    too_few = {u: sum(p.user_id == u for p in used) for u in users}
    too_few = {u: n for u, n in too_few.items() if n < min_pairs}
    if too_few:
        raise InputError(f"users with fewer than {min_pairs} usable pairs for {method!r}: {too_few}")
    edits: dict[str, UserEdit] = {}
    for user in users:
        rows = torch.tensor([i for i, u in enumerate(data.users) if u == user])
        labels, pair_ids = data.labels[rows], data.pair_ids[rows]
        site_edits = []
        for site in sites:
            x = acts[site][rows].double()
            if method in ("caa", "stylevector"):
                found = diff_of_means().fit(x, labels, pair_ids)
                site_edits.append(SiteEdit(site, "add", vector=found.vector * found.scale, a=strength))
            elif method == "pca":
                found = pca_of_differences().fit(x, labels, pair_ids)
                site_edits.append(SiteEdit(site, "add", vector=found.vector * found.scale, a=strength))
            else:
                subspace = svd_subspace().fit(x, labels, pair_ids)
                neutral = ccs().fit(x, labels, pair_ids)
                site_edits.append(SiteEdit(site, "chameleon", basis=subspace.basis, direction=neutral.vector, a=strength, b=neutral_strength))
        edits[user] = UserEdit(
            user, site_edits, fingerprint, adapter.d_model, positions=positions, method=method,
            provenance={"n_pairs": int(len(rows) // 2), "sites": sites, "data_hash": data.data_hash,
                        "sources": sorted({p.source for p in used if p.user_id == user})},
        )
    return edits
