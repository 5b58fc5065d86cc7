"""The tuned defaults file: a broken file is an error naming it, never a silent empty table."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_retrieval.defaults import read_tuned, tuned_table
from edge_retrieval.errors import ConfigError


def test_the_shipped_table_reads() -> None:
    table = tuned_table()
    assert table and all(len(k) == 64 for k in table)  # keyed by space id


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"spaces": [1]}', '{"spaces": {"abc": 3}}'])
def test_a_corrupt_file_is_an_error_naming_it(tmp_path: Path, text: str) -> None:
    bad = tmp_path / "default_policy.json"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="default_policy.json"):
        read_tuned(bad)


def test_a_missing_file_warns(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_retrieval.defaults"):
        assert read_tuned(tmp_path / "default_policy.json") == {}
    assert "default_policy.json is missing" in caplog.text
