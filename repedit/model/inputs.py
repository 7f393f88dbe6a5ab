"""Turning user inputs (texts, chat conversations, prompt/response pairs) into token ids with spans.

Accepted forms of one input item:

* ``"some text"`` — tokenised as is (with the tokenizer's usual special tokens);
* a conversation: ``[{"role": "user", "content": ...}, ...]`` or ``{"messages": [...]}`` — the
  chat template is applied;
* a pair ``(prompt, response)`` or ``{"prompt": ..., "response": ...}`` — rendered as a user turn and
  an assistant turn with the chat template (plain concatenation when the tokenizer has none); the
  prompt may also be a whole conversation (e.g. a system message and the user's turn), which the
  response then completes; the *response span* covers the response's tokens only.

Each item becomes an :class:`Encoded` with its ``input_ids`` and two token spans, ``prompt`` and
``response`` (``[start, end)``); for plain texts and conversations the response span is empty.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io import InputError, read_jsonl

Item = Any


@dataclass(frozen=True)
class Encoded:
    """One tokenised input: ``input_ids`` (list of ints) and spans ``[start, end)`` in token indices."""

    input_ids: list[int]
    prompt_span: tuple[int, int]
    response_span: tuple[int, int]
    truncated: bool = False


def _is_conversation(item: Any) -> bool:
    return isinstance(item, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in item) and bool(item)


def _render(tokenizer, item: Item, index: int) -> tuple[str, tuple[int, int] | None, bool]:
    """Return ``(text, response_char_span or None, text_has_special_tokens)`` for one item."""
    if isinstance(item, str):
        return item, None, False
    if isinstance(item, dict) and "messages" in item:
        item = item["messages"]
    if _is_conversation(item):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"input {index}: a chat conversation needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(item, tokenize=False), None, True
    if isinstance(item, dict) and "prompt" in item and "response" in item:
        prompt, response = item["prompt"], item["response"]
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str) and (isinstance(item[0], str) or _is_conversation(item[0])):
        prompt, response = item
    else:
        raise InputError(
            f"input {index}: expected a text, a chat conversation (list of {{'role','content'}} dicts or "
            f"{{'messages': [...]}}), or a (prompt, response) pair / {{'prompt','response'}} dict; got {type(item).__name__}"
        )
    if _is_conversation(prompt) and isinstance(response, str):
        # A whole conversation as the prompt (e.g. a system message, then the user's turn).
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"input {index}: a conversation prompt needs a tokenizer with a chat template")
        turns = list(prompt)
    elif not isinstance(prompt, str) or not isinstance(response, str):
        raise InputError(f"input {index}: 'prompt' (a string or a conversation) and 'response' (a string) are needed")
    else:
        turns = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        prefix = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)
        start = len(prefix) if full.startswith(prefix) and full[len(prefix):].startswith(response) else full.rfind(response)
        if start < 0:
            raise InputError(f"input {index}: the chat template altered the response text; cannot locate its tokens")
        return full, (start, start + len(response)), True
    separator = "" if prompt.endswith((" ", "\n")) or not prompt else "\n"
    return prompt + separator + response, (len(prompt) + len(separator), len(prompt) + len(separator) + len(response)), False


def encode(
    tokenizer,
    items: Sequence[Item],
    *,
    max_length: int | None = None,
    truncation: str = "left",
) -> list[Encoded]:
    """Tokenise ``items`` (see the module docstring) into :class:`Encoded` objects.

    ``max_length`` defaults to the model's context (``tokenizer.model_max_length`` when sensible).
    Longer inputs are handled by ``truncation``: ``"left"`` keeps the last ``max_length`` tokens
    (the response survives) and warns, ``"right"`` keeps the first ones and warns, ``"error"`` raises.
    """
    if truncation not in ("left", "right", "error"):
        raise InputError(f"truncation must be 'left', 'right' or 'error', got {truncation!r}")
    if len(items) == 0:
        raise InputError("no inputs: pass at least one text, conversation or (prompt, response) pair")
    encoded: list[Encoded] = []
    n_truncated = 0
    for index, item in enumerate(items):
        text, char_span, has_special = _render(tokenizer, item, index)
        if not text:
            raise InputError(f"input {index} is empty")
        batch = tokenizer(text, add_special_tokens=not has_special, return_offsets_mapping=char_span is not None)
        ids = list(batch["input_ids"])
        if char_span is None:
            response = (len(ids), len(ids))
        else:
            offsets = batch["offset_mapping"]
            inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_span[1] and b > char_span[0]]
            if not inside:
                raise InputError(f"input {index}: the response is empty or produced no tokens")
            response = (inside[0], inside[-1] + 1)
        prompt = (0, response[0]) if char_span is not None else (0, len(ids))
        truncated = False
        if max_length is not None and len(ids) > max_length:
            if truncation == "error":
                raise InputError(
                    f"input {index} has {len(ids)} tokens, more than the model's context of {max_length}: "
                    "shorten it, or pass truncation='left' or 'right'"
                )
            cut = len(ids) - max_length if truncation == "left" else 0
            ids = ids[cut:cut + max_length]

            def clip(span: tuple[int, int]) -> tuple[int, int]:
                lo, hi = max(0, span[0] - cut), min(max_length, max(0, span[1] - cut))
                return (lo, max(lo, hi))

            prompt, response = clip(prompt), clip(response)
            truncated = True
            n_truncated += 1
        encoded.append(Encoded(ids, prompt, response, truncated))
    if n_truncated:
        warnings.warn(
            f"{n_truncated} of {len(items)} inputs were longer than the context of {max_length} tokens and were "
            f"truncated on the {truncation} (pass truncation='error' to refuse them)",
            stacklevel=3,
        )
    return encoded


def read_inputs_jsonl(path: str | Path) -> tuple[list[Item], list[dict[str, Any]]]:
    """Read capture inputs from JSONL: each line is a JSON string, or an object with ``text``,
    ``messages``, or ``prompt`` + ``response``; every other field is kept as item metadata.

    Returns ``(items, metadata)``. Errors name ``file:line`` and the field.
    """
    items: list[Item] = []
    metadata: list[dict[str, Any]] = []
    for line_number, obj in read_jsonl(path):
        where = f"{path}:{line_number}"
        if isinstance(obj, str):
            items.append(obj)
            metadata.append({})
            continue
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object or string, got {type(obj).__name__}")
        if "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"]:
                raise InputError(f"{where}: field 'text' must be a non-empty string")
            item: Item = obj["text"]
            rest = {k: v for k, v in obj.items() if k != "text"}
        elif "messages" in obj:
            if not _is_conversation(obj["messages"]):
                raise InputError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
            item = obj["messages"]
            rest = {k: v for k, v in obj.items() if k != "messages"}
        elif "prompt" in obj and "response" in obj:
            for field in ("prompt", "response"):
                if not isinstance(obj[field], str):
                    raise InputError(f"{where}: field {field!r} must be a string")
            item = (obj["prompt"], obj["response"])
            rest = {k: v for k, v in obj.items() if k not in ("prompt", "response")}
        else:
            raise InputError(f"{where}: expected a field 'text', 'messages', or both 'prompt' and 'response'; found {sorted(obj)}")
        items.append(item)
        metadata.append(rest)
    if not items:
        raise InputError(f"{path}: no inputs (the file is empty)")
    return items, metadata


def context_length(model, tokenizer) -> int | None:
    """The model's context window in tokens (config ``max_position_embeddings``/``n_positions``)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and value < 10**7 else None


def chunks(sequence: Sequence[Any], size: int) -> Iterable[tuple[int, Sequence[Any]]]:
    for start in range(0, len(sequence), size):
        yield start, sequence[start:start + size]
