"""Command line: ``repedit <command> ...`` (see ``repedit --help``).

Each command group lives in its own module (``cli/pairs.py``, ``cli/fit.py``, ...) with an ``add_commands`` that
registers its sub-commands; the handlers import their stage lazily so that ``repedit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from ..io import InputError
from . import capture, evaluate, fit, pairs, pipeline, serve, store


def build_parser() -> argparse.ArgumentParser:
    """The ``repedit`` argument parser, command groups in the order of the data flow."""
    parser = argparse.ArgumentParser(prog="repedit", description="Representation editing for per-user LLM personalisation.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (pipeline, pairs, fit, evaluate, capture, store, serve):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an :class:`InputError` becomes one line on stderr and exit status 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as err:
        print(f"repedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
