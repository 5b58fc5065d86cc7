"""Archive index and search on generated recordings with a tiny in-graph bundle (real onnxruntime, SQLite)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.cli import main as cli
from edge_retrieval.errors import ConfigError, QueryRejected
from edge_retrieval.offline.archive import (
    ArchiveIndex,
    index_folder,
    parse_when,
    recording_meta,
)
from edge_retrieval.offline.archive_v1 import _pack, _unpack
from edge_retrieval.offline.retrieval import TOP_LABELS
from tests.retrieval_bundle import RATE, band_query, make_bundle, tone

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "labels": load_bundle(make_bundle(d / "labels", "labels")),
        "embedding": load_bundle(make_bundle(d / "embedding", "embedding")),
        "other": load_bundle(make_bundle(d / "other", "labels", salt="another model")),
    }


def write(path: Path, x: np.ndarray, rate: int = RATE, comment: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sf.SoundFile(path, "w", rate, 1, "PCM_16") as f:
        if comment:
            f.comment = comment
        f.write(x)
    return path


def make_archive(root: Path) -> dict[str, int]:
    """Recordings with a tone in one band each (the band a query should find), in two site folders."""
    bands = {"north/a.wav": 2, "north/b.wav": 6, "south/c.wav": 10, "south/d.wav": 13}
    for i, (rel, k) in enumerate(bands.items()):
        # 2 s of quiet noise, then 1 s of the tone: the best window starts at 2.0 s
        x = np.concatenate([tone(k, 1.0, amp=0.0, seed=i) + 0.002, tone(k, 1.0, amp=0.0, seed=i), tone(k, 1.0, seed=i)])
        write(root / rel, x)
    return bands


@pytest.mark.parametrize("kind", ["labels", "embedding"])
def test_text_vector_query_finds_the_right_file_and_offset(tmp_path: Path, bundles: dict[str, Bundle], kind: str) -> None:
    root = tmp_path / "archive"
    bands = make_archive(root)
    with ArchiveIndex(tmp_path / "idx", create=True) as index:
        report = index_folder(root, bundles[kind], index)
        assert report.added == 4 and not report.failed and report.windows == 12
        for rel, k in bands.items():
            hits = index.search(band_query(bundles[kind].manifest, k), top=3)
            assert Path(hits[0].path) == (root / rel).resolve()
            assert hits[0].offset_s == pytest.approx(2.0)
            assert hits[0].site == rel.split("/")[0]
            assert hits[0].score > hits[1].score
            assert len(hits) == 3 and hits[0].time is None  # no time in these files


def test_labels_windows_keep_top_64_as_uint16_and_float16() -> None:
    rng = np.random.default_rng(0)
    v = rng.random((5, 300)).astype(np.float32)
    kind, dim, k, data, idx = _pack(v, labels=True)
    assert (kind, dim, k) == ("top", 300, TOP_LABELS)
    assert len(data) == 5 * 64 * 2 and idx is not None and len(idx) == 5 * 64 * 2
    back = _unpack(kind, dim, k, 5, data, idx)
    for i in range(5):
        top = np.argsort(-v[i])[:64]
        assert set(np.flatnonzero(back[i])) == set(top)
        assert np.allclose(back[i, top], v[i, top], atol=1e-3)
    kind, dim, k, data, idx = _pack(v[:, :16], labels=False)
    assert kind == "dense" and idx is None and len(data) == 5 * 16 * 2


def test_reindex_embeds_only_new_or_changed_files_and_forgets_deleted(tmp_path: Path, bundles: dict[str, Bundle]) -> None:
    root = tmp_path / "archive"
    make_archive(root)
    b = bundles["labels"]
    with ArchiveIndex(tmp_path / "idx", create=True) as index:
        assert index_folder(root, b, index).added == 4
        again = index_folder(root, b, index)
        assert (again.added, again.updated, again.unchanged, again.windows) == (0, 0, 4, 0)
        write(root / "north/new.wav", tone(4, 2.0))
        r = index_folder(root, b, index)
        assert (r.added, r.updated, r.unchanged, r.windows) == (1, 0, 4, 2)
        # change a file: it is embedded again, and its windows are replaced (not duplicated)
        write(root / "north/a.wav", tone(12, 1.0))
        os.utime(root / "north/a.wav", ns=(1, 10**18))
        r = index_folder(root, b, index)
        assert (r.added, r.updated, r.unchanged) == (0, 1, 4)
        hits = index.search(band_query(b.manifest, 12), top=1)
        assert Path(hits[0].path).name == "a.wav"
        (root / "south/c.wav").unlink()
        r = index_folder(root, b, index)
        assert r.pruned == 1
        assert index.stats()["files"] == 4
        assert index.stats()["windows"] == 1 + 2 + 3 + 3  # a (1 s), new (2 s), b and d (3 s)
        # shards whose every file was replaced or deleted are gone from disk
        live = {n for (n,) in sqlite3.connect(index.path).execute("SELECT DISTINCT shard FROM files")}
        assert {p.name for p in index.shards_dir.iterdir()} == live


def test_bad_file_is_reported_and_skipped(tmp_path: Path, bundles: dict[str, Bundle], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "archive"
    make_archive(root)
    (root / "north/broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rc = cli(["index", str(root), "--bundle", str(bundles["labels"].root), "--out", str(tmp_path / "idx"), "--quiet"])
    err = capsys.readouterr()
    assert rc == 0
    assert "broken.wav" in err.err and "4 added" in err.out and "1 failed" in err.out
    with ArchiveIndex(tmp_path / "idx") as index:
        assert index.stats()["files"] == 4
        assert [Path(p).name for p, _ in index.failures()] == ["broken.wav"]
    # unchanged bad file is not retried; nothing else to do
    rc = cli(["index", str(root), "--bundle", str(bundles["labels"].root), "--out", str(tmp_path / "idx"), "--quiet"])
    assert rc == 0 and "0 added" in capsys.readouterr().out


def test_guano_timestamp_and_site_are_read(tmp_path: Path) -> None:
    import guano

    p = write(tmp_path / "rec.wav", tone(3, 1.0))
    g = guano.GuanoFile(str(p))
    g["Timestamp"] = dt.datetime(2024, 5, 1, 6, 30, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    g["Site"] = "north-pond"
    g.write(make_backup=False)
    m = recording_meta(p)
    assert m.start == dt.datetime(2024, 5, 1, 4, 30, tzinfo=UTC)
    assert (m.time_source, m.site) == ("guano", "north-pond")
    assert sf.info(str(p)).frames == RATE  # still a readable WAV


def test_audiomoth_comment_and_file_name_times(tmp_path: Path) -> None:
    comment = "Recorded at 06:30:00 01/05/2024 (UTC+1) by AudioMoth 24A04F085FD4A5B7 at medium gain"
    m = recording_meta(write(tmp_path / "any.wav", tone(3, 0.5), comment=comment))
    assert (m.start, m.time_source) == (dt.datetime(2024, 5, 1, 5, 30, tzinfo=UTC), "audiomoth")
    m = recording_meta(write(tmp_path / "site7" / "20230615_041500.WAV", tone(3, 0.5)), root=tmp_path)
    assert (m.start, m.time_source, m.site) == (dt.datetime(2023, 6, 15, 4, 15, tzinfo=UTC), "filename", "site7")
    m = recording_meta(write(tmp_path / "SM4_20230615_041500.wav", tone(3, 0.5)), root=tmp_path, site="given")
    assert m.start == dt.datetime(2023, 6, 15, 4, 15, tzinfo=UTC) and m.site == "given"
    assert recording_meta(write(tmp_path / "plain.wav", tone(3, 0.5))).start is None


def test_bext_origination_time(tmp_path: Path) -> None:
    p = write(tmp_path / "bwf.wav", tone(3, 0.5))
    bext = bytearray(602)
    bext[320:338] = b"2022-11-0314:05:09"
    raw = bytearray(p.read_bytes())
    raw += b"bext" + len(bext).to_bytes(4, "little") + bext
    raw[4:8] = (len(raw) - 8).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    m = recording_meta(p)
    assert (m.start, m.time_source) == (dt.datetime(2022, 11, 3, 14, 5, 9, tzinfo=UTC), "bext")


def test_date_and_site_filters(tmp_path: Path, bundles: dict[str, Bundle]) -> None:
    root = tmp_path / "archive"
    # the same sound (band 5) on three days at two sites: filters decide which one is found
    write(root / "east" / "20240501_000000.WAV", tone(5, 2.0))
    write(root / "west" / "20240502_235959.WAV", tone(5, 2.0))
    write(root / "east" / "20240503_120000.WAV", tone(5, 2.0))
    write(root / "east" / "undated.wav", tone(5, 2.0))
    b = bundles["labels"]
    q = band_query(b.manifest, 5)
    with ArchiveIndex(tmp_path / "idx", create=True) as index:
        index_folder(root, b, index)
        names = lambda hits: sorted({Path(h.path).name for h in hits})  # noqa: E731
        assert len(names(index.search(q, top=20))) == 4
        assert names(index.search(q, top=20, since=parse_when("2024-05-02"))) == ["20240502_235959.WAV", "20240503_120000.WAV"]
        assert names(index.search(q, top=20, until=parse_when("2024-05-02", end_of_day=True))) == [
            "20240501_000000.WAV", "20240502_235959.WAV"]
        # a window-level cut: only the second window (00:00:00.999 on 3 May) of the 2 May file is before 3 May 00:00:01
        hits = index.search(q, top=20, since=parse_when("2024-05-03T00:00:00Z"), until=parse_when("2024-05-03T00:00:01Z"))
        assert [(Path(h.path).name, h.offset_s) for h in hits] == [("20240502_235959.WAV", 1.0)]
        assert hits[0].time == "2024-05-03T00:00:00.000Z"
        assert names(index.search(q, top=20, site="west")) == ["20240502_235959.WAV"]
        assert names(index.search(q, top=20, site="east", since=parse_when("2024-05-03"))) == ["20240503_120000.WAV"]
    with pytest.raises(ConfigError, match="not a date"):
        parse_when("last tuesday")


def test_space_id_mismatch_is_refused(tmp_path: Path, bundles: dict[str, Bundle], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "archive"
    make_archive(root)
    with ArchiveIndex(tmp_path / "idx", create=True) as index:
        index_folder(root, bundles["labels"], index)
        with pytest.raises(QueryRejected, match="space"):
            index.search(band_query(bundles["other"].manifest, 3))
        with pytest.raises(QueryRejected, match="space"):
            index_folder(root, bundles["other"], index)
    rc = cli(["search", "--audio", str(root / "north/a.wav"), "--index", str(tmp_path / "idx"),
              "--bundle", str(bundles["other"].root)])
    err = capsys.readouterr().err
    assert rc == 1 and "space" in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_search_by_example_csv_and_json(tmp_path: Path, bundles: dict[str, Bundle], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "archive"
    make_archive(root)
    idx = tmp_path / "idx"
    assert cli(["index", str(root), "--bundle", str(bundles["embedding"].root), "--out", str(idx), "--quiet"]) == 0
    capsys.readouterr()
    example = write(tmp_path / "example.wav", tone(10, 1.5, seed=9))
    assert cli(["search", "--audio", str(example), "--index", str(idx), "--top", "2", "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "rank,score,file,offset_s,end_s,time,site"
    assert lines[1].split(",")[2].endswith("south/c.wav") and len(lines) == 3
    assert cli(["search", "--audio", str(example), "--index", str(idx), "--json", "--site", "north"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["hits"] and all(h["site"] == "north" for h in obj["hits"])
    assert cli(["search", "--index", str(idx)]) == 1  # neither text nor --audio
    assert "either a query text or --audio" in capsys.readouterr().err
    assert cli(["search", "x", "--index", str(tmp_path / "nothing")]) == 1
    assert "edge-retrieval index" in capsys.readouterr().err


def test_every_second_of_a_file_is_in_a_window(tmp_path: Path, bundles: dict[str, Bundle]) -> None:
    from edge_retrieval.offline.retrieval import FileEmbedder

    emb = FileEmbedder(bundles["labels"])
    for seconds, n in ((0.3, 1), (3.0, 3), (3.4, 4)):
        fv = emb.embed_file(write(tmp_path / f"{seconds}.wav", tone(3, seconds)))
        assert fv.n_windows == n and list(fv.offsets_s) == [float(i) for i in range(n)]
        assert fv.vectors["tiny"].shape == (n, 16)
