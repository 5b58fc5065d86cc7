"""The real-recording lists in data/ are well-formed, and fetched clips decode to real audio.

The list checks need no network. The decode check runs only where
``scripts/fetch_sounds.py`` has already written the fixture clips (``$EDGE_RETRIEVAL_SOUNDS`` or
``~/.cache/edge-retrieval/sounds``).
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent.parent / "data"
FIXTURE = DATA / "fixture.csv"
CAPTIONS = DATA / "captions.csv"
FIXTURE_COLUMNS = [
    "clip_id",
    "package",
    "path_in_package",
    "category",
    "split",
    "licence",
    "start_s",
    "end_s",
]
CAPTION_COLUMNS = ["path", "caption", "package", "licence"]
# Set aside for other work: no list in data/ may name them.
RESERVED = {
    "0ad-data",
    "tuxpaint-stamps-default",
    "tuxpaint-plugins-default",
    "gcompris-qt-data",
    "widelands-data",
    "minetest-data",
    "lincity-ng-data",
    "wesnoth-1.16-data",
    "sound-icons",
}
MIN_CLIPS_PER_CATEGORY = 6
# The non-reserved Debian packages hold only three real chainsaw recordings (cube2's two, dev;
# simutrans' tree cutting, test): data/README.md.
SMALL_CATEGORIES = {"chainsaw": 3}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _sounds_dir() -> Path:
    env = os.environ.get("EDGE_RETRIEVAL_SOUNDS")
    return Path(env) if env else Path.home() / ".cache" / "edge-retrieval" / "sounds"


def test_fixture_columns_and_values() -> None:
    header, rows = _rows(FIXTURE)
    assert header == FIXTURE_COLUMNS
    ids = Counter(r["clip_id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "clip_id must be unique"
    for r in rows:
        assert r["split"] in {"dev", "test"}, r
        assert r["package"] and r["path_in_package"] and r["licence"], r
        assert not r["path_in_package"].startswith("/") and ".." not in r["path_in_package"], r
        assert r["clip_id"].replace("_", "").isalnum() and r["category"].replace("_", "").isalnum(), r
        start = float(r["start_s"]) if r["start_s"] else 0.0
        if r["end_s"]:
            assert float(r["end_s"]) - start >= 0.5, r


def test_fixture_categories_have_dev_and_test_clips() -> None:
    _, rows = _rows(FIXTURE)
    splits: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        splits[r["category"]][r["split"]] += 1
    targets = [c for c in splits if not c.startswith("distractor_")]
    distractors = [c for c in splits if c.startswith("distractor_")]
    assert len(targets) >= 8, sorted(splits)
    assert len(distractors) >= 2, sorted(splits)
    for category, count in splits.items():
        assert count["dev"] >= 1 and count["test"] >= 1, (category, count)
        assert count.total() >= SMALL_CATEGORIES.get(category, MIN_CLIPS_PER_CATEGORY), (category, count)


def test_fixture_splits_share_no_recording() -> None:
    _, rows = _rows(FIXTURE)
    split_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        split_of[(r["package"], r["path_in_package"])].add(r["split"])
    assert not [k for k, v in split_of.items() if len(v) > 1], "a recording trimmed into both splits"


def test_no_reserved_package_in_any_list() -> None:
    for path in sorted(DATA.glob("*.csv")):
        text = path.read_text(encoding="utf-8")
        named = sorted(p for p in RESERVED if p in text)
        assert not named, f"{path.name} names reserved packages {named}"


def test_captions_are_many_and_spread_over_packages() -> None:
    header, rows = _rows(CAPTIONS)
    assert header == CAPTION_COLUMNS
    assert len(rows) > 1000
    paths = Counter(r["path"] for r in rows)
    assert not [p for p, n in paths.items() if n > 1], "duplicate caption paths"
    per_package = Counter(r["package"] for r in rows)
    assert len(per_package) >= 10
    package, most = per_package.most_common(1)[0]
    assert most <= 0.25 * len(rows), f"{package} has {most} of {len(rows)} rows"
    for r in rows:
        pkg, sep, inner = r["path"].partition(":")
        assert sep and pkg == r["package"] and inner, r
        assert r["caption"].strip() and r["licence"].strip(), r
        assert not any(ch.isdigit() for ch in r["caption"]) or "number" in r["caption"], r


def _fetched_fixture() -> list[tuple[dict[str, str], Path]]:
    _, rows = _rows(FIXTURE)
    root = _sounds_dir()
    return [(r, root / r["category"] / f"{r['clip_id']}.wav") for r in rows]


@pytest.mark.skipif(
    not all(p.exists() for _, p in _fetched_fixture()),
    reason="fixture clips not fetched (run scripts/fetch_sounds.py)",
)
def test_fetched_fixture_clips_decode_to_non_silent_mono() -> None:
    soundfile = pytest.importorskip("soundfile")
    for row, path in _fetched_fixture():
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        assert samples.shape[1] == 1, (path, samples.shape)
        assert rate >= 8000, (path, rate)
        assert samples.shape[0] >= 0.5 * rate, (path, samples.shape[0] / rate)
        rms = float(np.sqrt(np.mean(samples[:, 0] ** 2)))
        assert rms > 1e-3, (row["clip_id"], rms)
