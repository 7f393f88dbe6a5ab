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
