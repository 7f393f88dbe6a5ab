"""What several command groups share: the ``--model`` argument and the token-position syntax."""

from __future__ import annotations

import argparse

from ..model.loading import DEFAULT_MODEL


def add_model_argument(parser: argparse.ArgumentParser, help_text: str = "model alias, HF id, local folder or .gguf path") -> None:
    """Add ``--model`` defaulting to the embedded default model (the one place its name is written for the CLI)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{help_text} (default: {DEFAULT_MODEL})")


def parse_positions(text: str) -> str | int:
    """``--positions`` value: ``all``, ``prompt``, ``generated`` stay words; a number is a token index."""
    return int(text) if text.lstrip("-").isdigit() else text


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
