"""KV-cache surgery for continuous batching: merge two left-padded batches, drop rows, trim padding.

Every row of a batch is right-aligned (its last token sits in the last column, padding on the left
and masked out), so two batches merge by left-padding the shorter one's keys/values and attention
mask with zeros up to the longer length and concatenating along the batch. Masked positions get zero
attention weight, so a row's computation is unchanged by the padding. Only plain full-attention
layers (``transformers.DynamicLayer``) can be merged or trimmed; sliding-window layers keep only
their last tokens and are not (:func:`can_merge` tells which case a cache is).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def can_merge(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain ``DynamicLayer`` holding ``[B, H, T, D]`` keys/values."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.ndim == 4 for layer in layers)


def _pad_left(tensor: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return tensor
    pad = [0, 0] * (tensor.ndim - 1 - (dim % tensor.ndim)) + [n, 0]
    return F.pad(tensor, pad)


def merge_caches(cache_a: Any, mask_a: torch.Tensor, cache_b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Append batch ``b`` to batch ``a`` (in place in ``cache_a``); returns ``(cache_a, merged mask)``.

    ``mask_*`` are ``[B, T]`` attention masks with ``T`` equal to the cache length.
    """
    length = max(mask_a.shape[1], mask_b.shape[1])
    grow_a, grow_b = length - mask_a.shape[1], length - mask_b.shape[1]
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers, strict=True):
        layer_a.keys = torch.cat([_pad_left(layer_a.keys, grow_a, -2), _pad_left(layer_b.keys, grow_b, -2)])
        layer_a.values = torch.cat([_pad_left(layer_a.values, grow_a, -2), _pad_left(layer_b.values, grow_b, -2)])
    return cache_a, torch.cat([_pad_left(mask_a, grow_a, 1), _pad_left(mask_b, grow_b, 1)])


def select_rows(cache: Any, keep: Sequence[int]) -> None:
    """Keep only batch rows ``keep`` of ``cache`` (in place)."""
    index = torch.tensor(list(keep), dtype=torch.long)
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys[index.to(layer.keys.device)]
            layer.values = layer.values[index.to(layer.values.device)]


def trim_left(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (after rows left); returns the new mask."""
    used = mask.bool().any(dim=0)
    first = int(used.int().argmax()) if bool(used.any()) else 0
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]
    return mask[:, first:]
