"""``repedit serve``: the OpenAI-compatible server steering each request with its user's edit."""

from __future__ import annotations

import argparse

from .common import add_model_argument


def _serve(args: argparse.Namespace) -> None:
    from ..io import InputError
    from ..serve.app import run_server
    from ..serve.protocol import Limits

    if args.prefill_chunk < 0 or not 0.0 < args.long_prefill_share <= 1.0:  # before the model loads
        raise InputError(f"--prefill-chunk must be >= 0 (got {args.prefill_chunk}) and --long-prefill-share in (0, 1] (got {args.long_prefill_share})")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                    default_temperature=args.default_temperature)
    run_server(args.model, args.store, host=args.host, port=args.port, tokens=args.tokens, served_name=args.served_name, limits=limits,
               max_batch_size=args.max_batch_size, batch_window=args.batch_window_ms / 1000,
               prefill_chunk=args.prefill_chunk or None, long_prefill_share=args.long_prefill_share, engine=args.engine,
               max_model_len=args.max_model_len, log_level=args.log_level)


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions) steering each request with its user's edit")
    add_model_argument(serve)
    serve.add_argument("--store", default=None, help="vector store directory (repedit fit output); without it every request is unsteered")
    serve.add_argument("--tokens", default=None, help="JSON file {bearer token: [user ids] or \"*\"}; without it no authentication")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    serve.add_argument("--max-batch-size", type=int, default=64, help="most requests decoded together")
    serve.add_argument("--batch-window-ms", type=float, default=5.0, help="how long an idle server waits to batch requests arriving together")
    serve.add_argument("--engine", choices=["repedit", "vllm"], default="repedit",
                       help="repedit: this package's batching engine; vllm: vLLM's engine with repedit's worker extension (pip install the vllm extra)")
    serve.add_argument("--max-model-len", type=int, default=2048, help="--engine vllm: vLLM's context length (prompt + answer tokens)")
    serve.add_argument("--prefill-chunk", type=int, default=128, help="prompts longer than this many tokens are prefilled in chunks between decode steps (0 = never)")
    serve.add_argument("--long-prefill-share", type=float, default=0.25,
                       help="most of the engine's time that chunks of long prompts take while other requests decode, in (0, 1]")
    serve.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    serve.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    serve.add_argument("--default-temperature", type=float, default=0.0, help="temperature when a request gives none (0 = greedy)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=_serve)
