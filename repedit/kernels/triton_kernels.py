"""Triton kernels of the per-row edits (same conventions as :mod:`repedit.kernels.reference`).

Importing this module needs ``triton``; :mod:`repedit.kernels.ops` imports it only when a GPU is
present or ``TRITON_INTERPRET=1`` was set *before* the import (Triton reads that variable when the
``@triton.jit`` functions are defined). Under the interpreter the kernels run on CPU tensors, one
program at a time, 15–300× slower than torch: use it for correctness only, never for timings.

Every kernel is one pass over the hidden states: read ``h`` (and ``x``), gather the row's table
entries (a few KB, shared by all tokens of the row), write the output. Arithmetic is fp32 inside the
kernel, with the same roundings to the input dtype as the reference where they matter for exactness:
a gathered table row is rounded to ``h``'s dtype before it is added, so ``gather_add`` is bit-exact
against the reference in fp32, fp16 and bf16 on a GPU; projections and norms differ from it by
rounding only (sums in another order). Rows with ``idx = -1`` are copied unchanged (``tl.where``, not
``+ 0``). Interpreter quirk (Triton 3.x): its fp32 → bf16 cast truncates instead of rounding to
nearest even, so under ``TRITON_INTERPRET=1`` bf16 results can differ from the reference by one bf16
ulp; fp32 is exact there too.

Layout: ``h`` is made contiguous and seen as ``[N = B·T, d]``; row ``n`` belongs to batch row
``n // T``. Tables need unit stride along ``d`` (they are made contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_add_kernel(
    h_ptr, out_ptr, idx_ptr, table_ptr, row_strength_ptr,
    N, T, D, stride_table,
    HAS_ROW_STRENGTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    batch_row = rows // T
    idx = tl.load(idx_ptr + batch_row, mask=row_ok, other=-1).to(tl.int64)
    inside = row_ok[:, None] & (cols[None, :] < D)
    edit = inside & (idx[:, None] >= 0)
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    h = tl.load(h_ptr + offsets, mask=inside, other=0.0)
    v = tl.load(table_ptr + idx[:, None] * stride_table + cols[None, :], mask=edit, other=0.0).to(tl.float32)
    if HAS_ROW_STRENGTH:
        v = v * tl.load(row_strength_ptr + batch_row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    v = v.to(h.dtype).to(tl.float32)  # round the row to h's dtype first, like the reference
    out = tl.where(edit, (h.to(tl.float32) + v).to(h.dtype), h)
    tl.store(out_ptr + offsets, out, mask=inside)


@triton.jit
def _project_edit_kernel(
    h_ptr, out_ptr, idx_ptr, basis_ptr, strength_ptr, table_ptr, row_strength_ptr,
    T, D, K, stride_basis_row, stride_basis_k, stride_table,
    HAS_STRENGTH: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_ROW_STRENGTH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    batch_row = row // T
    idx = tl.load(idx_ptr + batch_row).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    # idx = -1: an empty bound masks every load and the row is copied (the interpreter rejects
    # `mask & scalar`, so the condition goes into the bound).
    edit = cols < tl.where(idx >= 0, D, 0)
    offsets = row.to(tl.int64) * D + cols
    h = tl.load(h_ptr + offsets, mask=inside, other=0.0)
    hf = h.to(tl.float32)
    component = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        u = tl.load(basis_ptr + idx * stride_basis_row + k * stride_basis_k + cols, mask=edit, other=0.0).to(tl.float32)
        component += tl.sum(hf * u, axis=0) * u
    if HAS_STRENGTH:
        strength = tl.load(strength_ptr + tl.maximum(idx, 0)).to(tl.float32)
        component = component * strength
    out = hf - component
    if HAS_TABLE:
        v = tl.load(table_ptr + idx * stride_table + cols, mask=edit, other=0.0).to(tl.float32)
        if HAS_ROW_STRENGTH:
            v = v * tl.load(row_strength_ptr + batch_row).to(tl.float32)
        out = out + v.to(h.dtype).to(tl.float32)
    tl.store(out_ptr + offsets, tl.where(edit, out.to(h.dtype), h), mask=inside)


@triton.jit
def _add_edit_rms_norm_kernel(
    r_ptr, x_ptr, idx_ptr, table_ptr, row_strength_ptr, w_ptr, r_out_ptr, y_ptr,
    T, D, stride_table, eps,
    HAS_X: tl.constexpr, HAS_ROW_STRENGTH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    batch_row = row // T
    idx = tl.load(idx_ptr + batch_row).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    edit = cols < tl.where(idx >= 0, D, 0)
    offsets = row.to(tl.int64) * D + cols
    r = tl.load(r_ptr + offsets, mask=inside, other=0.0)
    if HAS_X:  # the block's residual add, rounded to the residual dtype as in the model
        r = (r.to(tl.float32) + tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)).to(r.dtype)
    v = tl.load(table_ptr + idx * stride_table + cols, mask=edit, other=0.0).to(tl.float32)
    if HAS_ROW_STRENGTH:
        v = v * tl.load(row_strength_ptr + batch_row).to(tl.float32)
    r = tl.where(edit, (r.to(tl.float32) + v.to(r.dtype).to(tl.float32)).to(r.dtype), r)
    tl.store(r_out_ptr + offsets, r, mask=inside)
    rf = r.to(tl.float32)
    normed = rf * tl.rsqrt(tl.sum(rf * rf, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    y = normed.to(r.dtype).to(tl.float32) * w.to(tl.float32)  # weight · x̂.to(input dtype), as HF
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)


def _rows(h: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``h`` as a contiguous ``[B, T, d]`` tensor, with ``T`` and ``d``."""
    h3 = (h if h.ndim == 3 else h[:, None, :]).contiguous()
    return h3, h3.shape[1], h3.shape[2]


def _row_warps(block_d: int) -> int:
    return 4 if block_d <= 2048 else 8 if block_d <= 8192 else 16


def gather_add(h: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: torch.Tensor | None = None) -> torch.Tensor:
    h3, T, D = _rows(h)
    out = torch.empty_like(h3)
    n = h3.shape[0] * T
    if n == 0 or D == 0:
        return out.view(h.shape)
    table = table.contiguous()
    block_d = min(triton.next_power_of_2(D), 1024)
    block_n = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n, block_n), triton.cdiv(D, block_d))
    _gather_add_kernel[grid](
        h3, out, idx.contiguous(), table, row_strength if row_strength is not None else table,
        n, T, D, table.stride(0),
        HAS_ROW_STRENGTH=row_strength is not None, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out.view(h.shape)


def project_edit(
    h: torch.Tensor,
    idx: torch.Tensor,
    basis: torch.Tensor,
    strength: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> torch.Tensor:
    h3, T, D = _rows(h)
    out = torch.empty_like(h3)
    n = h3.shape[0] * T
    if n == 0 or D == 0:
        return out.view(h.shape)
    basis = (basis if basis.ndim == 3 else basis[:, None, :]).contiguous()
    dummy = basis
    block_d = triton.next_power_of_2(D)
    _project_edit_kernel[(n,)](
        h3, out, idx.contiguous(), basis,
        strength if strength is not None else dummy,
        table.contiguous() if table is not None else dummy,
        row_strength if row_strength is not None else dummy,
        T, D, basis.shape[1], basis.stride(0), basis.stride(1), table.stride(0) if table is not None else 0,
        HAS_STRENGTH=strength is not None, HAS_TABLE=table is not None, HAS_ROW_STRENGTH=row_strength is not None,
        BLOCK_D=block_d, num_warps=_row_warps(block_d),
    )
    return out.view(h.shape)


def add_edit_rms_norm(
    residual: torch.Tensor,
    idx: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r3, T, D = _rows(residual)
    x3 = _rows(x)[0] if x is not None else None
    r_out = torch.empty_like(r3)
    y = torch.empty(r3.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=residual.device)
    n = r3.shape[0] * T
    if n > 0 and D > 0:
        table = table.contiguous()
        block_d = triton.next_power_of_2(D)
        _add_edit_rms_norm_kernel[(n,)](
            r3, x3 if x3 is not None else r3, idx.contiguous(), table, row_strength if row_strength is not None else table,
            weight.contiguous(), r_out, y,
            T, D, table.stride(0), float(eps),
            HAS_X=x3 is not None, HAS_ROW_STRENGTH=row_strength is not None, BLOCK_D=block_d, num_warps=_row_warps(block_d),
        )
    return r_out.view(residual.shape), y.view(residual.shape)
