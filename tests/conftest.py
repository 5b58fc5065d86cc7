"""Shared fixtures. Each area keeps its fixtures in its own plugin module (tests/fixtures_*.py)."""

from __future__ import annotations

import importlib.util

pytest_plugins = [
    name
    for name in (
        "tests.fixtures_bundles",
        "tests.fixtures_audio",
        "tests.fixtures_broker",
        "tests.fixtures_clap",
    )
    if importlib.util.find_spec(name) is not None
]
