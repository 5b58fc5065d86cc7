"""The ``edge-retrieval`` command line: the dispatcher (``main``) and one module per command."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
