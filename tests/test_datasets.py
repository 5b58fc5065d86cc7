"""Dataset readers (Clotho, AudioCaps, simple CSV) on small generated files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from edge_retrieval.benchmarks.datasets import detect_format, read_dataset

from edge_retrieval.errors import ConfigError


def wav(path: Path, seconds: float = 0.2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(8000 * seconds), np.float32), 8000)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_clotho_gives_five_queries_per_clip(tmp_path: Path) -> None:
    audio = tmp_path / "evaluation"
    names = ["a dog.wav", "rain, heavy.wav", "gone.wav"]
    for n in names[:2]:
        wav(audio / n)
    rows = [[n, *(f"caption {i} of {n}" for i in range(1, 6))] for n in names]
    p = write_csv(tmp_path / "clotho_captions_evaluation.csv", ["file_name", *(f"caption_{i}" for i in range(1, 6))], rows)
    ds = read_dataset(p, audio_dir=audio)
    assert [it.path.name for it in ds.items] == names[:2]
    assert ds.missing == ["gone.wav"]
    assert len(ds.queries) == 10
    for q in ds.queries:
        (i,) = q.relevant
        assert q.text.endswith(ds.items[i].path.name)
    assert ds.items[1].captions[4] == "caption 5 of rain, heavy.wav"


def test_audiocaps_groups_captions_by_clip_and_finds_both_namings(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    wav(audio / "abc123_30.wav")  # <youtube_id>_<start_time>.wav
    wav(audio / "9002.wav")  # <audiocap_id>.wav
    rows = [
        ["9001", "abc123", "30", "a car passes by"],
        ["9004", "abc123", "30", "a vehicle drives past"],
        ["9002", "xyz789", "0", "birds chirp"],
        ["9003", "nothere", "10", "wind blows"],
    ]
    p = write_csv(tmp_path / "test.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    ds = read_dataset(p, audio_dir=audio)
    assert [it.path.name for it in ds.items] == ["abc123_30.wav", "9002.wav"]
    assert ds.missing == ["nothere_10"]
    rel = {q.text: set(q.relevant) for q in ds.queries}
    assert rel == {"a car passes by": {0}, "a vehicle drives past": {0}, "birds chirp": {1}}


def test_simple_csv_category_makes_every_clip_of_it_relevant(tmp_path: Path) -> None:
    for n in ["dog/1.wav", "dog/2.wav", "rain/1.wav", "rain/2.wav", "rain/3.wav"]:
        wav(tmp_path / n)
    rows = [
        ["dog/1.wav", "a dog barks", "dog"],
        ["dog/2.wav", "a dog barks", "dog"],  # same caption, same category: one query
        ["dog/2.wav", "barking", "dog"],
        ["rain/1.wav", "rain falls", "rain"],
        ["rain/2.wav", "", "rain"],
        [str(tmp_path / "rain/3.wav"), "rain on a roof", "rain"],  # absolute path
        ["missing.wav", "x", "rain"],
    ]
    p = write_csv(tmp_path / "set.csv", ["path", "caption", "category"], rows)
    ds = read_dataset(p)
    assert len(ds.items) == 5 and ds.missing == ["missing.wav"]
    cats = [it.category for it in ds.items]
    rel = {q.text: {cats[i] for i in q.relevant} for q in ds.queries}
    assert rel == {"a dog barks": {"dog"}, "barking": {"dog"}, "rain falls": {"rain"}, "rain on a roof": {"rain"}}
    sizes = {q.text: len(q.relevant) for q in ds.queries}
    assert sizes["rain falls"] == 3 and sizes["barking"] == 2
    assert ds.items[1].captions == ("a dog barks", "barking")


def test_simple_csv_without_category_relates_a_caption_to_its_clip(tmp_path: Path) -> None:
    wav(tmp_path / "a.wav")
    wav(tmp_path / "b.wav")
    p = write_csv(tmp_path / "s.csv", ["path", "caption"], [["a.wav", "one"], ["b.wav", "two"]])
    ds = read_dataset(p, fmt="csv")
    assert [(q.text, set(q.relevant)) for q in ds.queries] == [("one", {0}), ("two", {1})]


def test_format_detection_and_clear_errors(tmp_path: Path) -> None:
    assert detect_format(["file_name", "caption_1", "caption_2"]) == "clotho"
    assert detect_format(["audiocap_id", "youtube_id", "start_time", "caption"]) == "audiocaps"
    assert detect_format(["path", "caption", "category"]) == "csv"
    bad = write_csv(tmp_path / "bad.csv", ["file", "text"], [["a.wav", "x"]])
    with pytest.raises(ConfigError, match="header"):
        read_dataset(bad)
    with pytest.raises(ConfigError, match="not a file"):
        read_dataset(tmp_path / "nope.csv")
    none = write_csv(tmp_path / "none.csv", ["path", "caption"], [["x.wav", "y"]])
    with pytest.raises(ConfigError, match="no clip with audio"):
        read_dataset(none)
    wav(tmp_path / "a.wav")
    two = write_csv(tmp_path / "two.csv", ["path", "caption", "category"], [["a.wav", "x", "dog"], ["a.wav", "y", "cat"]])
    with pytest.raises(ConfigError, match="one category"):
        read_dataset(two)
    with pytest.raises(ConfigError, match="lacks column"):
        read_dataset(two, fmt="clotho")


def test_simple_csv_finds_package_paths_where_fetch_sounds_writes_them(tmp_path: Path) -> None:
    wav(tmp_path / "sounds" / "somegame-data" / "usr/share/game/sfx/dog bark.wav")
    wav(tmp_path / "sounds" / "somegame-data" / "usr/share/game/pak0.pk3/siren.wav")
    p = write_csv(tmp_path / "captions.csv", ["path", "caption", "package", "licence"], [
        ["somegame-data:usr/share/game/sfx/dog bark.ogg", "a dog barks", "somegame-data", "GPL"],
        ["somegame-data:usr/share/game/pak0.pk3!siren.flac", "a siren wails", "somegame-data", "GPL"],
    ])
    ds = read_dataset(p, audio_dir=tmp_path / "sounds")
    assert [it.path.name for it in ds.items] == ["dog bark.wav", "siren.wav"] and not ds.missing
