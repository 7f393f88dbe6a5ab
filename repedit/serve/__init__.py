"""Serving: an OpenAI-compatible HTTP server with per-user steering and continuous batching.

``repedit serve --model M --store DIR`` from the command line; from Python::

    from repedit.serve import ServerConfig, create_app, BackgroundServer
    app = create_app(model, tokenizer, "edits/", ServerConfig(model_name="smollm2"))
    with BackgroundServer(app) as server:      # uvicorn in a thread, free port on 127.0.0.1
        print(server.url)

Needs the ``serve`` extra (``pip install "repedit[serve]"``: fastapi, uvicorn, openai).
"""

from .app import BackgroundServer, ServerConfig, create_app, read_tokens
from .engine import Done, Engine, EngineClosed, Failed, GenerationRequest, Overloaded, SamplingParams, Tokens
from .protocol import APIError, ChatRequest, Limits, parse_chat_request
from .text import TextAssembler

__all__ = [
    "APIError", "BackgroundServer", "ChatRequest", "Done", "Engine", "EngineClosed", "Failed", "GenerationRequest", "Limits",
    "Overloaded", "SamplingParams", "ServerConfig", "TextAssembler", "Tokens", "create_app", "parse_chat_request", "read_tokens",
]
