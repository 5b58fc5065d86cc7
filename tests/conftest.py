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


# A native crash kills pytest before it can report, and a Python fatal error's message goes to the
# stderr pytest captures. With EDGE_RETRIEVAL_TEST_TRAIL set (scripts/test.sh sets it), each test's
# id is written to that file as it starts, so test.sh can name the test that was running; the
# stacks of a crash by signal come from pytest's own faulthandler plugin, on the real stderr.
_TRAIL = os.environ.get("EDGE_RETRIEVAL_TEST_TRAIL")


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    if _TRAIL:
        with open(_TRAIL, "w") as f:  # only the latest test matters
            f.write(nodeid)
