"""Wiring of the fused residual + edit + RMSNorm op and of the fused attention into a Hugging Face model, and value-path edits.

:func:`fused_steering` is :func:`repedit.steering.steer` with the ``add`` edits at ``resid_post.L``
sites moved into the next RMSNorm. Editing ``resid_post.L`` means editing the residual that block
``L+1`` (or the final norm, after the last block) reads; in a llama-style block that residual goes
straight into ``input_layernorm``. So instead of a hook pass ``h' = h + V[idx]`` followed by the
norm's own pass over ``h'``, a hook at block ``L``'s output runs :func:`add_edit_rms_norm` once —
one read of ``h``, writes of ``h'`` and ``rmsnorm(h')`` — and the norm, whose ``forward`` is patched
for the duration, returns that precomputed output when it is called on exactly that ``h'`` tensor
(any other input is normalised as usual). The block's own residual add (``residual + mlp_out``)
stays in Hugging Face's code: ``x`` of the op is for runtimes that own the decoder-layer loop.

What runs where: on CUDA with Triton, the fused Triton kernel; with ``force=True`` on CPU, the
reference (or the Triton interpreter under ``TRITON_INTERPRET=1``) — the same arithmetic as the
hook path, for tests. Without CUDA and without ``force``, :func:`fused_steering` is plain
:func:`~repedit.steering.steer` (on CPU the fusion saves nothing: the reference is the same two
passes).

A site is fused when every edit at it is an ``add`` of a user whose positions are ``"all"`` and the
norm after it computes exactly Hugging Face's ``LlamaRMSNorm`` (checked numerically on a probe
input: llama, mistral, mixtral, qwen2/3, phi3, smollm3; not Gemma's ``1 + w`` norm, LayerNorms or
OLMo's parameter-free norm). Every other edit goes through the ordinary hooks of ``steer``; the
handle's ``fused_sites`` lists what was fused.

``attn_out.L`` edits (``add``, ``project_out``, and value-path edits converted by
:func:`value_edit_as_attn_out`) go into the epilogue of the fused attention kernel
(:mod:`repedit.steering.fused_attention`) under the same rule — CUDA with Triton, or ``force=True``
— unless ``attention=False``; on CPU with ``force=True`` that is the pure-torch reference of the
kernel, or the Triton kernel itself under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..io import InputError
from ..kernels.ops import add_edit_rms_norm, triton_available
from ..kernels.reference import rms_norm
from ..model.arch import UnsupportedModelError, get_adapter
from ..model.hooks import register_site_hook
from ..model.sites import Site, parse_site
from .apply import SteeringHandle, steer
from .edit import SiteEdit, UserEdit, check_model
from .fused_attention import AttentionTables, fusable_attn_out_layers, install_attention_edits


class FusedSteeringHandle(SteeringHandle):
    """A :class:`~repedit.steering.apply.SteeringHandle` that also restores patched norms on removal.

    ``fused_sites``: the ``resid_post`` sites whose edit runs inside the next RMSNorm.
    """

    def __init__(self, handles: list, fused_sites: list[str], attention_tables: dict[int, AttentionTables] | None = None) -> None:
        super().__init__(handles)
        self.fused_sites = fused_sites
        self.attention_tables = attention_tables or {}  # layer -> tables of the fused attention (``calls`` counts its runs)


class _NormPatch:
    """Patches ``norm.forward`` to return a precomputed output for one exact input tensor."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.norm = norm
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._had_own_forward = "forward" in norm.__dict__
        self._previous = norm.__dict__.get("forward")
        original = norm.forward

        def forward(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            pending, self.pending = self.pending, None
            if pending is not None and hidden is pending[0] and not args and not kwargs:
                return pending[1]
            return original(hidden, *args, **kwargs)

        norm.forward = forward

    def remove(self) -> None:
        if self._had_own_forward:
            self.norm.forward = self._previous
        else:
            self.norm.__dict__.pop("forward", None)
        self.pending = None


def _llama_rms_norm_eps(norm: torch.nn.Module, d_model: int) -> float | None:
    """``eps`` if ``norm`` computes exactly :func:`~repedit.kernels.reference.rms_norm` with its weight, else ``None``."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.shape != (d_model,) or not isinstance(eps, float):
        return None
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, d_model, generator=generator) * 3).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        same = torch.equal(norm(probe), rms_norm(probe, weight, eps))
    return eps if same else None


def _next_norm(adapter, layer: int) -> torch.nn.Module:
    return adapter.input_norm(layer + 1) if layer + 1 < adapter.n_layers else adapter.final_norm


def fused_steering(model, edits: Sequence[UserEdit | None], rows: Sequence[int | None] | None = None, *, force: bool = False,
                   attention: bool = True) -> FusedSteeringHandle:
    """:func:`~repedit.steering.steer` with ``resid_post`` ``add`` edits fused into the next RMSNorm
    and (``attention=True``) ``attn_out`` edits fused into the attention kernel.

    Same arguments, same results (up to rounding: a user's several ``add`` edits at one site are
    summed before they are added) and the same handle protocol (``with``, ``remove()``); the model
    is restored on removal. The fusion is used on CUDA when Triton is available, or always with
    ``force=True`` (CPU tests); otherwise this is exactly ``steer(model, edits, rows)``.
    """
    device = next(model.parameters()).device
    if not force and not (device.type == "cuda" and triton_available()):
        return FusedSteeringHandle([steer(model, edits, rows)], [])
    adapter = get_adapter(model)
    for edit in edits:
        if edit is not None:
            check_model(edit, model)

    # Which resid_post sites can be fused: every edit there is an `add` of an "all"-positions user.
    fusable: dict[int, list[tuple[int, SiteEdit]]] = {}
    blocked: set[int] = set()
    for user, edit in enumerate(edits):
        for site_edit in edit.edits if edit is not None else []:
            site = parse_site(site_edit.site, adapter.n_layers)
            if site.kind != "resid_post":
                continue
            if site_edit.operator == "add" and edit.positions == "all":
                fusable.setdefault(site.layer, []).append((user, site_edit))
            else:
                blocked.add(site.layer)
    norms = {layer: _next_norm(adapter, layer) for layer in fusable if layer not in blocked}
    eps = {layer: _llama_rms_norm_eps(norm, adapter.d_model) for layer, norm in norms.items()}
    fused_layers = sorted(layer for layer, value in eps.items() if value is not None)
    attention_layers = fusable_attn_out_layers(model, edits) if attention else []
    fused_sites = {Site("resid_post", layer) for layer in fused_layers} | {Site("attn_out", layer) for layer in attention_layers}

    def rest(edit: UserEdit | None) -> UserEdit | None:
        """The user's edits that are not fused (``None`` if nothing is left)."""
        if edit is None:
            return None
        kept = [e for e in edit.edits if parse_site(e.site, adapter.n_layers) not in fused_sites]
        return dataclasses.replace(edit, edits=kept) if kept else None

    # steer() validates rows/edits and hooks everything that is not fused.
    handles: list = [steer(model, [rest(e) for e in edits], rows)]
    if rows is not None:
        batch_index = torch.tensor([(r + 1) if (r is not None and edits[r] is not None) else 0 for r in rows], device=device)
    else:
        batch_index = torch.tensor([1], device=device)
    attention_tables: dict[int, AttentionTables] = {}
    try:
        attention_handle, attention_tables = install_attention_edits(model, edits, rows, attention_layers)
        handles.append(attention_handle)
        for layer in fused_layers:
            table = torch.zeros(len(edits) + 1, adapter.d_model)
            for user, site_edit in fusable[layer]:
                table[user + 1] += site_edit.a * site_edit.vector
            patch = _NormPatch(norms[layer])
            handles.append(patch)
            handles.append(register_site_hook(adapter, Site("resid_post", layer), _fused_hook(patch, table.to(device), batch_index, rows, eps[layer])))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    names = [f"resid_post.{layer}" for layer in fused_layers] + [f"attn_out.{layer}" for layer in attention_layers]
    return FusedSteeringHandle(handles, names, attention_tables)


def _fused_hook(patch: _NormPatch, table: torch.Tensor, index: torch.Tensor, rows, eps: float):
    weight = patch.norm.weight

    def hook(hidden: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]
        if rows is not None and batch != len(rows):
            raise InputError(f"steering was set up for {len(rows)} rows, but the model got a batch of {batch}")
        residual, normed = add_edit_rms_norm(hidden, index if index.numel() == batch else index.expand(batch), table, weight, eps)
        patch.pending = (residual, normed)
        return residual

    return hook


def value_edit_as_attn_out(model, layer: int, values: torch.Tensor) -> torch.Tensor:
    """The ``attn_out.{layer}`` vector equal to adding ``values`` to every value vector of that layer.

    ``values`` ``[n_kv_heads · head_dim]`` (the ``v_proj`` output space) or ``[n_kv_heads, head_dim]``.
    Each query head's output is a convex combination of its values (softmax weights sum to 1), so
    adding ``c`` to every value adds ``c`` to every head output, and ``W_O · c`` (heads repeated for
    grouped-query attention) to the attention output — an ``add`` at ``attn_out.{layer}``, applied
    per row by :func:`repedit.kernels.attn_out_edit`. Needs an attention module with ``o_proj``,
    ``head_dim`` and ``num_key_value_groups`` whose output is what the block adds (llama family).
    """
    adapter = get_adapter(model)
    attn = adapter.attn(layer)
    o_proj = getattr(attn, "o_proj", None)
    if adapter.layout.attn_out is not None or not isinstance(o_proj, torch.nn.Linear) or not hasattr(attn, "num_key_value_groups"):
        raise UnsupportedModelError(
            f"value-path edits need a llama-style attention (o_proj, head_dim, num_key_value_groups) whose output is attn_out; "
            f"{adapter.model_type} has {type(attn).__name__}"
        )
    per_head = values.reshape(-1, attn.head_dim).to(o_proj.weight)
    return o_proj.weight @ per_head.repeat_interleave(attn.num_key_value_groups, dim=0).reshape(-1)
