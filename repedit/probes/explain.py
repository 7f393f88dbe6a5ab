"""Explaining a probe direction: the tokens it promotes (logit lens) and the texts that score highest.

Logit lens of a direction
-------------------------
A direction ``v`` in the residual stream is read out the way the model reads its last hidden state,
``logits = W_U · norm(h)``, linearised at the direction:

1. the final norm's **linear part** is applied to ``v``: for LayerNorm, the mean subtraction
   (``v - mean(v)``, a linear projection); for RMSNorm, nothing;
2. then its **elementwise gain** ``g``: ``weight`` for Llama-style RMSNorm and LayerNorm, ``1 + weight``
   for norms that store the gain offset by one (Gemma, Gemma 2/3), all ones for a norm without weight
   (OLMo's LayerNorm);
3. then the unembedding: ``logits = W_U @ (g * v')`` with ``W_U`` ``[vocab, d_model]`` the LM head.

What is *not* applied, and why: the division by the RMS / standard deviation (a positive number per
token position, which rescales every logit alike and so changes no ranking), the norm's bias and the
LM head's bias (the same offset for every direction: they say nothing about ``v``), and Gemma 2's final
logit soft-capping (a monotone ``tanh``, so again no ranking changes). The logit values are therefore
those of the *unit* direction, in "logits per unit of normalised residual stream".

The gain convention is not guessed from class names: :func:`norm_gain` checks the norm module's output
on a test vector against each candidate (``weight`` or ``1 + weight``; with or without mean
subtraction) and uses the one that matches, or raises :class:`~repedit.io.InputError` for a norm it
cannot linearise this way.

Only the first ``len(tokenizer)`` rows of ``W_U`` are used: many checkpoints pad the vocabulary (e.g. to a
multiple of 64) and the padding rows are not tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..capture.activations import Activations
from ..io import InputError
from ..model.arch import get_adapter
from .types import Direction, Probe, Subspace

_CHUNK_ROWS = 16384  # unembedding rows per matmul: bounds the float32 copy of a bf16 vocab matrix


def _vector(direction: Direction | torch.Tensor) -> torch.Tensor:
    vector = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise InputError(f"a direction must be a Direction or a 1-D tensor, got {type(direction).__name__}")
    return vector.detach().float().cpu()


def norm_gain(norm: nn.Module, d_model: int) -> tuple[torch.Tensor, bool]:
    """Linearisation of a final norm: ``(gain [d_model] float32, centres)``.

    ``norm(x) ≈ gain * centre(x) / scale(x) + bias`` where ``centre`` subtracts the mean when
    ``centres`` is true (LayerNorm) and is the identity otherwise (RMSNorm). The candidates
    (``weight`` or ``1 + weight``, or ones without weight; centring or not) are checked against the
    module on a test vector ``x`` with a non-zero mean, using the odd part ``(norm(x) - norm(-x)) / 2``
    so that the bias cancels; the best match is returned if its relative error is small.
    """
    parameter = next(norm.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    weight = getattr(norm, "weight", None)
    weight = weight.detach().float().cpu().flatten() if isinstance(weight, torch.Tensor) else None
    if weight is not None and weight.numel() != d_model:
        raise InputError(f"final norm weight has {weight.numel()} values for d_model {d_model}")
    generator = torch.Generator().manual_seed(0)
    # A non-zero mean makes "centres" and "does not centre" give clearly different outputs.
    x = torch.randn(d_model, generator=generator) + 1.0
    with torch.no_grad():
        odd = (norm(x.to(device, dtype)[None]).float() - norm((-x).to(device, dtype)[None]).float()).cpu()[0] / 2
    gains = [weight, 1.0 + weight] if weight is not None else [torch.ones(d_model)]
    best: tuple[float, torch.Tensor, bool] | None = None
    for centres in (False, True):
        xc = x - x.mean() if centres else x
        unit = xc / xc.pow(2).mean().sqrt()
        for gain in gains:
            error = float((gain * unit - odd).norm() / odd.norm().clamp_min(1e-12))
            if best is None or error < best[0]:
                best = (error, gain, centres)
    assert best is not None
    # fp32 norms match to ~1e-6 (eps); bf16/fp16 round to ~1e-2. Wrong candidates are off by O(1).
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    if best[0] > tolerance:
        raise InputError(
            f"cannot linearise the final norm {type(norm).__name__}: its output matches neither weight * x nor "
            f"(1 + weight) * x (with or without mean subtraction) after normalisation (best relative error {best[0]:.3g})"
        )
    return best[1].clone(), best[2]


def unembed_direction(direction: Direction | torch.Tensor, model: nn.Module, vocab_size: int | None = None) -> torch.Tensor:
    """Logits ``[vocab]`` (float32, CPU) of a direction through the final norm's gain and the LM head.

    See the module docstring for exactly what is applied. ``vocab_size`` limits the rows of the
    unembedding (default: all of them).
    """
    adapter = get_adapter(model)
    head = adapter.unembed
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise InputError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None): load it as a causal LM")
    vector = _vector(direction)
    if vector.numel() != adapter.d_model:
        raise InputError(f"direction has {vector.numel()} dimensions but the model's d_model is {adapter.d_model}")
    gain, centres = norm_gain(adapter.final_norm, adapter.d_model)
    if centres:
        vector = vector - vector.mean()
    projected = gain * vector
    weight = head.weight.detach()
    rows = weight.shape[0] if vocab_size is None else min(int(vocab_size), weight.shape[0])
    projected = projected.to(weight.device)
    logits = [
        (weight[start:min(start + _CHUNK_ROWS, rows)].float() @ projected).cpu()
        for start in range(0, rows, _CHUNK_ROWS)
    ]
    return torch.cat(logits)


def _token_string(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id])


def logit_lens(direction: Direction | torch.Tensor, model: nn.Module, tokenizer: Any, k: int = 20) -> dict[str, Any]:
    """The ``k`` tokens a direction promotes and the ``k`` it suppresses most.

    Args:
        direction: a :class:`Direction` (its unit ``vector`` is used) or a 1-D tensor ``[d_model]``.
        model: the causal LM the direction was found in.
        tokenizer: its tokenizer; tokens are shown decoded (``tokenizer.decode([id])``), and only ids
            below ``len(tokenizer)`` are considered (padding rows of the unembedding are skipped).
            ``None`` shows ids as ``"<id>"`` and uses every row.
        k: tokens per list.

    Returns:
        ``{"promoted": [(token, logit), ...] highest first, "suppressed": [(token, logit), ...]
        lowest first, "promoted_ids", "suppressed_ids", "vocab_size", "site", "method"}`` where
        ``logit`` is ``(W_U @ (gain * v))[token]`` as described in the module docstring.
    """
    vocab_size = len(tokenizer) if tokenizer is not None else None
    logits = unembed_direction(direction, model, vocab_size)
    k = max(0, min(int(k), logits.numel()))
    top = torch.topk(logits, k)
    bottom = torch.topk(-logits, k)
    promoted_ids = top.indices.tolist()
    suppressed_ids = bottom.indices.tolist()
    return {
        "promoted": [(_token_string(tokenizer, i), float(logits[i])) for i in promoted_ids],
        "suppressed": [(_token_string(tokenizer, i), float(logits[i])) for i in suppressed_ids],
        "promoted_ids": promoted_ids,
        "suppressed_ids": suppressed_ids,
        "vocab_size": int(logits.numel()),
        "site": direction.site if isinstance(direction, Direction) else None,
        "method": direction.method if isinstance(direction, Direction) else None,
    }


def top_texts(
    direction: Probe | torch.Tensor, acts: Activations, texts: Sequence[str], site: str | None = None, k: int = 5,
) -> dict[str, Any]:
    """The dataset texts that score highest and lowest along a direction at ``site``.

    Scores are ``acts[site] @ vector`` for a :class:`Direction` or a tensor (positive = more
    personalised for a probe direction), and :meth:`Subspace.score` (the norm of the component inside
    the subspace) for a :class:`Subspace`. ``site`` defaults to the probe's own site.

    Returns:
        ``{"highest": [(text, score, item_index), ...] highest first, "lowest": [...] lowest first,
        "site": site, "mean": mean score, "std": score std}``.
    """
    if site is None:
        if isinstance(direction, torch.Tensor):
            raise InputError("top_texts needs a site when the direction is a plain tensor")
        site = direction.site
    if acts.position == "all":
        raise InputError("top_texts needs one row per item: capture with position='mean' or 'last'")
    if len(texts) != acts.n_items:
        raise InputError(f"got {len(texts)} texts for {acts.n_items} items: give one text per item")
    x = acts[site].float()
    if isinstance(direction, Subspace):
        scores = direction.score(x)
    else:
        vector = _vector(direction)
        if vector.numel() != x.shape[1]:
            raise InputError(f"direction has {vector.numel()} dimensions but site {site} has {x.shape[1]}")
        scores = x @ vector
    k = max(0, min(int(k), scores.numel()))
    high = torch.topk(scores, k).indices.tolist()
    low = torch.topk(-scores, k).indices.tolist()
    return {
        "highest": [(texts[i], float(scores[i]), i) for i in high],
        "lowest": [(texts[i], float(scores[i]), i) for i in low],
        "site": site,
        "mean": float(scores.mean()),
        "std": float(scores.std()) if scores.numel() > 1 else 0.0,
    }
