"""Dispatch: the ``torch.ops.repedit.*`` custom ops and the public functions that pick a backend.

Each op is registered with :func:`torch.library.custom_op` and a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` accepts it as one opaque node. Its implementation runs the Triton
kernel when the tensors are on a CUDA device (and ``triton`` imports) or when ``TRITON_INTERPRET=1``
was set before this module was imported; otherwise the pure-torch reference.

The public functions (:func:`gather_add`, :func:`project_edit`, :func:`add_edit_rms_norm`,
:func:`attn_out_edit`) call the custom op only when Triton will run, and the reference directly
otherwise: on CPU that saves the dispatcher's ~15 µs per call (the steering hook runs once per site
and forward) and lets ``torch.compile`` trace the reference and fuse it with its neighbours.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import attention as attention_reference
from . import reference

#: ``TRITON_INTERPRET=1`` at import time: run the Triton kernels on CPU tensors with the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_triton = None
_triton_attention = None
TRITON_IMPORT_ERROR: str | None = None
if INTERPRET or torch.cuda.is_available():
    try:
        from . import triton_attention as _triton_attention
        from . import triton_kernels as _triton
    except Exception as error:  # triton missing or unusable: the reference serves every device
        _triton = _triton_attention = None
        TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    TRITON_IMPORT_ERROR = "not imported: no CUDA device and TRITON_INTERPRET is not 1"


def triton_available() -> bool:
    """Whether the Triton kernels were imported (a GPU is present, or the interpreter is on)."""
    return _triton is not None


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the ops run the Triton kernel for ``tensor``: on CUDA, or on CPU under the interpreter."""
    return _triton is not None and (tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu"))


def backend(tensor: torch.Tensor) -> str:
    """``"triton"``, ``"triton-interpreter"`` or ``"reference"``: what the ops run for ``tensor``."""
    if not uses_triton(tensor):
        return "reference"
    return "triton" if tensor.is_cuda else "triton-interpreter"


def _impl(h: torch.Tensor):
    return _triton if uses_triton(h) else reference


# ----------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("repedit::gather_add", mutates_args=())
def _gather_add_op(h: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _impl(h).gather_add(h, idx, table, row_strength)


@_gather_add_op.register_fake
def _(h, idx, table, row_strength=None):
    return torch.empty_like(h)


@torch.library.custom_op("repedit::project_edit", mutates_args=())
def _project_edit_op(
    h: torch.Tensor,
    idx: torch.Tensor,
    basis: torch.Tensor,
    strength: Optional[torch.Tensor] = None,
    table: Optional[torch.Tensor] = None,
    row_strength: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return _impl(h).project_edit(h, idx, basis, strength, table, row_strength)


@_project_edit_op.register_fake
def _(h, idx, basis, strength=None, table=None, row_strength=None):
    return torch.empty_like(h)


@torch.library.custom_op("repedit::add_edit_rms_norm", mutates_args=())
def _add_edit_rms_norm_op(
    residual: torch.Tensor,
    idx: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x: Optional[torch.Tensor] = None,
    row_strength: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(residual).add_edit_rms_norm(residual, idx, table, weight, eps, x, row_strength)


@_add_edit_rms_norm_op.register_fake
def _(residual, idx, table, weight, eps, x=None, row_strength=None):
    y = torch.empty(residual.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    return torch.empty_like(residual), y


# ----------------------------------------------------------------------------------- public API


def gather_add(h: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row gather-add ``out[b, t] = h[b, t] + s[b]·table[idx[b]]``; ``idx[b] = -1``: row unchanged.

    ``h`` ``[B, T, d]`` (or ``[N, d]``: one edit per token), ``idx`` ``[B]``, ``table`` ``[R, d]``,
    ``row_strength`` ``[B]`` or ``None`` (= 1). Triton on CUDA, the reference elsewhere.
    """
    if uses_triton(h):
        return torch.ops.repedit.gather_add(h, idx, table, row_strength)
    return reference.gather_add(h, idx, table, row_strength)


def project_edit(
    h: torch.Tensor,
    idx: torch.Tensor,
    basis: torch.Tensor,
    strength: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row projection edit ``h − b·(h·u)u + s·v`` (``basis`` ``[R, d]``) or ``h − b·UᵀUh + s·v``
    (``basis`` ``[R, k, d]``); see :func:`repedit.kernels.reference.project_edit`."""
    if uses_triton(h):
        return torch.ops.repedit.project_edit(h, idx, basis, strength, table, row_strength)
    return reference.project_edit(h, idx, basis, strength, table, row_strength)


def add_edit_rms_norm(
    residual: torch.Tensor,
    idx: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + per-row edit + RMSNorm: returns ``(r' = x + r + s·V[idx], rmsnorm(r')·w)``."""
    if uses_triton(residual):
        return torch.ops.repedit.add_edit_rms_norm(residual, idx, table, weight, float(eps), x, row_strength)
    return reference.add_edit_rms_norm(residual, idx, table, weight, eps, x, row_strength)


def attn_out_edit(attn_output: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row edit of an attention output ``o + s·V[idx]``, applied after the attention kernel.

    repedit runs no Triton attention of its own (Hugging Face's SDPA/eager/flash attention does the
    attention), so this is the composition *attention, then* :func:`gather_add` on its output — one
    extra pass over ``[B, T, d]``, not an epilogue fused into the attention kernel. Adding ``c`` to
    every value vector is the same edit (softmax weights sum to 1): see
    :func:`repedit.kernels.value_edit_as_attn_out`.
    """
    return gather_add(attn_output, idx, table, row_strength)


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
    """Attention sub-layer with the per-row edit in its epilogue: ``[B, Tq, d]`` = edit(o_proj(attention + value edit)).

    ``query`` ``[B, H, Tq, hd]``, ``key``/``value`` ``[B, Hkv, Tkv, hd]`` (grouped-query), ``o_weight``
    ``[d, H·hd]``; ``idx`` ``[B]`` (``-1`` = no edit, bit-for-bit); see
    :mod:`repedit.kernels.attention` for the masks and edit tables. One Triton launch on CUDA (or
    under the interpreter); the pure-torch reference elsewhere (attention, ``o_proj``, edit: three passes).
    No ``torch.library`` op: the attention function of a Hugging Face model is called eagerly.
    """
    impl = _triton_attention if uses_triton(query) else attention_reference
    return impl.attention_edit(
        query, key, value, o_weight, o_bias, idx, scale=scale, causal=causal, mask=mask,
        values=values, basis=basis, strength=strength, table=table, row_strength=row_strength,
    )
