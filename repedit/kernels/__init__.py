"""Per-row edit kernels for serving many users in one batch: reference, Triton, dispatch.

Three layers:

1. :mod:`repedit.kernels.reference` — pure PyTorch, always importable; the CPU path and the tests' oracle.
2. :mod:`repedit.kernels.triton_kernels` — Triton kernels; imported only when a CUDA device is
   present or ``TRITON_INTERPRET=1`` was set before ``repedit.kernels`` was first imported (then
   they run on CPU tensors through the interpreter: correctness only, never timings).
3. :mod:`repedit.kernels.ops` — ``torch.ops.repedit.{gather_add, project_edit, add_edit_rms_norm}``
   registered with ``torch.library.custom_op`` + ``register_fake`` (``torch.compile(fullgraph=True)``
   accepts them), and the public functions below, which run Triton on CUDA (or under the
   interpreter) and the reference otherwise. :func:`backend` says which one a tensor gets.

Ops (``h`` ``[B, T, d]``, one edit per batch row; pass ``[N, 1, d]`` for one per token; ``idx``
``[B]`` with ``-1`` = no edit, row bit-for-bit unchanged; ``s`` ``[B]`` optional strength per row):

* :func:`gather_add` — ``h + s·V[idx]``;
* :func:`project_edit` — ``h − b·(h·u)u + s·v`` with a unit ``u`` per user, or ``h − b·UᵀUh + s·v``;
* :func:`add_edit_rms_norm` — ``r' = x + r + s·V[idx]``, ``y = rmsnorm(r')·w`` in one pass (the
  input of the next attention in llama-style models); :func:`repedit.steering.fused_steering` wires it into a model (tensor ops only here: this package imports nothing
  of repedit, so the steering stage can build on it);
* :func:`lowrank_edit` — ``h + a·Rᵀ(Wh + β − Rh)`` (LoReFT) with per-user R, W, β, a: the reference
  only (no Triton kernel yet), differentiable, shared by training and serving;
* :func:`attention_edit` — the whole attention sub-layer of a llama-style block with the edit in its
  epilogue: grouped-query causal attention (padding masks, KV cache), the value-path edit, ``o_proj``,
  then projection and add on its output (the ``attn_out`` site) — one Triton launch on GPU;
  reference in :mod:`repedit.kernels.attention`. :mod:`repedit.steering.fused_attention` registers it
  as a Hugging Face attention implementation;
* :func:`attn_out_edit` — ``o + s·V[idx]`` on an attention output computed elsewhere: the
  composition (attention, then gather-add) that :func:`attention_edit` fuses;
  :func:`repedit.steering.value_edit_as_attn_out` converts a value-path edit into it.

The steering hooks (:func:`repedit.steering.steer`) call :func:`gather_add` for ``add`` edits and
:func:`project_edit` for ``project_out``: Triton on GPU, and on CPU the reference, bit-identical to
the hooks' previous arithmetic. :func:`compiled` gives ``torch.compile``'d references for CPU serving.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from . import attention, reference
from .ops import (
    INTERPRET,
    TRITON_IMPORT_ERROR,
    add_edit_rms_norm,
    attention_edit,
    attn_out_edit,
    backend,
    gather_add,
    project_edit,
    triton_available,
    uses_triton,
)
from .reference import lowrank_edit

__all__ = [
    "INTERPRET", "TRITON_IMPORT_ERROR", "add_edit_rms_norm", "attention", "attention_edit", "attn_out_edit", "backend", "compiled",
    "gather_add", "lowrank_edit", "project_edit", "reference", "triton_available", "uses_triton",
]

_REFERENCE_OPS = ("gather_add", "project_edit", "add_edit_rms_norm", "attn_out_edit")


@functools.cache
def compiled(name: str, dynamic: bool | None = None) -> Callable:
    """``torch.compile`` of the reference op ``name`` (one of ``gather_add``, ``project_edit``,
    ``add_edit_rms_norm``, ``attn_out_edit``), cached per ``(name, dynamic)``; on CPU inductor fuses
    the gather, the arithmetic and the ``-1`` masking into one loop. The first call per shape
    compiles (seconds). ``dynamic=None`` is torch's default (a second shape recompiles with symbolic
    sizes: one graph for every batch, but slower loops at large shapes);
    ``dynamic=False`` specialises each shape (fastest, one compile per shape, torch's recompile
    limit applies)."""
    if name not in _REFERENCE_OPS:
        raise ValueError(f"unknown op {name!r}: expected one of {', '.join(_REFERENCE_OPS)}")
    return torch.compile(getattr(reference, name), dynamic=dynamic)
