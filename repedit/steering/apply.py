"""Applying edits with hooks: one user for all rows, or a different user per row of one batch.

For each site, the edits of all users are packed into per-operator tables whose row 0 is "no edit";
a row → table index picks each batch row's parameters with one gather, so a mixed batch costs one
fused edit per site, not one per user (EasySteer-style). Rows without an edit get zero strengths,
which leaves their hidden states bit-for-bit unchanged. Works inside ``model.generate`` with left
padding and the KV cache: token positions are recomputed from the attention mask at every forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from ..io import InputError
from ..kernels import gather_add, lowrank_edit, project_edit
from ..model.arch import get_adapter
from ..model.hooks import register_site_hook
from ..model.sites import parse_site
from .edit import SiteEdit, UserEdit, check_model
from .operators import RowParams, apply_operator


@dataclass
class _Table:
    """Per-operator parameter tables for one site and slot: row 0 = no edit, row i+1 = user i."""

    operator: str
    gate: str
    index: torch.Tensor  # [B] or [1] (broadcast): row -> table row
    params: RowParams  # each tensor [n_users + 1, ...]
    needs_row_mask: bool  # clamp has no strength that can switch it off
    members: torch.Tensor | None = None  # [n_users + 1]: table row r -> r if user r - 1 has an edit in this table, else 0


class _Positions:
    """Per-forward token positions of each row (padding excluded) and each row's prompt length."""

    def __init__(self, prompt_lengths: torch.Tensor | None = None) -> None:
        self.positions: torch.Tensor | None = None  # [B, T]
        self.prompt_len: torch.Tensor | None = prompt_lengths  # [B]
        self.fixed = prompt_lengths is not None  # given by the caller (a prompt prefilled in chunks)

    def pre_hook(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, length = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        device = (input_ids if input_ids is not None else embeds).device
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            positions = (mask.long().cumsum(-1) - 1)[:, -length:]
            past = mask.shape[1] - length
            real = mask[:, -length:].bool()
        else:
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            positions = torch.arange(past, past + length, device=device).expand(batch, length)
            real = torch.ones(batch, length, dtype=torch.bool, device=device)
        if past == 0 and not self.fixed:  # a new sequence: everything seen now is the prompt
            self.prompt_len = positions.masked_fill(~real, -1).max(dim=1).values + 1
        self.positions = positions


class SteeringHandle:
    """Hooks applying edits to a model; remove them with :meth:`remove` or by leaving the ``with`` block."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# The parameters each operator reads; only these are packed and gathered per forward.
_FIELDS = {
    "add": ("vector",),  # packed as a·v, so the hook is a single gather-add
    "project_out": ("direction", "basis", "b"),
    "chameleon": ("basis", "direction", "a", "b"),
    "clamp": ("direction", "target"),
    "gated_add": ("vector", "direction", "a", "tau"),
    "lowrank": ("basis", "weight", "bias", "a"),
}


def _pack(operator: str, entries: list[tuple[int, SiteEdit]], n_users: int, d_model: int) -> RowParams:
    """Tables with one row per user (+ row 0, zeros) for the edits ``entries`` = [(user index, edit)]."""
    rows = n_users + 1
    if operator == "project_out" and any(e.basis is not None for _, e in entries):
        # A site mixing directions and subspaces: a direction is a one-row subspace, so every user's
        # edit lives in the basis table (otherwise the directions would be ignored).
        entries = [(i, e if e.basis is not None else replace(e, basis=e.direction[None, :], direction=None)) for i, e in entries]
    if operator == "add":
        vectors = torch.zeros(rows, d_model)
        for i, e in entries:
            vectors[i + 1] = e.a * e.vector
        return RowParams(vector=vectors)

    def table(name: str) -> torch.Tensor | None:
        present = [(i, getattr(e, name)) for i, e in entries if getattr(e, name) is not None]
        if not present:
            return None
        if name in ("basis", "weight", "bias"):
            # Users of one site may differ in rank k: pad with zero rows (which contribute nothing).
            k = max(t.shape[0] for _, t in present)
            out = torch.zeros(rows, k, *present[0][1].shape[1:])
            for i, t in present:
                out[i + 1, : t.shape[0]] = t
            return out
        out = torch.zeros(rows, d_model)
        for i, t in present:
            out[i + 1] = t
        return out

    def scalars(name: str, default: float) -> torch.Tensor:
        out = torch.full((rows,), default, dtype=torch.float32)
        out[0] = 0.0 if name in ("a", "b") else default
        for i, e in entries:
            out[i + 1] = getattr(e, name)
        return out

    defaults = {"a": 0.0, "b": 0.0, "target": 0.0, "tau": 1.0}
    return RowParams(**{
        name: (table(name) if name in ("vector", "direction", "basis", "weight", "bias") else scalars(name, defaults[name]))
        for name in _FIELDS[operator]
    })


def _to(params: RowParams, device: torch.device) -> RowParams:
    return RowParams(**{name: (value.to(device) if value is not None else None) for name, value in vars(params).items()})


def pack_site_tables(edits: Sequence[UserEdit | None], n_layers: int, d_model: int, device: torch.device | str = "cpu") -> dict[str, list[_Table]]:
    """Every site's per-operator tables for ``edits``: canonical site name -> tables in slot order (a user's
    second edit at one site goes to slot 1, applied after slot 0). Table row 0 = no edit, row i + 1 =
    ``edits[i]``; ``index`` is left as ``[0]`` for the caller to fill with its rows' table rows
    (``table.members[row]``). Used by :func:`steer` and by serving integrations that hook other
    model implementations (:mod:`repedit.serve.vllm`)."""
    n_users = len(edits)
    # site -> slot -> (operator, gate) -> [(user index, SiteEdit)]
    layout: dict[str, list[dict[tuple[str, str], list[tuple[int, SiteEdit]]]]] = {}
    for user_index, edit in enumerate(edits):
        if edit is None:
            continue
        seen: dict[str, int] = {}
        for site_edit in edit.edits:
            site = parse_site(site_edit.site, n_layers).name
            slot = seen.get(site, 0)
            seen[site] = slot + 1
            slots = layout.setdefault(site, [])
            while len(slots) <= slot:
                slots.append({})
            slots[slot].setdefault((site_edit.operator, site_edit.gate), []).append((user_index, site_edit))

    out: dict[str, list[_Table]] = {}
    for site_name, slots in layout.items():
        out[site_name] = []
        for slot in slots:
            for (op, gate), entries in slot.items():
                users = {u for u, _ in entries}
                members = torch.tensor([r if (r - 1) in users else 0 for r in range(n_users + 1)], device=device)
                out[site_name].append(_Table(op, gate, torch.zeros(1, dtype=torch.long, device=device), _to(_pack(op, entries, n_users, d_model), device),
                                             op == "clamp", members))
    return out


def apply_tables(hidden: torch.Tensor, tables: Sequence[_Table], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``tables`` (their ``index`` filled: one table row per batch row, or ``[1]`` to broadcast) to
    ``hidden`` ``[B, T, D]``; ``mask`` ``[B, T]`` (bool) limits the edit to some tokens. Returns the edited
    hidden states (a new tensor; rows with table row 0 keep their values bit for bit)."""
    batch = hidden.shape[0]
    out = hidden
    for table in tables:
        index = table.index if table.index.numel() == batch else table.index.expand(batch)
        if table.operator == "add":  # Triton on GPU; on CPU the same arithmetic as before
            edited = gather_add(out, index, table.params.vector)
        elif table.operator == "project_out":
            p = table.params
            edited = project_edit(out, index, p.basis if p.basis is not None else p.direction, p.b)
        elif table.operator == "lowrank":
            p = table.params
            edited = lowrank_edit(out, index, p.basis, p.weight, p.bias, p.a)
        else:
            params = RowParams(**{n: (v.index_select(0, index) if v is not None else None) for n, v in vars(table.params).items()})
            edited = apply_operator(table.operator, out, params, table.gate)
        if table.needs_row_mask or mask is not None:
            keep = (index > 0)[:, None].expand(batch, hidden.shape[1])
            if mask is not None:
                keep = keep & mask
            edited = torch.where(keep[..., None], edited, out)
        out = edited
    return out


def steer(model, edits: Sequence[UserEdit | None], rows: Sequence[int | None] | None = None,
          prompt_lengths: Sequence[int] | None = None) -> SteeringHandle:
    """Hook ``edits`` into ``model`` and return the :class:`SteeringHandle`.

    Args:
        edits: the users' edits (``None`` entries allowed: no edit).
        rows: for a mixed batch, ``rows[b]`` is the index in ``edits`` of batch row ``b``'s user (or
            ``None`` for an unsteered row); the batch given to the model must then have exactly
            ``len(rows)`` rows. ``None`` applies ``edits[0]`` to every row of any batch.
        prompt_lengths: tokens of each batch row's prompt, for the ``"prompt"``/``"generated"`` position
            rules. By default the tokens of the first forward of a sequence are its prompt; give the
            lengths when a prompt is fed in several forwards (chunked prefill).
    """
    adapter = get_adapter(model)
    present = [e for e in edits if e is not None]
    for edit in present:
        check_model(edit, model)
    if rows is not None:
        for b, r in enumerate(rows):
            if r is not None and not 0 <= r < len(edits):
                raise InputError(f"row {b} points to edit {r}, but only {len(edits)} edits were given")
        batch_index = [(r + 1) if (r is not None and edits[r] is not None) else 0 for r in rows]
    elif len(edits) != 1:
        raise InputError("without rows=..., give exactly one edit (it is applied to every row)")
    device = next(model.parameters()).device

    site_tables = pack_site_tables(edits, adapter.n_layers, adapter.d_model, device)
    index = torch.tensor(batch_index if rows is not None else [1], device=device)

    position_rules = [e.positions if e is not None else "all" for e in edits]
    needs_positions = any(rule != "all" for rule in position_rules)
    tracker = _Positions(torch.tensor(list(prompt_lengths), dtype=torch.long, device=device) if prompt_lengths is not None else None)
    handles: list[RemovableHandle] = []
    try:
        if needs_positions:
            handles.append(adapter.decoder.register_forward_pre_hook(tracker.pre_hook, with_kwargs=True))
        for site_name, tables in site_tables.items():
            tables = [replace(table, index=table.members[index]) for table in tables]
            handles.append(register_site_hook(adapter, parse_site(site_name, adapter.n_layers), _make_hook(tables, position_rules, rows, batch_index if rows is not None else None, tracker, needs_positions)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return SteeringHandle(handles)


_ALL, _PROMPT, _GENERATED, _FROM = range(4)


def _row_rules(rules: list[Any], row_users: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row position rule as ``(kind [B], from_index [B])``, computed once when steering starts.

    ``row_users[b]`` is 0 for a row without an edit, else 1 + the index of the row's edit.
    """
    kinds, starts = [], []
    for user in row_users:
        rule = rules[user - 1] if user > 0 else "all"
        kinds.append({"all": _ALL, "prompt": _PROMPT, "generated": _GENERATED}.get(rule, _FROM) if isinstance(rule, str) else _FROM)
        starts.append(int(rule) if not isinstance(rule, str) else 0)
    return torch.tensor(kinds), torch.tensor(starts)


def _position_mask(kinds: torch.Tensor, starts: torch.Tensor, tracker: _Positions) -> torch.Tensor:
    """``[B, T]`` bool: which tokens each row's user edits at this forward (vectorised over rows)."""
    positions = tracker.positions
    batch = positions.shape[0]
    kinds, starts = kinds.expand(batch)[:, None], starts.expand(batch)[:, None]
    prompt_len = (tracker.prompt_len if tracker.prompt_len is not None else torch.zeros(batch, dtype=torch.long, device=positions.device))[:, None]
    return (
        (kinds == _ALL)
        | ((kinds == _PROMPT) & (positions < prompt_len))
        | ((kinds == _GENERATED) & (positions >= prompt_len))
        | ((kinds == _FROM) & (positions >= starts))
    )


def _make_hook(tables: list[_Table], rules, rows, batch_index, tracker: _Positions, needs_positions: bool):
    if needs_positions:
        device = tables[0].index.device if tables else "cpu"
        kinds, starts = _row_rules(rules, batch_index if batch_index is not None else [1])
        kinds, starts = kinds.to(device), starts.to(device)

    def hook(hidden: torch.Tensor) -> torch.Tensor:
        if rows is not None and hidden.shape[0] != len(rows):
            raise InputError(f"steering was set up for {len(rows)} rows, but the model got a batch of {hidden.shape[0]}")
        mask = _position_mask(kinds, starts, tracker).to(hidden.device) if needs_positions else None
        return apply_tables(hidden, tables, mask)

    return hook
