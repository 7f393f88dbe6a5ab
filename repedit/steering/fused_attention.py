"""The fused attention + edit kernel as a Hugging Face attention implementation, for ``attn_out`` edits.

:func:`repedit.kernels.attention_edit` computes a llama-style attention sub-layer — attention,
``o_proj`` and the per-row edit of its output, the ``attn_out.L`` site — in one Triton launch.
This module plugs it into a transformers 5.x model:

* the function :func:`_attention_forward` is registered under :data:`ATTENTION_NAME` in
  ``transformers.AttentionInterface`` (what ``LlamaAttention.forward`` looks up through
  ``ALL_ATTENTION_FUNCTIONS``), and SDPA's mask builder under the same name in
  ``transformers.masking_utils.AttentionMaskInterface``, so the kernel receives SDPA's masks
  (``None`` for plain causal attention, else a 4-D bool mask with causality, padding — left padding
  included — and sliding windows folded in);
* :func:`install_attention_edits` switches the model to that implementation, marks the attention
  modules of the fused sites with their edit tables and makes their ``o_proj`` an identity (the
  kernel already applied it). Attention modules without edits are passed on to SDPA unchanged.
  Everything is undone by the returned handle's ``remove()``.

A site ``attn_out.L`` is fused when the attention module's output is what the block adds (no
post-norm: llama, mistral, mixtral, qwen2/3, phi3, gemma, olmo, smollm3), it has a bias-free or
biased ``nn.Linear`` ``o_proj``, and every user's edits there are at most one ``project_out``
followed by ``add`` edits, on ``"all"`` positions (the kernel's order: projection, then add). Users'
adds at one site are summed into one vector (the hooks add them one by one: equal up to rounding).
Value-path edits reach it as ``add`` edits at ``attn_out`` (:func:`repedit.steering.value_edit_as_attn_out`);
the kernel's own value-path input (``values=``) is for callers that hold value vectors per KV head.

Caveats: while installed, unedited layers run SDPA even if the model was set to eager attention
(the masks are SDPA's), and hooks on an edited layer's ``o_proj`` see its output, not its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..io import InputError
from ..kernels.ops import attention_edit
from ..model.arch import get_adapter
from ..model.sites import Site, parse_site
from .edit import SiteEdit, UserEdit

ATTENTION_NAME = "repedit_fused_attention"
_MARK = "_repedit_attention_edit"


@dataclass
class AttentionTables:
    """One fused site: ``index`` ``[B]`` (``[1]`` = every row; ``-1`` = no edit), per-user tables
    ``basis`` ``[U, k, d]`` + ``strength`` ``[U]`` (projection) and ``table`` ``[U, d]`` (summed adds);
    ``rows``: the batch size steering was set up for (``None``: any)."""

    index: torch.Tensor
    basis: torch.Tensor | None
    strength: torch.Tensor | None
    table: torch.Tensor | None
    rows: int | None
    calls: int = 0  # forwards that ran the fused kernel (tests read it)


def register_attention() -> str:
    """Register :data:`ATTENTION_NAME` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def _attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function HF calls: ``query`` ``[B, H, Tq, hd]``, ``key``/``value``
    ``[B, Hkv, Tkv, hd]`` → ``([B, Tq, d], None)`` for a fused module (the edited ``o_proj`` output;
    its ``o_proj`` is an identity meanwhile), else SDPA's ``[B, Tq, H, hd]``."""
    tables: AttentionTables | None = getattr(module, _MARK, None)
    if tables is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if dropout or kwargs.get("softcap") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("the fused attention kernel has no dropout, soft-capping or attention sinks")
    batch = query.shape[0]
    if tables.rows is not None and batch != tables.rows:
        raise InputError(f"steering was set up for {tables.rows} rows, but the model got a batch of {batch}")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype != torch.bool:
        raise NotImplementedError(f"the fused attention kernel takes bool masks (SDPA's), got {attention_mask.dtype}")
    index = tables.index if tables.index.numel() == batch else tables.index.expand(batch)
    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    o_proj = module.o_proj
    out = attention_edit(
        query, key, value, o_proj.weight, o_proj.bias, index, scale=scaling, causal=causal, mask=attention_mask,
        basis=tables.basis, strength=tables.strength, table=tables.table,
    )
    tables.calls += 1
    return out, None


def _site_plan(edits: Sequence[UserEdit | None], layer: int, n_layers: int) -> list[tuple[int, list[SiteEdit]]] | None:
    """Per user, the edits at ``attn_out.layer`` if the kernel can apply them all, else ``None``."""
    site = Site("attn_out", layer)
    plan = []
    for user, edit in enumerate(edits):
        here = [e for e in (edit.edits if edit is not None else []) if parse_site(e.site, n_layers) == site]
        if not here:
            continue
        ops = [e.operator for e in here]
        if edit.positions != "all" or any(op not in ("add", "project_out") for op in ops):
            return None
        if ops.count("project_out") > 1 or ("project_out" in ops and ops[0] != "project_out"):
            return None  # an add before the projection would be projected too: not the kernel's order
        plan.append((user, here))
    return plan


def _attention_fusable(adapter, layer: int) -> bool:
    attn = adapter.attn(layer)
    return (adapter.layout.attn_out is None and isinstance(getattr(attn, "o_proj", None), torch.nn.Linear)
            and hasattr(attn, "num_key_value_groups") and getattr(adapter.model.config, "_attn_implementation", None) is not None)


def fusable_attn_out_layers(model, edits: Sequence[UserEdit | None]) -> list[int]:
    """The layers whose ``attn_out`` edits (all of them, every user) the fused attention can apply."""
    adapter = get_adapter(model)
    can_set = getattr(model, "_can_set_attn_implementation", lambda: False)()
    layers = sorted({parse_site(e.site, adapter.n_layers).layer for edit in edits if edit is not None for e in edit.edits
                     if parse_site(e.site, adapter.n_layers).kind == "attn_out"})
    return [layer for layer in layers if can_set and _attention_fusable(adapter, layer) and _site_plan(edits, layer, adapter.n_layers)]


def _tables(plan: list[tuple[int, list[SiteEdit]]], n_users: int, d_model: int, device: torch.device) -> tuple:
    """``(basis [U, k, d] | None, strength [U] | None, table [U, d] | None)`` for one site."""
    projections = [(u, e[0]) for u, e in plan if e[0].operator == "project_out"]
    adds = [(u, a) for u, here in plan for a in here if a.operator == "add"]
    basis = strength = table = None
    if projections:
        bases = {u: (e.basis if e.basis is not None else e.direction[None, :]).float() for u, e in projections}
        k = max(b.shape[0] for b in bases.values())
        basis = torch.zeros(n_users, k, d_model)
        strength = torch.zeros(n_users)
        for (u, e) in projections:
            basis[u, : bases[u].shape[0]] = bases[u]
            strength[u] = e.b
        basis, strength = basis.to(device), strength.to(device)
    if adds:
        table = torch.zeros(n_users, d_model)
        for u, e in adds:
            table[u] += e.a * e.vector.float()
        table = table.to(device)
    return basis, strength, table


class AttentionEditHandle:
    """Undoes :func:`install_attention_edits`: the previous attention implementation, marks, ``o_proj``."""

    def __init__(self, model, previous: str, modules: list[torch.nn.Module]) -> None:
        self.model, self.previous, self.modules = model, previous, modules
        self.switched = False

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop(_MARK, None)
            module.o_proj.__dict__.pop("forward", None)
        if self.switched:
            self.model.set_attn_implementation(self.previous)
        self.modules, self.switched = [], False


def install_attention_edits(model, edits: Sequence[UserEdit | None], rows: Sequence[int | None] | None,
                            layers: Sequence[int]) -> tuple[AttentionEditHandle, dict[int, AttentionTables]]:
    """Fuse the ``attn_out.L`` edits of ``layers`` (from :func:`fusable_attn_out_layers`) into the
    attention kernel; returns the handle and the per-layer tables. ``rows`` as in :func:`~repedit.steering.steer`."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    register_attention()
    installed: dict[int, AttentionTables] = {}
    handle = AttentionEditHandle(model, previous, [])
    if not layers:
        return handle, installed
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        handle.switched = True
        for layer in layers:
            plan = _site_plan(edits, layer, adapter.n_layers)
            users = {u for u, _ in plan}
            if rows is not None:
                index = [r if (r is not None and r in users) else -1 for r in rows]
            else:
                index = [0 if 0 in users else -1]
            basis, strength, table = _tables(plan, len(edits), adapter.d_model, device)
            tables = AttentionTables(torch.tensor(index, device=device), basis, strength, table, len(rows) if rows is not None else None)
            attn = adapter.attn(layer)
            handle.modules.append(attn)
            setattr(attn, _MARK, tables)
            attn.o_proj.forward = _identity  # the kernel returns o_proj's (edited) output
            installed[layer] = tables
    except BaseException:
        handle.remove()
        raise
    return handle, installed


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
