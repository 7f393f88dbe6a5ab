"""Teacher-forced scores under steering: the building blocks of layer/strength selection and evaluation.

* :func:`response_logprobs` — mean log-probability (nats/token) of each response given its prompt,
  optionally with a per-row edit: "how likely does the steered model find this user's own text?";
* :func:`response_kl` — mean KL(unsteered ‖ steered) of the next-token distributions over each
  response's tokens (nats/token): "how far did the edit move the model?", the fluency constraint.

Prompts and responses are rendered as a user turn and an assistant turn with the chat template
(:mod:`repedit.model.inputs`); only response tokens are scored. Rows are independent of their batch.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..capture.activations import _make_batch
from ..model.inputs import chunks, encode
from ..steering.apply import steer
from ..steering.edit import UserEdit


def _batches(tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int):
    encoded = encode(tokenizer, list(zip(prompts, responses)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start, part in chunks(encoded, batch_size):
        yield start, part, _make_batch(part, [e.response_span for e in part], pad_id, "right")


def _logits(model, batch, edits, rows, start: int, size: int) -> torch.Tensor:
    context = steer(model, edits, list(rows[start:start + size])) if edits is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    with context, torch.no_grad():
        return model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device), use_cache=False,
        ).logits.float()


def _response_positions(part) -> list[tuple[int, int]]:
    # Token t is predicted by the logits at t-1; a response starting at token 0 has no prediction for it.
    return [(max(e.response_span[0], 1) - 1, e.response_span[1] - 1) for e in part]


def response_logprobs(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
    edits: Sequence[UserEdit | None] | None = None, rows: Sequence[int | None] | None = None, batch_size: int = 8,
) -> torch.Tensor:
    """Mean log-probability per response token of each response given its prompt: ``[n]`` (nats).

    With ``edits`` and ``rows`` (``rows[i]`` = index in ``edits`` for item ``i``, or ``None``), item
    ``i`` is scored under its own edit — many users in one batch.
    """
    if edits is not None and (rows is None or len(rows) != len(prompts)):
        raise ValueError("with edits, give rows: one edit index (or None) per prompt")
    scores = torch.empty(len(prompts))
    for start, part, batch in _batches(tokenizer, prompts, responses, batch_size):
        logprobs = torch.log_softmax(_logits(model, batch, edits, rows, start, len(part)), dim=-1)
        for row, (lo, hi) in enumerate(_response_positions(part)):
            targets = batch.input_ids[row, lo + 1:hi + 1].to(logprobs.device)
            scores[start + row] = logprobs[row, lo:hi].gather(-1, targets[:, None]).mean().cpu()
    return scores


def reference_logprobs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8) -> list[torch.Tensor]:
    """Unsteered next-token log-probabilities at each response position: one ``[n_tokens_i, vocab]`` per item.

    Pass them to :func:`response_kl` as ``reference`` when the same texts are compared against many
    edits (a layer × strength sweep), so the unsteered forward runs once instead of once per edit.
    """
    reference: list[torch.Tensor] = []
    for start, part, batch in _batches(tokenizer, prompts, responses, batch_size):
        plain = torch.log_softmax(_logits(model, batch, None, None, start, len(part)), dim=-1)
        reference.extend(plain[row, lo:hi].cpu() for row, (lo, hi) in enumerate(_response_positions(part)))
    return reference


def response_kl(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
    edits: Sequence[UserEdit | None], rows: Sequence[int | None], batch_size: int = 8,
    reference: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean KL(unsteered ‖ steered) per response token of each item: ``[n]`` (nats/token).

    ``reference``: the items' unsteered log-probabilities from :func:`reference_logprobs` (computed
    here when not given).
    """
    if len(rows) != len(prompts):
        raise ValueError("give one edit index (or None) per prompt in rows")
    if reference is not None and len(reference) != len(prompts):
        raise ValueError(f"reference has {len(reference)} items for {len(prompts)} prompts")
    values = torch.empty(len(prompts))
    for start, part, batch in _batches(tokenizer, prompts, responses, batch_size):
        if reference is None:
            plain = torch.log_softmax(_logits(model, batch, None, rows, start, len(part)), dim=-1)
        steered = torch.log_softmax(_logits(model, batch, edits, rows, start, len(part)), dim=-1)
        for row, (lo, hi) in enumerate(_response_positions(part)):
            p = reference[start + row].to(steered.device) if reference is not None else plain[row, lo:hi]
            q = steered[row, lo:hi]
            values[start + row] = (p.exp() * (p - q)).sum(-1).mean().cpu()
    return values
