"""Shared fixtures. Each area keeps its fixtures in its own plugin module (tests/fixtures_*.py)."""

from __future__ import annotations

import importlib.util
import os
import tempfile

# onnxruntime's optimised-model cache (edge_retrieval.pipeline.expert): keep the suite's models out of the
# user's ~/.cache; subprocesses inherit it. A caller's own setting wins.
os.environ.setdefault("EDGE_RETRIEVAL_ORT_CACHE", tempfile.mkdtemp(prefix="er-ort-cache-"))

pytest_plugins = [
    name
    for name in (
        "tests.fixtures_bundles",
        "tests.fixtures_audio",
        "tests.fixtures_broker",
        "tests.fixtures_clap",
        "tests.fixtures_postgres",
    )
    if importlib.util.find_spec(name) is not None
]
