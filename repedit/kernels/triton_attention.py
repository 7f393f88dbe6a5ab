"""Triton kernel of :func:`repedit.kernels.attention.attention_edit`: attention + ``o_proj`` + edit, one launch.

Same conventions and shapes as the reference (:mod:`repedit.kernels.attention`). Imported like
:mod:`repedit.kernels.triton_kernels`: on CUDA, or on CPU when ``TRITON_INTERPRET=1`` was set
before the import (correctness only).

One program per ``(query block, batch row)``; it does every head of its rows, because the edit of
the attention sub-layer's output mixes heads (``o_proj`` sums them, a projection reads all of ``d``):

1. flash attention per query head (online softmax, fp32 accumulators; key/value head
   ``h // n_rep`` for grouped-query attention; causal bound and bool mask), plus the value-path
   edit (``+ c`` of the head's key/value group) — written to ``z`` ``[B, Tq, H·hd]``, the buffer
   Hugging Face materialises between attention and ``o_proj`` anyway;
2. ``y = z W_Oᵀ + β`` in column chunks of ``d``; an ``add`` edit is applied right there (epilogue),
   a projection accumulates the coordinates ``Uy`` and stores ``y``;
3. only with a projection: ``y − b·Uᵀ(Uy) + s·v`` over the stored ``y`` (the coordinates need all of
   ``d`` first). Phases 2 and 3 read what this program wrote, after a barrier.

Rows with ``idx = -1`` take the same path with every edit masked off and their values selected with
``tl.where`` (never ``+ 0``), so they are bit-for-bit the unedited output. fp32 inputs use IEEE fp32
dot products (not TF32) so that results stay within fp32 rounding of the reference; bf16/fp16 inputs
use the tensor cores with fp32 accumulation. Untuned block sizes: no GPU has run this yet.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import check_shapes, normalise_mask


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: fp32 products (not TF32). Under the interpreter every dot is IEEE on fp32 copies: its bf16
    # dot gave results ~1e10 off (measured, Triton 3.9), fp32 copies of bf16 operands are exact.
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attention_edit_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, z_ptr, w_ptr, bias_ptr, out_ptr,
    idx_ptr, values_ptr, basis_ptr, strength_ptr, table_ptr, row_strength_ptr,
    Tq, Tkv, H, N_REP, HD, D, K, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_q, sm_k, sw_d,
    s_values, s_basis_r, s_basis_k, s_table,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALUES: tl.constexpr,
    HAS_BASIS: tl.constexpr, HAS_STRENGTH: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_ROW_STRENGTH: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    dh = tl.arange(0, BLOCK_HD)
    dh_ok = dh < HD
    idx = tl.load(idx_ptr + b).to(tl.int64)
    safe_idx = tl.maximum(idx, 0)
    # idx = -1: empty bounds switch every edit load off (the interpreter rejects `mask & scalar`).
    hd_edit = dh < tl.where(idx >= 0, HD, 0)
    d_bound = tl.where(idx >= 0, D, 0)
    k_bound = tl.where(idx >= 0, K, 0)
    q_pos = rows + (Tkv - Tq)  # causal: query i sits at position Tkv - Tq + i
    kv_end = Tkv
    if CAUSAL:
        kv_end = tl.minimum(Tkv, (pid_m + 1) * BLOCK_M + (Tkv - Tq))
    HHD = H * HD
    z_rows = (b * Tq + rows.to(tl.int64)) * HHD
    tile_ok = row_ok[:, None] & dh_ok[None, :]

    # ---- 1. attention per head (+ value-path edit) -> z
    for h in range(0, H):
        kvh = h // N_REP
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_t + dh[None, :], mask=tile_ok, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_HD], dtype=tl.float32)
        for start in range(0, kv_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < Tkv
            kv_tile = col_ok[:, None] & dh_ok[None, :]
            k = tl.load(k_ptr + b * sk_b + kvh * sk_h + cols[:, None] * sk_t + dh[None, :], mask=kv_tile, other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= q_pos[:, None])
            if HAS_MASK:
                allowed = tl.load(mask_ptr + b * sm_b + rows[:, None] * sm_q + cols[None, :] * sm_k, mask=ok, other=0)
                ok = ok & (allowed != 0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: no NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + b * sv_b + kvh * sv_h + cols[:, None] * sv_t + dh[None, :], mask=kv_tile, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no allowed key: zeros, as the reference
        o = o.to(q.dtype)
        if HAS_VALUES:  # the value edit: softmax weights sum to 1, so + c on every value = + c on the output
            c = tl.load(values_ptr + safe_idx * s_values + kvh * HD + dh, mask=hd_edit, other=0.0).to(q.dtype)
            o = tl.where(hd_edit[None, :], (o.to(tl.float32) + c.to(tl.float32)[None, :]).to(q.dtype), o)
        tl.store(z_ptr + z_rows[:, None] + h * HD + dh[None, :], o, mask=tile_ok)
    tl.debug_barrier()  # phase 2 reads every head's z written by other threads of this program

    # ---- 2. y = z W_O^T + bias (+ add edit, or projection coordinates)
    kk = tl.arange(0, BLOCK_K)
    coord = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    out_rows = (b * Tq + rows.to(tl.int64)) * D
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dc_ok = dc < D
        y = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for h in range(0, H):
            zt = tl.load(z_ptr + z_rows[:, None] + h * HD + dh[None, :], mask=tile_ok, other=0.0)
            wt = tl.load(w_ptr + dc[None, :] * sw_d + h * HD + dh[:, None], mask=dh_ok[:, None] & dc_ok[None, :], other=0.0)
            y += _dot(zt, wt.to(zt.dtype), IEEE)
        if HAS_BIAS:
            y += tl.load(bias_ptr + dc, mask=dc_ok, other=0.0).to(tl.float32)[None, :]
        y_out = y.to(out_ptr.dtype.element_ty)  # o_proj's output in the model dtype: what a hook would edit
        out_ok = row_ok[:, None] & dc_ok[None, :]
        if HAS_BASIS:
            u = tl.load(basis_ptr + safe_idx * s_basis_r + kk[:, None] * s_basis_k + dc[None, :],
                        mask=(kk[:, None] < k_bound) & dc_ok[None, :], other=0.0).to(tl.float32)
            coord += tl.sum(y_out.to(tl.float32)[:, None, :] * u[None, :, :], axis=2)
        elif HAS_TABLE:
            d_edit = dc < d_bound
            t = tl.load(table_ptr + safe_idx * s_table + dc, mask=d_edit, other=0.0).to(tl.float32)
            if HAS_ROW_STRENGTH:
                t = t * tl.load(row_strength_ptr + b).to(tl.float32)
            t = t.to(y_out.dtype).to(tl.float32)  # the row rounded to the output dtype first, like gather_add
            y_out = tl.where(d_edit[None, :], (y_out.to(tl.float32) + t[None, :]).to(y_out.dtype), y_out)
        tl.store(out_ptr + out_rows[:, None] + dc[None, :], y_out, mask=out_ok)

    # ---- 3. projection: y - b * U^T (U y) (+ s * v), over the stored y
    if HAS_BASIS:
        tl.debug_barrier()
        if HAS_STRENGTH:
            coord = coord * tl.load(strength_ptr + safe_idx).to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            dc_ok = dc < D
            d_edit = dc < d_bound
            out_ok = row_ok[:, None] & dc_ok[None, :]
            y_out = tl.load(out_ptr + out_rows[:, None] + dc[None, :], mask=out_ok, other=0.0)
            u = tl.load(basis_ptr + safe_idx * s_basis_r + kk[:, None] * s_basis_k + dc[None, :],
                        mask=(kk[:, None] < k_bound) & dc_ok[None, :], other=0.0).to(tl.float32)
            new = y_out.to(tl.float32) - tl.sum(coord[:, :, None] * u[None, :, :], axis=1)
            if HAS_TABLE:
                t = tl.load(table_ptr + safe_idx * s_table + dc, mask=d_edit, other=0.0).to(tl.float32)
                if HAS_ROW_STRENGTH:
                    t = t * tl.load(row_strength_ptr + b).to(tl.float32)
                new = new + t.to(y_out.dtype).to(tl.float32)
            tl.store(out_ptr + out_rows[:, None] + dc[None, :], tl.where(d_edit[None, :], new.to(y_out.dtype), y_out), mask=out_ok)


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
    """Triton :func:`repedit.kernels.attention.attention_edit` (same arguments, ``[B, Tq, d]``)."""
    B, H, Hkv, Tq, Tkv, hd = check_shapes(query, key, value, o_weight)
    D = o_weight.shape[0]
    device, dtype = query.device, query.dtype
    out = torch.empty(B, Tq, D, device=device, dtype=dtype)
    if B == 0 or Tq == 0:
        return out
    z = torch.empty(B, Tq, H * hd, device=device, dtype=dtype)
    # unit stride along head_dim is all the kernel needs; HF's transposed views already have it
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    o_weight = o_weight.contiguous()
    if idx is None:
        idx = torch.full((B,), -1, dtype=torch.long, device=device)
    idx = idx.to(device=device, dtype=torch.long).contiguous()
    mask3 = normalise_mask(mask, B, Tq, Tkv).to(torch.uint8) if mask is not None else None  # expand keeps 0 strides
    if basis is not None and basis.ndim == 2:
        basis = basis[:, None, :]
    tensors = dict(values=values, basis=basis, strength=strength, table=table, row_strength=row_strength)
    tensors = {name: (t.contiguous() if t is not None else None) for name, t in tensors.items()}
    dummy = idx
    block_m = 16 if Tq <= 16 else 32 if not query.is_cuda else 64
    block_hd = max(16, triton.next_power_of_2(hd))
    block_k = triton.next_power_of_2(basis.shape[1]) if basis is not None else 1
    grid = (triton.cdiv(Tq, block_m), B)
    _attention_edit_kernel[grid](
        query, key, value, mask3 if mask3 is not None else dummy, z, o_weight, o_bias if o_bias is not None else o_weight, out,
        idx, *(tensors[name] if tensors[name] is not None else dummy for name in ("values", "basis", "strength", "table", "row_strength")),
        Tq, Tkv, H, H // Hkv, hd, D, basis.shape[1] if basis is not None else 0, float(1.0 / math.sqrt(hd) if scale is None else scale),
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *((mask3.stride(0) if mask3.shape[0] > 1 else 0, mask3.stride(1), mask3.stride(2)) if mask3 is not None else (0, 0, 0)),
        o_weight.stride(0),
        tensors["values"].stride(0) if values is not None else 0,
        tensors["basis"].stride(0) if basis is not None else 0, tensors["basis"].stride(1) if basis is not None else 0,
        tensors["table"].stride(0) if table is not None else 0,
        CAUSAL=bool(causal), HAS_MASK=mask3 is not None, HAS_BIAS=o_bias is not None, HAS_VALUES=values is not None,
        HAS_BASIS=basis is not None, HAS_STRENGTH=strength is not None, HAS_TABLE=table is not None,
        HAS_ROW_STRENGTH=row_strength is not None, IEEE=dtype == torch.float32 or not query.is_cuda,
        BLOCK_M=block_m, BLOCK_N=32 if not query.is_cuda else 64, BLOCK_HD=block_hd,
        BLOCK_D=min(64, triton.next_power_of_2(D)), BLOCK_K=block_k,
    )
    return out
