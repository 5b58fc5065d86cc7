"""Policy precedence: query > device config > built-in (docs/architecture.md)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edge_retrieval.policy import BUILTIN, DetectionPolicy, PolicyOverlay, resolve


def test_precedence_query_over_config_over_builtin() -> None:
    query = PolicyOverlay(min_hits=3, of_windows=4)
    config = PolicyOverlay(min_hits=1, of_windows=2, cooldown_s=9.0, adapt=False)
    p = resolve(query, config)
    assert (p.min_hits, p.of_windows) == (3, 4)  # query wins
    assert p.cooldown_s == 9.0 and p.adapt is False  # config fills what the query left unset
    assert p.hysteresis == BUILTIN.hysteresis  # built-in fills the rest


def test_none_layers_are_skipped_and_dicts_accepted() -> None:
    assert resolve(None, None) == BUILTIN
    assert resolve({"cooldown_s": 1.5}, None).cooldown_s == 1.5


def test_invalid_combinations_are_rejected() -> None:
    with pytest.raises(ValidationError):
        PolicyOverlay(min_hits=5, of_windows=2)
    with pytest.raises(ValidationError):
        PolicyOverlay(adapt_quantile=1.5)
    with pytest.raises(ValidationError):
        PolicyOverlay(unknown_key=1)  # type: ignore[call-arg]
    # a merge that produces an impossible policy fails loudly, not silently
    with pytest.raises(ValidationError):
        resolve(PolicyOverlay(min_hits=4), PolicyOverlay(of_windows=2))
    assert isinstance(BUILTIN, DetectionPolicy)
