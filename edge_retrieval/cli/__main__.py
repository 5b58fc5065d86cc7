"""``python -m edge_retrieval.cli``: the same entry point as the ``edge-retrieval`` script."""

from __future__ import annotations

from .main import main

raise SystemExit(main())
