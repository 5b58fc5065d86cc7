"""Every benchmark module imports: a moved module must not leave a benchmark behind (yamnet_check
still imported ``edge_retrieval.expert`` after the restructure, and nothing ran it)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_module_imports(name: str) -> None:
    mod = importlib.import_module(f"edge_retrieval.benchmarks.{name}")
    assert mod.__name__.endswith(name)
