"""Pure-PyTorch reference of every kernel: always importable, the CPU path, and the oracle of the tests.

Shapes and conventions (shared with the Triton kernels in :mod:`repedit.kernels.triton_kernels`):

* ``h`` ``[B, T, d]`` hidden states (a ``[N, d]`` tensor is treated as ``[N, 1, d]``, i.e. one
  edit per token). ``t`` in the issue's formulas is the **batch row** ``b``: every token of row ``b``
  gets row ``b``'s edit. For an edit per token, pass ``h.reshape(N, 1, d)`` and ``idx`` ``[N]``.
* ``idx`` ``[B]`` integer: the table row of each batch row; ``-1`` means *no edit* and leaves the
  row bit-for-bit unchanged. A table whose row 0 is zeros (the steering tables) may use ``0``
  instead: the row then gets ``h + 0``, equal in value (only ``-0.0`` becomes ``+0.0``).
* tables are indexed by ``idx`` (one row per user); ``row_strength`` ``[B]`` (optional) is a strength per
  batch row, ``s[t]`` in the issue.
* Arithmetic follows the steering hook exactly: a gathered row is cast to ``h``'s dtype before it is
  added, the projection is computed in ``h``'s dtype, and the RMSNorm is Hugging Face's
  ``LlamaRMSNorm`` (fp32 statistics, weight times the normalised value cast back to the input dtype).

Rows with ``idx = -1`` cost a ``torch.where`` over the batch, but only when such a row is present
(checked with one scalar read in eager mode); under ``torch.compile`` the ``where`` is always there
and inductor fuses it into the same loop.
"""

from __future__ import annotations

import torch


def _as_3d(h: torch.Tensor) -> torch.Tensor:
    if h.ndim == 3:
        return h
    if h.ndim == 2:
        return h[:, None, :]
    raise ValueError(f"expected hidden states [B, T, d] or [N, d], got shape {tuple(h.shape)}")


def _has_inactive(idx: torch.Tensor) -> bool:
    """Whether some row may have ``idx = -1``: read on CPU (one scalar); assumed while compiling (the
    ``where`` is then fused) and on other devices (no host sync)."""
    if idx.is_cpu and not torch.compiler.is_compiling():
        return idx.numel() > 0 and int(idx.min()) < 0
    return True


def _gather(table: torch.Tensor, idx: torch.Tensor, inactive: bool) -> torch.Tensor:
    return table.index_select(0, idx.clamp(min=0) if inactive else idx)


def _finish(out: torch.Tensor, h3: torch.Tensor, idx: torch.Tensor, inactive: bool, shape: torch.Size) -> torch.Tensor:
    """Rows with ``idx = -1`` back to ``h`` (bit-for-bit), and the caller's shape."""
    if inactive:
        out = torch.where((idx >= 0)[:, None, None], out, h3)
    return out if out.shape == shape else out.view(shape)


def _scaled_rows(table: torch.Tensor, idx: torch.Tensor, row_strength: torch.Tensor | None, dtype: torch.dtype, inactive: bool) -> torch.Tensor:
    """``s[b]·table[idx[b]]`` in ``dtype``, ``[B, d]`` (the product is taken in fp32)."""
    rows = _gather(table, idx, inactive)
    if row_strength is not None:
        rows = rows.float() * row_strength.float()[:, None]
    return rows.to(dtype)


def gather_add(h: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b, t] = h[b, t] + s[b]·table[idx[b]]`` (``idx = -1``: row unchanged)."""
    inactive = _has_inactive(idx)
    if h.ndim == 3 and row_strength is None and not inactive:  # the steering hook's case, kept lean (once per site and forward)
        return h + table.index_select(0, idx).to(h.dtype)[:, None, :]
    h3 = _as_3d(h)
    out = h3 + _scaled_rows(table, idx, row_strength, h.dtype, inactive)[:, None, :]
    return _finish(out, h3, idx, inactive, h.shape)


def project_edit(
    h: torch.Tensor,
    idx: torch.Tensor,
    basis: torch.Tensor,
    strength: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = h − b·(h·u)u + s·v`` per row (``basis`` ``[R, d]``, unit rows), or the subspace variant
    ``h − b·UᵀUh + s·v`` (``basis`` ``[R, k, d]``, orthonormal rows, zero rows as padding).

    ``strength`` ``[R]`` is ``b`` per table row (default 1: remove the whole component); ``table``
    ``[R, d]`` the vectors ``v`` added after the projection (optional), ``row_strength`` ``[B]`` their
    strength per batch row. With ``strength``/``basis`` from a table whose row 0 is zero, index 0
    leaves a row unchanged in value.
    """
    h3 = _as_3d(h)
    dtype = h.dtype
    inactive = _has_inactive(idx)
    u = _gather(basis, idx, inactive).to(dtype)
    b = _gather(strength, idx, inactive).to(dtype)[:, None, None] if strength is not None else None
    if u.ndim == 2:  # one direction per row; the same expression (and rounding) as steering's project_out
        coord = torch.einsum("btd,bd->bt", h3, u).unsqueeze(-1)
        out = h3 - (b * coord if b is not None else coord) * u[:, None, :]
    else:
        component = torch.einsum("btk,bkd->btd", torch.einsum("btd,bkd->btk", h3, u), u)
        out = h3 - (b * component if b is not None else component)
    if table is not None:
        out = out + _scaled_rows(table, idx, row_strength, dtype, inactive)[:, None, :]
    return _finish(out, h3, idx, inactive, h.shape)


def lowrank_edit(
    h: torch.Tensor,
    idx: torch.Tensor,
    basis: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    strength: torch.Tensor,
) -> torch.Tensor:
    """LoReFT-style low-rank edit per row: ``out = h + a·Rᵀ(Wh + β − Rh)``.

    ``basis`` (R) and ``weight`` (W) ``[R_users, k, d]``, ``bias`` (β) ``[R_users, k]``, ``strength``
    (a) ``[R_users]``; R has orthonormal rows (zero rows as padding). Differentiable in every table,
    so training (:func:`repedit.steering.train_user_edits`) and serving share this function.
    """
    h3 = _as_3d(h)
    dtype = h.dtype
    inactive = _has_inactive(idx)
    r = _gather(basis, idx, inactive).to(dtype)
    w = _gather(weight, idx, inactive).to(dtype)
    beta = _gather(bias, idx, inactive).to(dtype)
    a = _gather(strength, idx, inactive).to(dtype)
    coords = torch.einsum("btd,bkd->btk", h3, w - r) + beta[:, None, :]
    out = h3 + a[:, None, None] * torch.einsum("btk,bkd->btd", coords, r)
    return _finish(out, h3, idx, inactive, h.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face ``LlamaRMSNorm``: ``weight · (x / sqrt(mean(x²) + eps))`` with fp32 statistics."""
    dtype = x.dtype
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def add_edit_rms_norm(
    residual: torch.Tensor,
    idx: torch.Tensor,
    table: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x: torch.Tensor | None = None,
    row_strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + per-row edit + RMSNorm: ``r' = x + r + s·V[idx]``, ``y = rmsnorm(r')·w``.

    Returns ``(r', y)``: ``r'`` is the new residual stream (what a llama block's ``residual =
    hidden_states`` keeps), ``y`` the input of the next attention. ``x`` (the sub-layer output) is
    optional; without it ``r' = r + s·V[idx]``. The additions round to the residual's dtype one at a
    time, as in the model (``x + r`` first, then the edit).
    """
    r = residual if x is None else residual + x
    r = gather_add(r, idx, table, row_strength)
    return r, rms_norm(r, weight, eps)


def attn_out_edit(attn_output: torch.Tensor, idx: torch.Tensor, table: torch.Tensor, row_strength: torch.Tensor | None = None) -> torch.Tensor:
    """Edit of the attention output per row: ``o + s·V[idx]`` (a :func:`gather_add` on ``o``)."""
    return gather_add(attn_output, idx, table, row_strength)
