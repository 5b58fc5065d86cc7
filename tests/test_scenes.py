"""Event scoring used by tune_defaults.py and the fixture acceptance test."""

from __future__ import annotations

from edge_retrieval.offline.scenes import match_events, totals

TRUTH = [(10.0, 12.0), (30.0, 32.0), (50.0, 52.0)]


def test_events_around_each_sound_are_true_positives() -> None:
    # window spill of up to one window + tolerance on each side is allowed
    assert match_events([(7.0, 15.0), (29.0, 33.0)], TRUTH) == (2, 0, 2)


def test_an_event_that_stays_on_through_the_noise_finds_nothing() -> None:
    # one event over the whole stream overlaps every sound but is not explained by them
    assert match_events([(0.0, 60.0)], TRUTH) == (0, 1, 0)
    assert match_events([(9.0, 40.0)], TRUTH) == (0, 1, 0)


def test_events_away_from_sounds_are_false_positives() -> None:
    assert match_events([(20.0, 24.0), (40.0, 41.0)], TRUTH) == (0, 2, 0)


def test_totals_sum_over_queries() -> None:
    per_q = {"a": {"tp": 2, "fp": 0, "found": 2, "truth": 3}, "b": {"tp": 1, "fp": 1, "found": 1, "truth": 1}}
    recall, precision = totals(per_q)
    assert (recall, precision) == (3 / 4, 3 / 4)
