"""Preference-pair activations: capturing pairs with the labels and groups probes need.

Item metadata convention (what :func:`capture_pairs` writes and probes read):
``label`` (1 = personalised, 0 = neutral), ``pair_id`` (the two members of a pair share it),
``user_id``, ``prompt`` (the group for group-aware splits: all pairs of one prompt stay on one side),
and ``source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..capture.activations import Activations, capture
from ..io import InputError, sha256_of
from ..pairs.synthesis import Pair


def capture_pairs(
    model, tokenizer, pairs: Sequence[Pair], sites: Any = None, *, position: str = "mean", span: str = "response", **kwargs: Any,
) -> Activations:
    """Capture both responses of every pair, as (prompt, response) chat turns.

    Item ``2i`` is pair ``i``'s personalised response (``label`` 1), item ``2i+1`` its neutral one
    (``label`` 0). Defaults: mean over the response tokens. Extra keyword arguments go to
    :func:`repedit.capture`.
    """
    if not pairs:
        raise InputError("no pairs given")
    inputs, metadata = [], []
    for index, pair in enumerate(pairs):
        for label, response in ((1, pair.personalized), (0, pair.neutral)):
            inputs.append((pair.prompt, response))
            metadata.append({"label": label, "pair_id": index, "user_id": pair.user_id, "prompt": pair.prompt, "source": pair.source})
    return capture(model, tokenizer, inputs, sites, position, span=span, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class PairData:
    """Labels and groups of an :class:`~repedit.capture.activations.Activations` of pairs, as tensors.

    ``labels`` ``[n]`` (1 personalised / 0 neutral), ``pair_ids`` ``[n]``, ``groups`` ``[n]`` (an
    integer per prompt), ``users`` (a user id per item), ``data_hash`` (hash of the metadata and of
    the activations' provenance).
    """

    labels: torch.Tensor
    pair_ids: torch.Tensor
    groups: torch.Tensor
    users: list[str]
    data_hash: str

    @classmethod
    def from_activations(cls, acts: Activations) -> "PairData":
        if acts.position == "all":
            raise InputError("probes need one row per item: capture with position='mean' or 'last'")
        if len(acts.metadata) != acts.n_items:
            raise InputError(f"activations have {len(acts.metadata)} metadata entries for {acts.n_items} items")
        for index, meta in enumerate(acts.metadata):
            if meta.get("label") not in (0, 1, True, False):
                raise InputError(f"item {index}: metadata field 'label' must be 0 or 1 (1 = personalised), got {meta.get('label')!r}")
        labels = torch.tensor([int(m["label"]) for m in acts.metadata])
        pair_ids = torch.tensor([int(m.get("pair_id", i)) for i, m in enumerate(acts.metadata)])
        group_names = [str(m.get("prompt", m.get("pair_id", i))) for i, m in enumerate(acts.metadata)]
        index = {name: i for i, name in enumerate(dict.fromkeys(group_names))}
        users = [str(m.get("user_id", "default")) for m in acts.metadata]
        data_hash = sha256_of({"metadata": acts.metadata, "fingerprint": acts.model_fingerprint, "sites": acts.sites,
                               "position": acts.position, "span": acts.span})[:16]
        return cls(labels, pair_ids, torch.tensor([index[g] for g in group_names]), users, data_hash)
