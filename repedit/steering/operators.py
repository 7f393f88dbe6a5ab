"""Edit operators: what a steering edit does to the hidden states ``h`` at a site.

Every operator acts row by row on ``h`` ``[B, T, d]`` with per-row parameters (``[B, d]`` vectors,
``[B, k, d]`` bases, ``[B]`` strengths), so that one batch can hold rows of different users; a row
whose strengths are zero is left bit-for-bit unchanged. Notation: ``v`` a steering vector (model
units), ``u`` a unit direction, ``U`` a ``k × d`` matrix with orthonormal rows, ``a``/``b`` strengths.

============  ==========================================================  =========================
operator      formula (per token)                                         parameters
============  ==========================================================  =========================
add           ``h + a·v``                                                 v, a
project_out   ``h − b·(h·u)u``  or, for a subspace, ``h − b·UᵀUh``        u or U, b (1 = remove all)
chameleon     ``h + a·UᵀUh − b·(h·u)u``                                   U (personalised), u (neutral), a, b
clamp         ``h + (t − h·u)u``  (the projection on u becomes ``t``)     u, t
gated_add     ``h + a·g((h·u)/τ)·v``, g = tanh or relu                    v, u = v/‖v‖, a, τ
lowrank       ``h + a·Rᵀ(Wh + β − Rh)`` (LoReFT, Wu et al. 2024)           R = U (k × d, orthonormal
                                                                          rows), W (k × d), β (k), a
============  ==========================================================  =========================

``lowrank`` replaces the coordinates of ``h`` in the subspace spanned by R's rows by the learned
affine function ``Wh + β`` (``a`` = 1); it is what :func:`repedit.steering.train_user_edits` learns
with ``kind="lowrank"``. With ``W = R`` it adds the constant ``Rᵀβ``: a rank-k additive vector.

Directional *ablation* (Arditi et al.) is ``project_out`` applied at every layer's residual writes;
:func:`repedit.steering.ablation` builds that edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPERATORS: tuple[str, ...] = ("add", "project_out", "chameleon", "clamp", "gated_add", "lowrank")
GATES: tuple[str, ...] = ("tanh", "relu")


@dataclass(frozen=True)
class RowParams:
    """Per-row parameters of one site, already gathered for the rows of a batch (all on h's device).

    ``vector``/``direction`` ``[B, d]``, ``basis`` ``[B, k, d]`` (zero rows for padding), ``a``/``b``
    ``[B]`` strengths, ``target`` ``[B]``, ``tau`` ``[B]``.
    """

    vector: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    target: torch.Tensor | None = None
    tau: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _proj(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``(h·u)`` per token: ``[B, T, 1]`` for ``h`` ``[B, T, d]`` and ``u`` ``[B, d]``."""
    return torch.einsum("btd,bd->bt", h, u).unsqueeze(-1)


def _subspace_component(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``UᵀUh`` per token for ``basis`` ``[B, k, d]``: ``[B, T, d]``."""
    coords = torch.einsum("btd,bkd->btk", h, basis)
    return torch.einsum("btk,bkd->btd", coords, basis)


def lowrank_delta(h: torch.Tensor, basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a·Rᵀ(Wh + β − Rh)`` per row: ``[B, T, d]`` for ``h`` ``[B, T, d]``, ``basis``/``weight``
    ``[B, k, d]``, ``bias`` ``[B, k]``, ``a`` ``[B]`` (rows with ``a = 0`` get exactly zero)."""
    coords = torch.einsum("btd,bkd->btk", h, weight - basis) + bias[:, None, :]
    return a[:, None, None] * torch.einsum("btk,bkd->btd", coords, basis)


def apply_operator(operator: str, h: torch.Tensor, p: RowParams, gate: str = "tanh") -> torch.Tensor:
    """Apply ``operator`` (one of :data:`OPERATORS`) to ``h`` ``[B, T, d]`` with per-row parameters ``p``.

    Computation happens in ``h``'s dtype; parameters are cast to it.
    """
    dtype = h.dtype

    def col(x: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, 1]
        return x.to(dtype)[:, None, None]

    if operator == "add":
        return h + col(p.a) * p.vector.to(dtype)[:, None, :]
    if operator == "project_out":
        if p.basis is not None:
            return h - col(p.b) * _subspace_component(h, p.basis.to(dtype))
        u = p.direction.to(dtype)
        return h - col(p.b) * _proj(h, u) * u[:, None, :]
    if operator == "chameleon":
        u = p.direction.to(dtype)
        return h + col(p.a) * _subspace_component(h, p.basis.to(dtype)) - col(p.b) * _proj(h, u) * u[:, None, :]
    if operator == "clamp":
        u = p.direction.to(dtype)
        return h + (col(p.target) - _proj(h, u)) * u[:, None, :]
    if operator == "gated_add":
        u = p.direction.to(dtype)
        scaled = _proj(h, u) / col(p.tau)
        gated = torch.tanh(scaled) if gate == "tanh" else torch.relu(scaled)
        return h + col(p.a) * gated * p.vector.to(dtype)[:, None, :]
    if operator == "lowrank":
        return h + lowrank_delta(h, p.basis.to(dtype), p.weight.to(dtype), p.bias.to(dtype), p.a.to(dtype))
    raise ValueError(f"unknown operator {operator!r}: expected one of {', '.join(OPERATORS)}")
