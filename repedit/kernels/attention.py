"""Attention with the per-row edit of its output in the epilogue: the pure-PyTorch reference.

:func:`attention_edit` is one attention sub-layer of a llama-style block — grouped-query attention,
the output projection ``o_proj`` and the per-row edit of what it adds to the residual stream — as
one function, so that the Triton kernel (:mod:`repedit.kernels.triton_attention`) can do it in one
launch instead of attention, ``o_proj``, then a separate edit pass over ``[B, T, d]``.

Why ``o_proj`` is inside: repedit's ``attn_out.L`` site is what the attention sub-layer *adds to the
residual stream* (see :mod:`repedit.model.sites`), i.e. the ``o_proj`` **output**. An edit there
(``add``, ``project_out``) is not expressible on the ``o_proj`` input without inverting ``W_O``
(ill-conditioned: cond ≈ 1e4 for the default model), so the kernel applies the projection itself
and edits its output exactly as the hooks do. The value-path edit (adding ``c`` to every value
vector of a key/value head) lives before ``o_proj``: since softmax weights sum to 1 it is ``c``
added to every head output of that group, which the kernel adds to the attention output before
the projection.

Shapes (Hugging Face's, as an attention function of ``transformers.AttentionInterface`` receives them):

* ``query`` ``[B, H, Tq, hd]``, ``key``/``value`` ``[B, Hkv, Tkv, hd]``, ``H`` a multiple of
  ``Hkv`` (grouped-query attention: query head ``h`` reads key/value head ``h // (H / Hkv)``).
* causal masking aligns the last query with the last key (query ``i`` sits at position
  ``Tkv − Tq + i``: prefill, decode with a KV cache, or chunked prefill alike).
* ``mask`` (optional, bool, ``True`` = attend): ``[B, Tkv]`` key padding (left padding: ``False``
  on the leading pads), ``[B|1, Tq, Tkv]``, or Hugging Face's 4-D ``[B|1, 1, Tq, Tkv]``. A query
  that may attend to no key (a pad position) gets a zero attention output, not NaN.
* ``o_weight`` ``[d, H·hd]``, ``o_bias`` ``[d]`` or ``None``: the output projection.
* ``idx`` ``[B]``: each batch row's table row; ``-1`` = no edit (the row's output is bit-for-bit
  the unedited output). ``values`` ``[R, Hkv·hd]`` (value path), ``basis`` ``[R, d]`` or
  ``[R, k, d]`` with ``strength`` ``[R]`` (projection ``y − b·UᵀUy``), ``table`` ``[R, d]`` with
  ``row_strength`` ``[B]`` (add ``y + s·v``). Order: value path → ``o_proj`` → projection → add,
  i.e. :func:`repedit.kernels.project_edit` / :func:`repedit.kernels.gather_add` on the output.

Returns ``[B, Tq, d]``: the (edited) ``o_proj`` output, in ``query``'s dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import gather_add, project_edit


def allowed_keys(batch: int, q_len: int, kv_len: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``[B|1, Tq, Tkv]`` bool: which keys each query may attend to (``None``: all of them).

    ``mask`` as in the module docstring; it is combined (and) with the causal rule when both are given.
    """
    allowed = None
    if mask is not None:
        allowed = normalise_mask(mask, batch, q_len, kv_len)
    if causal:
        position = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        causal_ok = (torch.arange(kv_len, device=device)[None, :] <= position)[None]
        allowed = causal_ok if allowed is None else allowed & causal_ok
    return allowed


def normalise_mask(mask: torch.Tensor, batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """A bool ``mask`` of any accepted layout as ``[B|1, Tq, Tkv]`` (a view: strides may be 0)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"attention masks must be bool (True = attend), got {mask.dtype}: an additive float mask is not supported")
    if mask.ndim == 2:  # [B, Tkv] key padding
        mask = mask[:, None, :]
    elif mask.ndim == 4:  # HF [B|1, 1, Tq, Tkv]
        if mask.shape[1] != 1:
            raise ValueError(f"a 4-D mask must have one head dimension (broadcast), got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[0] not in (1, batch) or mask.shape[-1] != kv_len or mask.shape[1] not in (1, q_len):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit batch {batch}, {q_len} queries, {kv_len} keys")
    return mask.expand(mask.shape[0], q_len, kv_len)


def check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, o_weight: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """``(B, H, Hkv, Tq, Tkv, hd)`` after checking that the inputs fit together."""
    if query.ndim != 4 or key.ndim != 4 or value.shape != key.shape:
        raise ValueError(f"expected query [B, H, Tq, hd] and key/value [B, Hkv, Tkv, hd], got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    B, H, Tq, hd = query.shape
    Hkv, Tkv = key.shape[1], key.shape[2]
    if key.shape[0] != B or key.shape[3] != hd or H % Hkv:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)}: batch/head_dim differ or {H} heads are not a multiple of {Hkv} kv heads")
    if o_weight.ndim != 2 or o_weight.shape[1] != H * hd:
        raise ValueError(f"o_weight must be [d, H·hd] = [d, {H * hd}], got {tuple(o_weight.shape)}")
    return B, H, Hkv, Tq, Tkv, hd


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
              causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query softmax attention, ``[B, Tq, H, hd]`` (HF's layout before ``o_proj``), fp32 inside.

    Queries with no allowed key get zeros (softmax of an empty row)."""
    B, H, Tq, hd = query.shape
    Hkv, Tkv = key.shape[1], key.shape[2]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    k = key.float().repeat_interleave(H // Hkv, dim=1)
    v = value.float().repeat_interleave(H // Hkv, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # [B, H, Tq, Tkv]
    allowed = allowed_keys(B, Tq, Tkv, causal, mask, query.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if allowed is not None:  # an all-masked row: softmax gives NaN; its attention output is 0
        weights = torch.where(allowed[:, None].any(-1, keepdim=True), weights, 0.0)
    return torch.matmul(weights, v).to(query.dtype).transpose(1, 2)


def attention_edit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    basis: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention → (value-path edit) → ``o_proj`` → (projection, add) per row; ``[B, Tq, d]``.

    See the module docstring for shapes. Without ``idx`` (or without any edit table) this is the
    plain attention sub-layer output."""
    B, H, Hkv, Tq, Tkv, hd = check_shapes(query, key, value, o_weight)
    z = attention(query, key, value, scale, causal, mask)  # [B, Tq, H, hd]
    if idx is not None and values is not None:
        active = (idx >= 0)[:, None, None, None]
        rows = values.index_select(0, idx.clamp(min=0)).to(z.dtype).view(B, Hkv, hd)
        z = torch.where(active, z + rows.repeat_interleave(H // Hkv, dim=1)[:, None], z)
    y = F.linear(z.reshape(B, Tq, H * hd), o_weight.to(z.dtype), None if o_bias is None else o_bias.to(z.dtype))
    if idx is None:
        return y
    if basis is not None:
        return project_edit(y, idx, basis, strength, table, row_strength)
    if table is not None:
        return gather_add(y, idx, table, row_strength)
    return y
