"""Compress a vector store: one PCA basis per site shared by all users, each user keeping only coefficients.

Per site, with the additive vectors ``v_u`` ``[d]`` of the ``n`` users editing it (raw vectors; each
edit's strength ``a`` is kept aside, unchanged)::

    μ = mean_u v_u,   V − μ = U S Wᵀ (SVD),   B = first k rows of Wᵀ  [k, d] (orthonormal),
    c_u = B (v_u − μ)  [k],   v̂_u = μ + Bᵀ c_u

``k`` is capped at ``n − 1`` (``n`` centred vectors span at most ``n − 1`` directions; at that ``k``
the reconstruction is exact). A site edited by one user only stays in full. Users whose edits are not
all ``add`` (at distinct sites) are left as they are; all compressed users must share one model.

Files: ``_basis@<g>.safetensors`` (``<site>.mean`` ``[d]``, ``<site>.basis`` ``[k, d]``, float32) +
``_basis@<g>.json`` (``k``, per-site ``k`` and explained variance, model fingerprint — no user ids);
per user ``<id>@<g>.safetensors`` holds ``<i>.coef`` ``[k]`` in place of ``<i>.vector``, and
``<id>@<g>.json`` (format ``repedit.compressed_user_edit``) names the basis. ``VectorStore.get``
reconstructs ``v̂``. Compressing again starts from the current (already reconstructed) vectors: a
larger ``k`` later cannot bring back what a smaller one discarded (compress a copy to compare).

**Report** (:class:`CompressionReport`):

* reconstruction error per user and site: ``‖v − v̂‖ / ‖v‖``;
* steering effect lost (given a model, its tokenizer and prompts): every prompt, rendered as a user
  turn with the chat template, runs unsteered, with the original edit and with the compressed one;
  over all token positions, ``kl_to_original`` = mean KL(p_original ‖ p_compressed) of the next-token
  distributions (nats/token), ``kl_effect`` = mean KL(p_original ‖ p_unsteered) (the edit's own effect,
  for scale) and ``effect_lost`` = ‖log p_compressed − log p_original‖ / ‖log p_original − log
  p_unsteered‖ (norms over positions × vocabulary): 0 = the original effect, 1 = as far from it as
  not steering at all;
* bytes of the compressed users' files before and after (plus the basis): ``tensor`` counts the
  safetensors files (the vectors), ``total`` adds the JSON metadata; ratio = before / after. It pays
  off with many users: ``d`` floats per user become ``k``, plus a shared ``(k + 1)·d`` basis.

**Forget**: the basis is a function of every vector it was fitted on. When a contributing user is
forgotten, the store refits it (same ``k``) on the remaining compressed users' current
vectors, so the forgotten vector is no longer a direction of the basis; those users'
reconstructions do not change (they lie in an affine space of dimension ≤ k, which the refit
spans). They were themselves projections on the old basis, though: to remove every trace of a user,
recompress from uncompressed edits.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputError, expect, load_tensors, save_tensors, write_json
from ..steering.edit import FORMAT_VERSION, INDEX_CONVENTION, UserEdit

COMPRESSED_FORMAT = "repedit.compressed_user_edit"
BASIS_FORMAT = "repedit.store_basis"
_BASIS_CACHE: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


@dataclass
class CompressionReport:
    """Outcome of :meth:`repedit.store.vectors.VectorStore.compress` (measures in the module docstring)."""

    k: int
    users: list[str]
    skipped: dict[str, str]
    sites: dict[str, dict[str, Any]]
    reconstruction_error: dict[str, dict[str, float]]
    tensor_bytes_before: int
    tensor_bytes_after: int
    total_bytes_before: int
    total_bytes_after: int
    effect: dict[str, dict[str, float]] | None = None

    @property
    def tensor_ratio(self) -> float:
        return self.tensor_bytes_before / max(self.tensor_bytes_after, 1)

    @property
    def total_ratio(self) -> float:
        return self.total_bytes_before / max(self.total_bytes_after, 1)

    def summary(self) -> dict[str, float]:
        """Means over users: reconstruction error, and the effect measures when measured."""
        errors = [e for per_site in self.reconstruction_error.values() for e in per_site.values()]
        out = {"k": self.k, "users": len(self.users), "tensor_ratio": self.tensor_ratio, "total_ratio": self.total_ratio,
               "mean_reconstruction_error": sum(errors) / max(len(errors), 1), "max_reconstruction_error": max(errors, default=0.0)}
        if self.effect:
            for key in ("kl_to_original", "kl_effect", "effect_lost"):
                out[f"mean_{key}"] = sum(e[key] for e in self.effect.values()) / len(self.effect)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tensor_ratio": self.tensor_ratio, "total_ratio": self.total_ratio, "summary": self.summary()}


# ----------------------------------------------------------------------------- reading


def load_basis(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """Tensors of a basis file; cached by (path, mtime, size) — store files are never rewritten in place."""
    path = Path(directory) / f"{name}.safetensors"
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _BASIS_CACHE:
        if len(_BASIS_CACHE) > 8:
            _BASIS_CACHE.clear()
        _BASIS_CACHE[key] = load_tensors(path)
    return _BASIS_CACHE[key]


def load_compressed(directory: Path, base: Path, meta: dict) -> UserEdit:
    """Rebuild a compressed user's :class:`UserEdit`: ``v̂ = μ + Bᵀ c`` for every coefficient edit; every
    field, tensor and the basis are checked (:mod:`repedit.steering.edit_files`)."""
    from ..steering.edit_files import build_edit, check_meta, check_tensors

    json_path, tensor_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")
    check_meta(meta, str(json_path), path=json_path, extra_entry_keys=("coef",))
    basis_name = expect(meta.get("basis"), str, f"{json_path}: field 'basis'", path=json_path, field="basis")
    tensors = load_tensors(tensor_path)
    basis = load_basis(directory, basis_name)
    resolved: dict[str, torch.Tensor] = {}
    for index, entry in enumerate(meta["edits"]):
        coef_name = f"{index}.coef"
        if not expect(entry.get("coef", False), bool, f"{json_path}: field 'edits[{index}].coef'", path=json_path):
            continue
        site = entry["site"]
        mean, rows = basis.get(f"{site}.mean"), basis.get(f"{site}.basis")
        coef = tensors.pop(coef_name, None)
        if mean is None or rows is None:
            raise InputError(f"{directory / basis_name}.safetensors: no basis for site {site!r} (needed by {json_path})", path=json_path)
        if coef is None or coef.ndim != 1 or rows.ndim != 2 or coef.shape[0] != rows.shape[0] or list(mean.shape) != [rows.shape[-1]]:
            raise InputError(f"{tensor_path}: tensor {coef_name!r} has shape {None if coef is None else list(coef.shape)}; expected "
                             f"[{rows.shape[0] if rows.ndim == 2 else 'k'}] (the basis of {site} is {list(rows.shape)}, its mean {list(mean.shape)})",
                             path=tensor_path, field=coef_name)
        resolved[f"{index}.vector"] = mean.float() + coef.float() @ rows.float()
    by_edit = check_tensors({**tensors, **resolved}, meta, str(tensor_path), path=tensor_path)
    return build_edit(meta, by_edit, str(base), path=json_path)


# ----------------------------------------------------------------------------- writing


def write_compressed(directory: Path, base: str, edit: UserEdit, coefs: dict[int, torch.Tensor], basis_name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for index, site_edit in enumerate(edit.edits):
        entries.append({"site": site_edit.site, "operator": site_edit.operator, "a": site_edit.a, "b": site_edit.b,
                        "target": site_edit.target, "tau": site_edit.tau, "gate": site_edit.gate, "coef": index in coefs})
        if index in coefs:
            tensors[f"{index}.coef"] = coefs[index]
        else:
            tensors[f"{index}.vector"] = site_edit.vector
    save_tensors(directory / f"{base}.safetensors", tensors)
    write_json(directory / f"{base}.json", {
        "format": COMPRESSED_FORMAT, "version": FORMAT_VERSION, "basis": basis_name, "user_id": edit.user_id,
        "model_fingerprint": edit.model_fingerprint, "d_model": edit.d_model, "positions": edit.positions, "method": edit.method,
        "provenance": edit.provenance, "index_convention": INDEX_CONVENTION, "edits": entries,
    })


def not_compressible(edit: UserEdit) -> str | None:
    """Why ``edit`` cannot be stored as coefficients of a shared basis, or ``None`` if it can."""
    if not all(e.is_additive for e in edit.edits):
        return "not all edits are additive ('add')"
    if len({e.site for e in edit.edits}) != len(edit.edits):
        return "two edits at one site"
    return None


@dataclass
class Bases:
    """What :func:`fit_bases` found: the basis file's tensors (``<site>.mean`` ``[d]``,
    ``<site>.basis`` ``[k_site, d]``, float32), per site ``{k, n_users, explained_variance}``, and per
    user the coefficients ``{edit index: c [k_site]}`` of their compressed edits."""

    tensors: dict[str, torch.Tensor]
    sites: dict[str, dict[str, Any]]
    coefs: dict[str, dict[int, torch.Tensor]]


def fit_bases(edits: dict[str, UserEdit], k: int) -> Bases:
    """Per site, the PCA basis of the users' vectors and each user's coefficients (module docstring).

    Pure maths: nothing is read or written. A site edited by one user gets ``k = 0`` (kept in full)."""
    members: dict[str, list[tuple[str, int]]] = {}
    for user, edit in edits.items():
        for index, site_edit in enumerate(edit.edits):
            members.setdefault(site_edit.site, []).append((user, index))
    tensors: dict[str, torch.Tensor] = {}
    sites: dict[str, dict[str, Any]] = {}
    coefs: dict[str, dict[int, torch.Tensor]] = {user: {} for user in edits}
    for site, rows in members.items():
        if len(rows) < 2:
            sites[site] = {"k": 0, "n_users": 1, "explained_variance": 1.0}
            continue
        vectors = torch.stack([edits[u].edits[i].vector.double() for u, i in rows])
        mean = vectors.mean(0)
        _, singular, right = torch.linalg.svd(vectors - mean, full_matrices=False)
        k_site = min(k, len(rows) - 1)
        mean32, basis32 = mean.float(), right[:k_site].float()
        # Coefficients against the float32 tensors actually stored, so get() reconstructs the best fit.
        c = ((vectors - mean32.double()) @ basis32.double().T).float()
        tensors[f"{site}.mean"], tensors[f"{site}.basis"] = mean32, basis32
        total = float((singular ** 2).sum())
        sites[site] = {"k": k_site, "n_users": len(rows), "explained_variance": float((singular[:k_site] ** 2).sum()) / total if total > 0 else 1.0}
        for row, (user, index) in enumerate(rows):
            coefs[user][index] = c[row]
    return Bases(tensors, sites, coefs)


def write_basis(directory: Path, name: str, bases: Bases, k: int, model_fingerprint: str) -> None:
    """Write the basis file pair ``<name>.safetensors`` + ``<name>.json`` (atomically, each)."""
    save_tensors(directory / f"{name}.safetensors", bases.tensors)
    write_json(directory / f"{name}.json", {"format": BASIS_FORMAT, "version": 1, "k": k, "sites": bases.sites,
                                             "model_fingerprint": model_fingerprint})


def reconstruction_errors(originals: dict[str, UserEdit], restored: dict[str, UserEdit]) -> dict[str, dict[str, float]]:
    """Per user and site ``‖v − v̂‖ / ‖v‖``."""
    return {user: {o.site: float((o.vector.double() - r.vector.double()).norm() / o.vector.double().norm().clamp_min(1e-30))
                   for o, r in zip(originals[user].edits, restored[user].edits)} for user in originals}


# ----------------------------------------------------------------------------- effect


def _log_probs(model, ids: torch.Tensor, mask: torch.Tensor, edit: UserEdit | None) -> torch.Tensor:
    context = edit.apply(model) if edit is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with context, torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)[mask.bool().to(device)].cpu()


def steering_effect(model, tokenizer, originals: dict[str, UserEdit], approximations: dict[str, UserEdit],
                    prompts: Sequence[str], batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Per user: ``kl_to_original``, ``kl_effect`` and ``effect_lost`` (definitions in the module docstring)."""
    from ..model.generation import left_pad, render_chat

    if not prompts:
        raise InputError("no prompts to measure the steering effect on")
    rows = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [left_pad(rows[s:s + batch_size], pad) for s in range(0, len(rows), batch_size)]

    def run(edit: UserEdit | None) -> torch.Tensor:
        return torch.cat([_log_probs(model, ids, mask, edit) for ids, mask in batches])

    unsteered = run(None)
    out = {}
    for user, original in originals.items():
        lo, lc = run(original), run(approximations[user])
        po = lo.exp()
        out[user] = {
            "kl_to_original": float((po * (lo - lc)).sum(-1).mean()),
            "kl_effect": float((po * (lo - unsteered)).sum(-1).mean()),
            "effect_lost": float((lc - lo).norm() / (lo - unsteered).norm().clamp_min(1e-30)),
        }
    return out


__all__ = ["BASIS_FORMAT", "Bases", "COMPRESSED_FORMAT", "CompressionReport", "fit_bases", "load_basis", "load_compressed",
           "not_compressible", "reconstruction_errors", "steering_effect", "write_basis", "write_compressed"]
