"""Batched chat generation with left padding: the one place repedit calls ``model.generate``.

Used by the pair generator (and later by steering and serving). Rows are rendered with the chat
template, left-padded, and generated together; greedy decoding is the default (deterministic).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..io import InputError
from .inputs import chunks

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. Greedy unless ``do_sample``; with sampling, ``seed`` makes runs repeatable.

    ``max_new_tokens`` bounds each response; a response that reaches it without an end-of-turn token
    is reported as not ``finished`` (truncated). ``repetition_penalty`` (> 1 discourages repeats) and
    ``no_repeat_ngram_size`` (0 = off) are Hugging Face's; small models loop without them.
    """

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.do_sample and not (0.0 < self.temperature <= 5.0):
            raise InputError(f"temperature must be in (0, 5], got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generated:
    """One generated response: its text (special tokens removed, stripped), whether the model ended
    the turn itself (``finished``; ``False`` = cut at ``max_new_tokens``), and its length in tokens."""

    text: str
    finished: bool
    n_tokens: int


def render_chat(tokenizer, conversation: Conversation) -> list[int]:
    """Token ids of ``conversation`` with the chat template and the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(message["content"] for message in conversation) + "\n\n"
    return list(tokenizer(text)["input_ids"])


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[index, width - len(row):] = 1
    return input_ids, attention_mask


def _stop_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    flat: set[int] = set()
    for value in ids:
        if isinstance(value, int):
            flat.add(value)
        elif isinstance(value, (list, tuple)):
            flat.update(v for v in value if isinstance(v, int))
    return sorted(flat)


def _shared_prefix_cache(model, tokenizer, conversations: Sequence[Conversation], rows: list[list[int]], prefix_messages: Sequence[int], pad_id: int):
    """KV cache of each distinct conversation prefix, computed once and expanded to the rows using it.

    Returns ``(input_ids, attention_mask, cache)`` for ``model.generate`` — ``input_ids`` is each
    row's left-padded prefix followed by its left-padded remainder, and ``cache`` already holds the
    prefix part — or ``None`` when the prefixes cannot be shared (a prefix that does not tokenise to
    a prefix of the full conversation, an empty prefix, or no prefix used by two rows).
    """
    from transformers import DynamicCache

    prefixes: list[list[int]] = []
    for conversation, row, n in zip(conversations, rows, prefix_messages):
        if n <= 0 or not getattr(tokenizer, "chat_template", None):
            return None
        text = tokenizer.apply_chat_template(list(conversation[:n]), tokenize=False)
        prefix = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not prefix or row[: len(prefix)] != prefix or len(prefix) == len(row):
            return None
        prefixes.append(prefix)
    distinct = list(dict.fromkeys(tuple(p) for p in prefixes))
    if len(distinct) == len(prefixes):
        return None
    device = next(model.parameters()).device
    prefix_ids, prefix_mask = left_pad([list(p) for p in distinct], pad_id)
    cache = DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(
            input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True, **{cache_arg: cache},
        )
    which = torch.tensor([distinct.index(tuple(p)) for p in prefixes])
    cache.batch_select_indices(which.to(device))
    rest_ids, rest_mask = left_pad([row[len(p):] for row, p in zip(rows, prefixes)], pad_id)
    input_ids = torch.cat([prefix_ids[which], rest_ids], dim=1)
    attention_mask = torch.cat([prefix_mask[which], rest_mask], dim=1)
    return input_ids, attention_mask, {cache_arg: cache}


def generate_batch(
    model, tokenizer, conversations: Sequence[Conversation], settings: GenerationSettings, *, seed_offset: int = 0,
    prefix_messages: Sequence[int] | None = None,
) -> list[Generated]:
    """Generate one response per conversation in a single ``model.generate`` call (left padding).

    ``prefix_messages[i]`` is the number of leading messages of conversation ``i`` that other rows
    may share (e.g. a user's system message and few-shot turns): each distinct prefix is run once
    and its KV cache reused by every row that starts with it, which removes most of the prefill cost
    when many prompts share a long prefix. Results equal the unshared computation up to float
    rounding. With sampling, the generator is seeded with ``settings.seed + seed_offset``.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(tokenizer, model)
    rows = [render_chat(tokenizer, c) for c in conversations]
    shared = _shared_prefix_cache(model, tokenizer, conversations, rows, prefix_messages, pad_id) if prefix_messages is not None else None
    extra: dict[str, Any] = {}
    if shared is None:
        input_ids, attention_mask = left_pad(rows, pad_id)
    else:
        input_ids, attention_mask, extra = shared
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "pad_token_id": pad_id,
        "repetition_penalty": settings.repetition_penalty, "no_repeat_ngram_size": settings.no_repeat_ngram_size, **extra,
    }
    if stop:
        kwargs["eos_token_id"] = stop
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        torch.manual_seed(settings.seed + seed_offset)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    new_tokens = output[:, input_ids.shape[1]:].cpu()
    results = []
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stop), None)
        kept = row if end is None else row[:end]
        results.append(Generated(tokenizer.decode(kept, skip_special_tokens=True).strip(), end is not None, len(kept)))
    return results


def generate_chat(
    model, tokenizer, conversations: Sequence[Conversation], settings: GenerationSettings = GenerationSettings(),
    *, progress: bool = True, desc: str = "generate", prefix_messages: Sequence[int] | None = None,
) -> list[Generated]:
    """Generate responses for many conversations in batches of ``settings.batch_size``, in input order.

    ``prefix_messages``: see :func:`generate_batch` (shared-prefix KV caching within each batch).
    """
    results: list[Generated] = []
    batches = list(chunks(list(conversations), settings.batch_size))
    for start, batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        shared = prefix_messages[start:start + len(batch)] if prefix_messages is not None else None
        results.extend(generate_batch(model, tokenizer, batch, settings, seed_offset=start, prefix_messages=shared))
    return results
