"""The ``repedit`` command line: one module per command group, :func:`main` the entry point."""

from .main import main

__all__ = ["main"]
