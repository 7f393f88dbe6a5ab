"""Capturing hidden states at named sites: :func:`capture` and the :class:`Activations` it returns.

The native backend registers forward hooks that reduce hidden states *inside the hook* (last token,
masked mean, or the kept tokens only), runs the decoder stack without the LM head, and stops the
forward pass after the deepest requested block — so capturing costs no more than a plain forward.
Rows are independent of what else is in the batch: padding (left or right) is masked out and
``position_ids`` are computed from the attention mask.

On disk an :class:`Activations` is a directory with ``activations.json`` (sites, positions, model
fingerprint, item metadata, list of shards) and ``shard-NNNNN.safetensors`` files. With ``out_dir``
:func:`capture` streams shards there with bounded memory and resumes an interrupted run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import InputError, expect, read_json, read_tensor, save_tensors, sha256_of, write_json
from ..model.arch import get_adapter
from ..model.hooks import read_sites
from ..model.inputs import Encoded, chunks, context_length, encode
from ..model.loading import model_fingerprint
from ..model.sites import Site, parse_sites

POSITIONS: tuple[str, ...] = ("last", "mean", "all")
SPANS: tuple[str, ...] = ("full", "prompt", "response")
FORMAT_VERSION = 1
_MANIFEST = "activations.json"
_N_TOKENS = "__n_tokens__"


class Backend(Protocol):
    """A way to read full hidden states ``[batch, seq, d_model]`` at sites (TransformerLens, nnsight)."""

    name: str

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, sites: Sequence[Site]
    ) -> dict[Site, torch.Tensor]: ...


@dataclass
class Activations:
    """Hidden states of ``n_items`` inputs at a set of sites.

    For ``position`` ``"last"``/``"mean"``, ``acts[site]`` is ``[n_items, d_model]``. For ``"all"``
    it is ``[total_tokens, d_model]``: the kept tokens of every item, concatenated in order; item
    ``i`` is rows ``token_offsets[i]:token_offsets[i+1]`` (see :meth:`item`). ``n_tokens[i]`` is the
    number of token positions that item ``i`` contributed (1 for ``"last"``).

    Loaded from disk, site tensors are read lazily, one site at a time, so a large capture can be
    analysed with memory for one site only.
    """

    sites: list[str]
    position: str
    span: Any
    d_model: int
    n_tokens: torch.Tensor
    model_fingerprint: str
    model_name: str = ""
    metadata: list[dict[str, Any]] = field(default_factory=list)
    backend: str = "torch"
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _shards: list[Path] = field(default_factory=list, repr=False)

    @property
    def n_items(self) -> int:
        return int(self.n_tokens.numel())

    @property
    def token_offsets(self) -> torch.Tensor:
        """``[n_items + 1]`` start offsets of each item's rows (meaningful for ``position="all"``)."""
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.n_tokens.long(), 0)])

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        name = str(site)
        if name not in self.sites:
            raise KeyError(f"site {name!r} was not captured; captured sites: {', '.join(self.sites)}")
        if name not in self._tensors:
            parts = []
            for shard in self._shards:
                part = read_tensor(shard, name)
                if part.ndim != 2 or part.shape[-1] != self.d_model:
                    raise InputError(f"{shard}: tensor {name!r} has shape {list(part.shape)}, expected [rows, {self.d_model}] (d_model of the manifest)",
                                     path=shard, field=name)
                parts.append(part)
            return torch.cat(parts) if parts else torch.empty(0, self.d_model)
        return self._tensors[name]

    def __contains__(self, site: object) -> bool:
        return str(site) in self.sites

    def item(self, site: str | Site, index: int) -> torch.Tensor:
        """The rows of item ``index`` at ``site``: ``[n_tokens[index], d_model]``."""
        offsets = self.token_offsets
        return self[site][offsets[index]:offsets[index + 1]]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every site's tensor (loads all of them into memory)."""
        return {name: self[name] for name in self.sites}

    def _manifest(self, shards: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": "repedit.activations",
            "version": FORMAT_VERSION,
            "sites": self.sites,
            "position": self.position,
            "span": list(self.span) if isinstance(self.span, tuple) else self.span,
            "d_model": self.d_model,
            "model_fingerprint": self.model_fingerprint,
            "model_name": self.model_name,
            "backend": self.backend,
            "n_items": self.n_items,
            "metadata": self.metadata,
            "shards": shards,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the activations to ``directory`` (one shard + ``activations.json``), atomically."""
        directory = Path(directory)
        tensors = {**self.to_dict(), _N_TOKENS: self.n_tokens}
        save_tensors(directory / "shard-00000.safetensors", tensors)
        write_json(directory / _MANIFEST, self._manifest([{"file": "shard-00000.safetensors", "n_items": self.n_items}]))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Activations":
        """Open a directory written by :meth:`save` or by :func:`capture` with ``out_dir`` (lazy per site)."""
        directory = Path(directory)
        path = directory / _MANIFEST
        manifest = read_json(path, dict)
        if manifest.get("format") != "repedit.activations":
            raise InputError(f"{path}: not a repedit activations manifest (field 'format')")
        entries = expect(manifest.get("shards"), list, f"{path}: field 'shards'")
        if manifest.get("complete") is False:
            raise InputError(f"{directory}: the capture is incomplete ({len(entries)} shards written); run it again to resume")
        for name, types in (("sites", list), ("position", (str, int)), ("d_model", int), ("model_fingerprint", str),
                            ("metadata", list), ("span", (str, list, type(None)))):
            if name in manifest or name != "metadata":
                expect(manifest.get(name), types, f"{path}: field {name!r}")
        for i, site in enumerate(manifest["sites"]):
            expect(site, str, f"{path}: sites[{i}]")
        shards = []
        for i, entry in enumerate(entries):
            expect(entry, dict, f"{path}: shards[{i}]")
            file = expect(entry.get("file"), str, f"{path}: shards[{i}].file")
            if Path(file).name != file:  # a shard is a file of this directory, never a path elsewhere
                raise InputError(f"{path}: shards[{i}].file must be a file name in {directory}, got {file!r}")
            shards.append(directory / file)
        counts = []
        for shard in shards:
            count = read_tensor(shard, _N_TOKENS)
            if count.ndim != 1 or count.is_floating_point() or (count < 0).any():
                raise InputError(f"{shard}: tensor {_N_TOKENS!r} must be 1-D non-negative integers, got shape {list(count.shape)} ({count.dtype})",
                                 path=shard, field=_N_TOKENS)
            counts.append(count)
        span = manifest.get("span")
        return cls(
            sites=list(manifest["sites"]),
            position=manifest["position"],
            span=tuple(span) if isinstance(span, list) else span,
            d_model=int(manifest["d_model"]),
            n_tokens=torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long),
            model_fingerprint=manifest["model_fingerprint"],
            model_name=manifest.get("model_name", ""),
            metadata=list(manifest.get("metadata", [])),
            backend=manifest.get("backend", "torch"),
            _shards=shards,
        )


@dataclass(frozen=True)
class _Batch:
    """A padded batch on the model's device, with the gather indices every hook reuses."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    last: torch.Tensor  # [B] index of the last kept position of each row
    kept_flat: torch.Tensor  # [n_kept] indices into the flattened [B*T] positions, row-major
    mean_weights: torch.Tensor  # [B, T] float32: 1/n_kept inside each row's span, 0 elsewhere


def _resolve_span(encoded: Encoded, span: Any, index: int) -> tuple[int, int]:
    n = len(encoded.input_ids)
    if span == "full":
        lo, hi = 0, n
    elif span == "prompt":
        lo, hi = encoded.prompt_span
    elif span == "response":
        lo, hi = encoded.response_span
        if hi <= lo:
            raise InputError(
                f"input {index} has no response tokens: span='response' needs (prompt, response) pairs as inputs"
            )
    else:
        lo, hi, _ = slice(*span).indices(n)
    if hi <= lo:
        raise InputError(f"input {index}: span {span!r} selects no tokens (the input has {n} tokens)")
    return lo, hi


def _span_len(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def _make_batch(
    encoded: Sequence[Encoded], spans: Sequence[tuple[int, int]], pad_id: int, padding_side: str, device: torch.device | str = "cpu",
) -> _Batch:
    width = max(len(e.input_ids) for e in encoded)
    batch = len(encoded)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    keep = torch.zeros((batch, width), dtype=torch.bool)
    last = torch.zeros(batch, dtype=torch.long)
    for row, (item, (lo, hi)) in enumerate(zip(encoded, spans)):
        n = len(item.input_ids)
        offset = width - n if padding_side == "left" else 0
        input_ids[row, offset:offset + n] = torch.tensor(item.input_ids)
        attention_mask[row, offset:offset + n] = 1
        keep[row, offset + lo:offset + hi] = True
        last[row] = offset + hi - 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    weights = keep.to(torch.float32)
    weights = weights / weights.sum(1, keepdim=True)
    return _Batch(
        input_ids.to(device), attention_mask.to(device), position_ids.to(device), last.to(device),
        keep.reshape(-1).nonzero().squeeze(1).to(device), weights.to(device),
    )


def _reduce(hidden: torch.Tensor, batch: _Batch, position: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Reduce ``[B, T, d]`` hidden states to ``[B, d]`` (last, mean) or ``[kept tokens, d]`` (all)."""
    if position == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, batch.last].to(out_dtype)
    if position == "mean":
        return torch.einsum("bt,btd->bd", batch.mean_weights, hidden.to(torch.float32)).to(out_dtype)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.kept_flat).to(out_dtype)


def _run_native(adapter, batch: _Batch, sites: Sequence[Site], position: str, out_dtype: torch.dtype) -> dict[Site, torch.Tensor]:
    results: dict[Site, torch.Tensor] = {}

    def read(site: Site, hidden: torch.Tensor) -> None:
        results[site] = _reduce(hidden, batch, position, out_dtype)

    read_sites(adapter, sites, read, input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return results


def _get_backend(backend: "str | Backend", model: nn.Module, tokenizer) -> "Backend | None":
    if not isinstance(backend, str):
        return backend
    if backend == "torch":
        return None
    from . import backends

    return backends.make_backend(backend, model, tokenizer)


def capture(
    model: nn.Module,
    tokenizer,
    inputs: Sequence[Any],
    sites: Any = None,
    position: str = "last",
    *,
    span: Any = "full",
    batch_size: int = 8,
    padding_side: str = "right",
    max_length: int | None = None,
    truncation: str = "left",
    metadata: Sequence[dict[str, Any]] | None = None,
    backend: "str | Backend" = "torch",
    out_dir: str | Path | None = None,
    shard_size: int = 512,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Activations:
    """Capture hidden states of ``inputs`` at ``sites``.

    Args:
        inputs: texts, chat conversations, or (prompt, response) pairs (see :mod:`repedit.model.inputs`).
        sites: site names (``"resid_post.6"``), kinds (``"resid_post"`` = every layer), or ``None``
            (every ``resid_post``).
        position: ``"last"`` (last token of the span), ``"mean"`` (mean over the span) or ``"all"``
            (every token of the span).
        span: ``"full"`` (whole input), ``"prompt"``, ``"response"`` (response tokens only; needs
            pairs), or a ``(start, end)`` token slice (negative indices count from the end).
        padding_side: ``"right"`` or ``"left"``; results do not depend on it.
        max_length: context limit in tokens (default: the model's); longer inputs are truncated as
            ``truncation`` says (``"left"``, ``"right"`` with a warning, or ``"error"``).
        metadata: one JSON-serialisable dict per input (labels, ids), stored with the activations.
        backend: ``"torch"`` (native hooks, default), ``"transformer_lens"``, ``"nnsight"``, or a
            backend object from :mod:`repedit.capture.backends`.
        out_dir: stream shards of ``shard_size`` items to this directory (bounded memory) and resume
            a previous interrupted run with the same inputs and settings.
        dtype: dtype of the stored activations.

    Returns:
        :class:`Activations` (lazy, per site, when ``out_dir`` is given).
    """
    if position not in POSITIONS:
        raise InputError(f"unknown position {position!r}: expected one of {', '.join(POSITIONS)}")
    if not (span in SPANS or (isinstance(span, (tuple, list)) and len(span) == 2)):
        raise InputError(f"unknown span {span!r}: expected one of {', '.join(SPANS)} or a (start, end) token slice")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(inputs, (str, dict)):
        inputs = [inputs]
    adapter = get_adapter(model)
    parsed_sites = sorted(parse_sites(sites, adapter.n_layers), key=lambda s: (s.layer, s.kind))
    if metadata is not None and len(metadata) != len(inputs):
        raise InputError(f"metadata has {len(metadata)} entries for {len(inputs)} inputs: give one dict per input")
    span = tuple(span) if isinstance(span, list) else span
    encoded = encode(tokenizer, inputs, max_length=max_length or context_length(model, tokenizer), truncation=truncation)
    spans = [_resolve_span(item, span, index) for index, item in enumerate(encoded)]
    runner = _get_backend(backend, model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    fingerprint = model_fingerprint(model)
    template = Activations(
        sites=[s.name for s in parsed_sites],
        position=position,
        span=span,
        d_model=adapter.d_model,
        n_tokens=torch.zeros(0, dtype=torch.long),
        model_fingerprint=fingerprint,
        model_name=str(getattr(model.config, "repedit_name", getattr(model.config, "_name_or_path", ""))),
        metadata=[dict(m) for m in metadata] if metadata is not None else [{} for _ in inputs],
        backend=runner.name if runner is not None else "torch",
    )

    run_key = sha256_of({
        "ids": [e.input_ids for e in encoded], "spans": spans, "sites": template.sites, "position": position,
        "fingerprint": fingerprint, "dtype": str(dtype), "shard_size": shard_size, "backend": template.backend,
    })
    out_path = Path(out_dir) if out_dir is not None else None
    done_shards: list[dict[str, Any]] = []
    if out_path is not None and (out_path / _MANIFEST).exists():
        previous = read_json(out_path / _MANIFEST)
        if previous.get("run_key") == run_key:
            done_shards = [s for s in previous["shards"] if (out_path / s["file"]).exists()]
        else:
            warnings.warn(f"{out_path}: existing activations come from other inputs or settings; they are replaced", stacklevel=2)

    def manifest(shards: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        return {**template._manifest(shards), "run_key": run_key, "complete": complete, "n_items": len(encoded)}

    memory_parts: dict[str, list[torch.Tensor]] = {name: [] for name in template.sites}
    count_parts: list[torch.Tensor] = []
    chunk_size = shard_size if out_path is not None else max(len(encoded), 1)
    n_batches = sum(-(-len(part) // batch_size) for _, part in chunks(encoded, chunk_size))
    bar = tqdm(total=n_batches, desc="capture", unit="batch", disable=not progress)
    with torch.no_grad():
        for shard_index, (start, part) in enumerate(chunks(encoded, chunk_size)):
            if shard_index < len(done_shards):
                bar.update(-(-len(part) // batch_size))
                continue
            part_spans = spans[start:start + len(part)]
            # Batches of similar length waste less compute on padding; results are put back in order.
            order = sorted(range(len(part)), key=lambda i: len(part[i].input_ids))
            batch_parts: dict[str, list[torch.Tensor]] = {name: [] for name in template.sites}
            for _, batch_indices in chunks(order, batch_size):
                batch = _make_batch([part[i] for i in batch_indices], [part_spans[i] for i in batch_indices], pad_id, padding_side, device)
                if runner is None:
                    reduced = _run_native(adapter, batch, parsed_sites, position, dtype)
                else:
                    full = runner.run(batch.input_ids, batch.attention_mask, batch.position_ids, parsed_sites)
                    reduced = {site: _reduce(full[site], batch, position, dtype) for site in parsed_sites}
                for site in parsed_sites:
                    batch_parts[site.name].append(reduced[site])
                bar.update(1)
            # Rows are in length-sorted order; one gather per site puts them back in input order.
            sorted_counts = torch.tensor([_span_len(part_spans[i]) if position == "all" else 1 for i in order], dtype=torch.long)
            sorted_starts = torch.cumsum(sorted_counts, 0) - sorted_counts
            rank = torch.empty(len(order), dtype=torch.long)
            rank[torch.tensor(order)] = torch.arange(len(order))
            shard_counts = sorted_counts[rank]
            gather = torch.cat([torch.arange(int(sorted_starts[r]), int(sorted_starts[r] + sorted_counts[r])) for r in rank.tolist()])
            shard_tensors = {}
            for name, parts in batch_parts.items():
                stacked = parts[0] if len(parts) == 1 else torch.cat(parts)
                shard_tensors[name] = stacked.index_select(0, gather.to(stacked.device)).cpu()
            if out_path is None:
                for name, tensor in shard_tensors.items():
                    memory_parts[name].append(tensor)
                count_parts.append(shard_counts)
            else:
                file_name = f"shard-{shard_index:05d}.safetensors"
                save_tensors(out_path / file_name, {**shard_tensors, _N_TOKENS: shard_counts})
                done_shards.append({"file": file_name, "n_items": len(part)})
                write_json(out_path / _MANIFEST, manifest(done_shards, complete=False))
    bar.close()
    if out_path is not None:
        write_json(out_path / _MANIFEST, manifest(done_shards, complete=True))
        return Activations.load(out_path)
    template.n_tokens = count_parts[0] if len(count_parts) == 1 else torch.cat(count_parts)
    template._tensors = {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in memory_parts.items()}
    return template
