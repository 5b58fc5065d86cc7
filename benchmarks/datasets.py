"""Readers for captioned audio sets used by ``edge-retrieval evaluate``: Clotho, AudioCaps, simple CSV.

Each reader gives a :class:`Dataset`: items (one audio file each) and queries (a caption and the
set of items relevant to it). Clotho and AudioCaps: a caption's own clip is its one relevant item
(5 captions per clip in Clotho). Simple CSV (``path, caption[, category]``): with a category, every
clip of that category is relevant to the caption.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

FORMATS = ("clotho", "audiocaps", "csv")


@dataclass(frozen=True)
class Item:
    """One clip: where its audio is, its captions and (simple CSV) its category."""

    path: Path
    captions: tuple[str, ...] = ()
    category: str | None = None
    key: str = ""


@dataclass(frozen=True)
class Query:
    text: str
    relevant: frozenset[int]  # indices into Dataset.items


@dataclass
class Dataset:
    name: str
    items: list[Item]
    queries: list[Query]
    missing: list[str] = field(default_factory=list)  # clips named by the CSV whose audio is not there


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read dataset CSV {str(path)!r}: {exc}") from exc
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]
    return header, rows


def detect_format(header: list[str]) -> str:
    cols = {h.lower() for h in header}
    if "file_name" in cols and "caption_1" in cols:
        return "clotho"
    if {"audiocap_id", "youtube_id", "start_time", "caption"} <= cols:
        return "audiocaps"
    if {"path", "caption"} <= cols:
        return "csv"
    raise ConfigError(
        f"dataset CSV header {header!r} is not one of: Clotho (file_name, caption_1..caption_5), "
        "AudioCaps (audiocap_id, youtube_id, start_time, caption), simple (path, caption[, category])"
    )


def _need(header: list[str], cols: list[str], path: Path, fmt: str) -> None:
    missing = [c for c in cols if c not in header]
    if missing:
        raise ConfigError(f"dataset CSV {str(path)!r} ({fmt}) lacks column(s) {missing}; header is {header}")


def _finish(name: str, items: list[Item], pairs: list[tuple[str, frozenset[int]]], missing: list[str]) -> Dataset:
    """Drop empty captions and exact duplicate (caption, relevant set) pairs, which only repeat a rank."""
    seen: set[tuple[str, frozenset[int]]] = set()
    queries = []
    for text, rel in pairs:
        if text and rel and (text, rel) not in seen:
            seen.add((text, rel))
            queries.append(Query(text, rel))
    if not items:
        raise ConfigError(f"dataset {name!r}: no clip with audio found ({len(missing)} named, none on disk)")
    if not queries:
        raise ConfigError(f"dataset {name!r}: no captions")
    return Dataset(name, items, queries, missing)


def read_clotho(path: str | Path, audio_dir: str | Path | None = None) -> Dataset:
    """Clotho captions CSV: ``file_name, caption_1..caption_5``; audio at ``audio_dir/file_name``."""
    path = Path(path)
    header, rows = _read_rows(path)
    _need(header, ["file_name", "caption_1"], path, "clotho")
    base = Path(audio_dir) if audio_dir else path.parent
    cap_cols = sorted((h for h in header if h.startswith("caption_")), key=lambda h: int(h.split("_")[1] or 0))
    items: list[Item] = []
    pairs: list[tuple[str, frozenset[int]]] = []
    missing: list[str] = []
    for r in rows:
        audio = base / r["file_name"]
        if not audio.is_file():
            missing.append(r["file_name"])
            continue
        caps = tuple(r[c] for c in cap_cols if r.get(c))
        items.append(Item(audio, caps, None, r["file_name"]))
        pairs += [(c, frozenset([len(items) - 1])) for c in caps]
    return _finish(path.stem, items, pairs, missing)


def _audiocaps_audio(base: Path, youtube_id: str, start: str, cap_ids: list[str]) -> Path | None:
    starts = {start}
    try:
        f = float(start)
        starts |= {str(int(f)) if f.is_integer() else str(f), f"{f:.1f}", f"{f:.3f}"}
    except ValueError:
        pass
    names = [f"{youtube_id}_{s}" for s in sorted(starts)] + [f"Y{youtube_id}_{s}" for s in sorted(starts)] + cap_ids
    for n in names:
        for ext in (".wav", ".flac"):
            if (base / f"{n}{ext}").is_file():
                return base / f"{n}{ext}"
    return None


def read_audiocaps(path: str | Path, audio_dir: str | Path | None = None) -> Dataset:
    """AudioCaps CSV: ``audiocap_id, youtube_id, start_time, caption``; one row per caption.

    A clip is (youtube_id, start_time); its audio is ``<youtube_id>_<start_time>.wav`` or
    ``<audiocap_id>.wav`` (of any of its captions) in ``audio_dir``.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    _need(header, ["audiocap_id", "youtube_id", "start_time", "caption"], path, "audiocaps")
    base = Path(audio_dir) if audio_dir else path.parent
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["youtube_id"], r["start_time"]), []).append(r)
    items: list[Item] = []
    pairs: list[tuple[str, frozenset[int]]] = []
    missing: list[str] = []
    for (yid, start), rs in groups.items():
        audio = _audiocaps_audio(base, yid, start, [r["audiocap_id"] for r in rs])
        if audio is None:
            missing.append(f"{yid}_{start}")
            continue
        caps = tuple(r["caption"] for r in rs if r["caption"])
        items.append(Item(audio, caps, None, f"{yid}_{start}"))
        pairs += [(c, frozenset([len(items) - 1])) for c in caps]
    return _finish(path.stem, items, pairs, missing)


def _simple_audio(base: Path, name: str) -> Path:
    """A simple-CSV path on disk; ``package:path_in_package`` (the project's caption list, as
    scripts/fetch_sounds.py writes it) is found at ``base/package/path_in_package`` with a .wav suffix."""
    p = Path(name)
    direct = p if p.is_absolute() else base / p
    if direct.is_file() or ":" not in name or p.is_absolute():
        return direct
    pkg, _, inner = name.partition(":")
    return base / pkg / Path(inner.replace("!", "/")).with_suffix(".wav")


def read_simple(path: str | Path, audio_dir: str | Path | None = None) -> Dataset:
    """Simple CSV: ``path, caption[, category]``; relative paths resolve against ``audio_dir`` (or the CSV's folder).

    A clip may appear on several rows (several captions). With a category, every clip of the
    row's category is relevant to its caption; without, only the row's clip.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    _need(header, ["path", "caption"], path, "csv")
    base = Path(audio_dir) if audio_dir else path.parent
    has_cat = "category" in header
    index: dict[str, int] = {}
    items: list[Item] = []
    missing: list[str] = []
    row_item: list[tuple[int, dict[str, str]]] = []
    for line, r in enumerate(rows, start=2):
        if not r["path"]:
            raise ConfigError(f"dataset CSV {str(path)!r} line {line}: empty path")
        audio = _simple_audio(base, r["path"])
        if not audio.is_file():
            missing.append(r["path"])
            continue
        key = str(audio.resolve())
        cat = (r.get("category") or None) if has_cat else None
        if key not in index:
            index[key] = len(items)
            items.append(Item(audio, (), cat, r["path"]))
        elif cat and items[index[key]].category not in (None, cat):
            raise ConfigError(
                f"dataset CSV {str(path)!r} line {line}: {r['path']!r} is in category {cat!r} and "
                f"{items[index[key]].category!r}; a clip has one category"
            )
        row_item.append((index[key], r))
    by_cat: dict[str, set[int]] = {}
    for i, it in enumerate(items):
        if it.category:
            by_cat.setdefault(it.category, set()).add(i)
    pairs = []
    caps: dict[int, list[str]] = {}
    for i, r in row_item:
        cat = items[i].category
        rel = frozenset(by_cat[cat]) if cat else frozenset([i])
        pairs.append((r["caption"], rel))
        caps.setdefault(i, []).append(r["caption"])
    items = [Item(it.path, tuple(caps.get(i, ())), it.category, it.key) for i, it in enumerate(items)]
    return _finish(path.stem, items, pairs, missing)


def read_dataset(path: str | Path, fmt: str = "auto", audio_dir: str | Path | None = None) -> Dataset:
    """Read a dataset CSV in the given format (``auto`` looks at the header)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset {str(path)!r} is not a file; expected a Clotho, AudioCaps or simple CSV")
    if audio_dir is not None and not Path(audio_dir).is_dir():
        raise ConfigError(f"--audio-dir {str(audio_dir)!r} is not a directory")
    if fmt == "auto":
        fmt = detect_format(_read_rows(path)[0])
    readers = {"clotho": read_clotho, "audiocaps": read_audiocaps, "csv": read_simple}
    if fmt not in readers:
        raise ConfigError(f"dataset format {fmt!r} is not one of {['auto', *FORMATS]}")
    return readers[fmt](path, audio_dir)
