"""The OpenAI chat-completions protocol: request validation and response shapes.

Every problem with a request becomes an :class:`APIError` with an HTTP status and a message naming
the field, returned in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..io import InputError, check_user_id

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNKNOWN_USER = ("error", "unsteered")

# Fields accepted only with their neutral value (the server does not implement them).
_NEUTRAL = {
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (False, None),
    "top_logprobs": (0, None), "logit_bias": (None,), "tools": (None,), "functions": (None,),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"), "n": (1, None),
}
# Informational fields that do not change the answer.
_IGNORED = {"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
_SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
    "stream_options", "stop", "user", "repetition_penalty", "unknown_user", "response_format",
}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An error answered to the client: ``status`` (HTTP), ``message``, OpenAI ``type``/``code``/``param``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on requests.

    ``max_body_bytes``: request body size (413 beyond it); ``max_tokens``: the most tokens one request
    may ask for; ``default_max_tokens``: used when the request gives none; ``max_messages``: messages
    per request; ``max_stop``: stop strings per request; ``default_temperature``: used when the
    request gives none (0 = greedy, repedit's offline default; OpenAI's own default is 1);
    ``max_json_depth``: nesting of arrays/objects in the body (a chat request needs 4);
    ``max_number_chars``: characters of one number literal in the body (a 64-bit seed has 20).
    """

    max_body_bytes: int = 1 << 20
    max_json_depth: int = 32
    max_number_chars: int = 64
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_messages: int = 256
    max_stop: int = 4
    default_temperature: float = 0.0

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_tokens, self.max_messages, self.max_json_depth, self.max_number_chars) < 1:
            raise InputError("server limits must be positive")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise InputError(f"default max_tokens {self.default_max_tokens} must be in [1, {self.max_tokens}]")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise InputError(f"default temperature must be in [0, 2], got {self.default_temperature}")


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request (``messages`` normalised to ``{"role", "content"}`` strings)."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    user: str | None
    unknown_user: str
    repetition_penalty: float


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal (escapes included)
_BRACKETS = bytes.maketrans(b"", b"")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def decode_json_body(raw: bytes, limits: Limits) -> Any:
    """Decode a request body, refusing with a 400 what would otherwise exhaust the decoder: nesting deeper
    than ``limits.max_json_depth`` (Python's decoder recurses, so a 100k-deep array raises RecursionError)
    and number literals longer than ``limits.max_number_chars`` (ints beyond 4300 digits raise ValueError;
    shorter huge ones cost quadratic time to convert). NaN and Infinity, which JSON does not have, are refused too."""
    # Depth is measured on the brackets outside strings, before decoding.
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS):
        depth += 1 if byte in (0x5B, 0x7B) else -1
        if depth > deepest:
            deepest = depth
            if deepest > limits.max_json_depth:
                raise _bad(f"the request body nests arrays/objects deeper than {limits.max_json_depth} levels", None, "invalid_json")

    def number(kind):
        def parse(text: str):
            if len(text) > limits.max_number_chars:
                raise _bad(f"the request body has a number of {len(text)} characters; at most {limits.max_number_chars} are allowed", None, "invalid_json")
            return kind(text)
        return parse

    def constant(name: str):
        raise _bad(f"the request body is not valid JSON: {name} is not a JSON number", None, "invalid_json")

    try:
        return json.loads(raw, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    except RecursionError:  # cannot happen below max_json_depth; kept so that no body can give a 500
        raise _bad("the request body nests too deeply", None, "invalid_json") from None


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    if not (low < value if low_open else low <= value) or value > high:
        raise _bad(f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    return value


def _encodable(text: str, param: str) -> str:
    """``text`` if it is valid Unicode (JSON's ``\\ud800`` escapes can carry lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _bad(f"'{param}' contains a lone surrogate (U+{ord(text[err.start]):04X} at character {err.start}): not valid Unicode text", param) from None
    return text


def _content(message: dict, where: str) -> str:
    return _encodable(_raw_content(message, where), f"{where}.content")


def _raw_content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': '...'}}; images, audio and files are not supported", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}", f"{where}.content", "invalid_type")


def _messages(body: dict, limits: Limits) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {'role', 'content'} objects", "messages", "invalid_type")
    if len(messages) > limits.max_messages:
        raise _bad(f"'messages' has {len(messages)} items; this server accepts at most {limits.max_messages}", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r} (tool messages are not supported)", f"{where}.role")
        if message.get("tool_calls"):
            raise _bad(f"{where}: tool calls are not supported", f"{where}.tool_calls")
        out.append({"role": ROLES[role], "content": _content(message, where)})
    return out


def _stop(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
    if len(items) > limits.max_stop:
        raise _bad(f"'stop' has {len(items)} strings; at most {limits.max_stop} are allowed", "stop")
    return tuple(_encodable(item, "stop") for item in items)


def _user(body: dict, header_user: str | None) -> str | None:
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"'user' must be a string, got {type(user).__name__}", "user", "invalid_type")
    user = user or None
    header_user = header_user or None
    if user and header_user and user != header_user:
        raise _bad(f"the 'user' field ({user!r}) and the X-Repedit-User header ({header_user!r}) disagree", "user")
    user = user or header_user
    if user is not None:
        try:
            check_user_id(user)
        except InputError as err:
            raise _bad(str(err), "user") from None
    return user


def parse_chat_request(body: Any, limits: Limits, header_user: str | None = None) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`APIError` (400) naming the first problem."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    unknown = sorted(set(body) - _SUPPORTED - set(_NEUTRAL) - _IGNORED)
    if unknown:
        raise _bad(f"unsupported field(s): {', '.join(unknown)}", unknown[0], "unsupported_parameter")
    for name, allowed in _NEUTRAL.items():
        value = body.get(name)
        if value not in allowed and not (name in ("logit_bias", "tools", "functions") and value in ({}, [])):
            raise _bad(f"'{name}' = {value!r} is not supported by this server", name, "unsupported_value")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_value")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model", "invalid_type")
    messages = _messages(body, limits)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
        raise _bad("give either 'max_tokens' or 'max_completion_tokens', not two different values", "max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = limits.default_max_tokens if body.get(name) is None else _integer(body[name], name)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise _bad(f"'{name}' must be between 1 and {limits.max_tokens}, got {max_tokens}", name)
    seed = body.get("seed")
    if seed is not None and not SEED_RANGE[0] <= _integer(seed, "seed") <= SEED_RANGE[1]:
        raise _bad(f"'seed' must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}):
        raise _bad("'stream_options' must be an object with 'include_usage'", "stream_options", "invalid_type")
    if options is not None and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    unknown_user = body.get("unknown_user") or "error"
    if unknown_user not in UNKNOWN_USER:
        raise _bad(f"'unknown_user' must be 'error' (404 for a user without an edit) or 'unsteered', got {unknown_user!r}", "unknown_user")
    return ChatRequest(
        model=model, messages=messages, max_tokens=max_tokens,
        temperature=_number(body, "temperature", limits.default_temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), seed=seed, stream=bool(stream),
        include_usage=bool((options or {}).get("include_usage")), stop=_stop(body, limits),
        user=_user(body, header_user), unknown_user=unknown_user,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, fingerprint: str, text: str, finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` object."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": counts,
    }


def chunk(cid: str, created: int, model: str, fingerprint: str, delta: dict[str, str] | None, finish_reason: str | None = None,
          counts: dict[str, int] | None = None, include_usage: bool = False) -> dict[str, Any]:
    """A streaming ``chat.completion.chunk``; ``delta=None`` makes the final usage-only chunk (no choices)."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": fingerprint}
    out["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    if include_usage:
        out["usage"] = counts
    return out
