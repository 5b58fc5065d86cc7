"""Shared fixtures. Each area keeps its fixtures in its own plugin module (tests/fixtures_*.py)."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

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


# A native crash (a C library's abort or segfault) kills pytest before it can report. With
# EDGE_RETRIEVAL_TEST_TRAIL set (scripts/test.sh sets it), each test's id is written to that file as
# it starts, and faulthandler writes every thread's Python stack there: scripts/test.sh prints both
# when pytest dies by a signal.
_TRAIL = os.environ.get("EDGE_RETRIEVAL_TEST_TRAIL")
_trail_file = None


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler plugin, which would take it back
def pytest_configure(config) -> None:  # noqa: ANN001
    global _trail_file
    if _TRAIL:
        import faulthandler

        _trail_file = open(_TRAIL, "a", buffering=1)  # noqa: SIM115  # held for the whole session
        faulthandler.enable(file=_trail_file, all_threads=True)


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    if _trail_file is not None:
        _trail_file.write(f"running {nodeid}\n")
