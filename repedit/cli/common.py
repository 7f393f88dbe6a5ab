"""What several command groups share: the ``--model`` argument and the token-position syntax."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, ContextManager

from ..model.loading import DEFAULT_MODEL


def add_model_argument(parser: argparse.ArgumentParser, help_text: str = "model alias, HF id, local folder or .gguf path") -> None:
    """Add ``--model`` defaulting to the embedded default model (the one place its name is written for the CLI)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{help_text} (default: {DEFAULT_MODEL})")


def parse_positions(text: str) -> str | int:
    """``--positions`` value: ``all``, ``prompt``, ``generated`` stay words; a number is a token index."""
    return int(text) if text.lstrip("-").isdigit() else text


def add_ray_arguments(parser: argparse.ArgumentParser, *, unit: str, unit_help: str) -> None:
    """Add the scale-out options: ``--ray [ADDRESS]``, ``--actors``, ``--num-gpus``, ``--ray-cpus`` and the unit of work ``unit``.

    ``--ray`` alone starts a local Ray bound to loopback (stopped at the end: only its own processes);
    ``--ray ADDRESS`` (or ``--ray auto`` with ``RAY_ADDRESS`` set) joins a running cluster.
    """
    group = parser.add_argument_group("scale-out on Ray (pip install 'repedit[ray]')")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="shard users across Ray actors; no value: a local Ray on this machine; ADDRESS or 'auto': a running cluster")
    group.add_argument("--actors", type=int, default=2, help="Ray actors, each holding one copy of the model (default 2)")
    group.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0: CPU; 1: one GPU each)")
    group.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all of this machine's)")
    group.add_argument(unit, type=int, default=8, help=unit_help)


def ray_if_asked(args: argparse.Namespace) -> ContextManager[Any]:
    """A Ray session (:func:`repedit.scale.ray_session`) when the command line has ``--ray``, else nothing."""
    if getattr(args, "ray", None) is None:
        return contextlib.nullcontext()
    from ..scale import ray_session

    return ray_session(args.ray, num_cpus=args.ray_cpus)


def add_input_limits(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-text-chars``, ``--max-history-items`` and ``--max-prompt-chars`` (rules in
    :mod:`repedit.pairs.users`; 0 lifts a limit)."""
    from ..pairs.users import MAX_HISTORY_ITEMS, MAX_PROMPT_CHARS, MAX_TEXT_CHARS

    parser.add_argument("--max-text-chars", type=int, default=MAX_TEXT_CHARS,
                        help=f"history texts/prompts longer than this are truncated, with a warning (default {MAX_TEXT_CHARS}; 0 = no limit)")
    parser.add_argument("--max-history-items", type=int, default=MAX_HISTORY_ITEMS,
                        help=f"users with more history items keep their latest N, with a warning (default {MAX_HISTORY_ITEMS}; 0 = no limit)")
    parser.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS,
                        help=f"a longer prompt in the prompts file is refused (default {MAX_PROMPT_CHARS}; 0 = no limit)")
