"""Batched chat generation with left padding: the one place repedit calls ``model.generate``.

Used by the pair generator (and later by steering and serving). Rows are rendered with the chat
template, left-padded, and generated together; greedy decoding is the default (deterministic).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .inputs import chunks
from .io import InputError

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


def generate_batch(model, tokenizer, conversations: Sequence[Conversation], settings: GenerationSettings, *, seed_offset: int = 0) -> list[Generated]:
    """Generate one response per conversation in a single ``model.generate`` call (left padding).

    With sampling, the generator is seeded with ``settings.seed + seed_offset`` so that a batch is
    reproducible.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(tokenizer, model)
    input_ids, attention_mask = left_pad([render_chat(tokenizer, c) for c in conversations], pad_id)
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "pad_token_id": pad_id,
        "repetition_penalty": settings.repetition_penalty, "no_repeat_ngram_size": settings.no_repeat_ngram_size,
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
    *, progress: bool = True, desc: str = "generate",
) -> list[Generated]:
    """Generate responses for many conversations in batches of ``settings.batch_size``, in input order."""
    results: list[Generated] = []
    batches = list(chunks(list(conversations), settings.batch_size))
    for start, batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        results.extend(generate_batch(model, tokenizer, batch, settings, seed_offset=start))
    return results
