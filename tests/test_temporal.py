"""Temporal queries ("A followed by B within 30 s"): grammar, message, combiner, CLI, real recordings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_retrieval.bundle import Bundle
from edge_retrieval.cli import main
from edge_retrieval.errors import QueryRejected
from edge_retrieval.pipeline import Pipeline
from edge_retrieval.protocol import (
    QueryMessage,
    parse_event,
    parse_query_message,
    sign_message,
    verify_signature,
)
from edge_retrieval.text import QueryBuilder
from edge_retrieval.text.temporal import DEFAULT_WITHIN_S, parse_temporal
from tests.fixtures_audio import noise, tone, write_scene

# --------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(("text", "first", "second", "relation", "within"), [
    ("gunshot followed by car engine", "gunshot", "car engine", "sequence", 60.0),
    ("Gunshot, followed by  car engine within 30 s", "Gunshot", "car engine", "sequence", 30.0),
    ("gunshot then car engine within 2 minutes", "gunshot", "car engine", "sequence", 120.0),
    ("gunshot and then a car engine within 45sec", "gunshot", "a car engine", "sequence", 45.0),
    ("car engine after gunshot within 1.5 min", "gunshot", "car engine", "sequence", 90.0),
    ("gunshot before car engine", "gunshot", "car engine", "sequence", 60.0),
    ("a man talking while a frog croaks", "a man talking", "a frog croaks", "overlap", 0.0),
    ("chainsaw with birds within 5 seconds.", "chainsaw", "birds", "overlap", 5.0),
])
def test_grammar_reads_each_form(text: str, first: str, second: str, relation: str, within: float) -> None:
    tq = parse_temporal(text)
    assert tq is not None
    assert (tq.first, tq.second, tq.relation, tq.within_s) == (first, second, relation, within)


def test_defaults_are_documented_per_relation() -> None:
    assert DEFAULT_WITHIN_S == {"sequence": 60.0, "overlap": 0.0}
    assert parse_temporal("chainsaw sound") is None
    assert parse_temporal("thenardite dust withering") is None  # relation words only as whole words


@pytest.mark.parametrize(("text", "needle"), [
    ("gunshot followed car engine", "could not read 'followed'"),
    ("gunshot followed by", "has no second part"),
    ("then car engine", "has no first part"),
    ("gunshot then engine within 3 parsecs", "unknown unit 'parsecs'"),
    ("gunshot then engine within -5 s", "is negative"),
    ("gunshot then engine within 30", "has no unit"),
    ("gunshot then engine within soon", "could not read 'within soon'"),
    ("gunshot within 30 s", "needs a relation"),
    ("gunshot then engine while rain", "more than one relation"),
    ("gunshot then engine within 2 hours", "unknown unit 'hours'"),
    ("gunshot then engine within 90 min", "over the limit"),
])
def test_grammar_errors_are_one_line_naming_the_problem(text: str, needle: str) -> None:
    with pytest.raises(QueryRejected) as exc:
        parse_temporal(text)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and repr(" ".join(text.split())) in msg


# --------------------------------------------------------------------------- message


def test_one_signed_message_carries_the_whole_query(tiny_bundle: Bundle) -> None:
    qb = QueryBuilder(tiny_bundle)
    msg, res = qb.build("beep followed by whistle within 20 s", "poach", 0.5, part_thresholds=[0.4, 0.6], temporal=True)
    assert msg.temporal is not None and msg.vectors == [] and msg.threshold is None
    assert [p.text for p in msg.temporal.parts] == ["beep", "whistle"]
    assert [p.threshold for p in msg.temporal.parts] == [0.4, 0.6]
    assert (msg.temporal.relation, msg.temporal.within_s) == ("sequence", 20.0)
    assert len(res) == 2 * len(qb.sides)
    key = Ed25519PrivateKey.generate()
    wire = parse_query_message(sign_message(msg, key).to_json())
    verify_signature(wire, key.public_key())
    tampered = wire.model_copy(update={"temporal": wire.temporal.model_copy(update={"within_s": 3600.0})})
    with pytest.raises(QueryRejected, match="bad signature"):
        verify_signature(tampered, key.public_key())


def test_plain_messages_sign_the_same_bytes_as_before(tiny_bundle: Bundle) -> None:
    msg, _ = QueryBuilder(tiny_bundle).build("beep", "b", 0.5)
    assert msg.temporal is None and b"temporal" not in msg.signing_bytes()


def test_a_message_is_either_plain_or_temporal(tiny_bundle: Bundle) -> None:
    msg, _ = QueryBuilder(tiny_bundle).build("beep then whistle", "t", 0.5, temporal=True)
    plain, _ = QueryBuilder(tiny_bundle).build("beep", "b", 0.5)
    both = json.loads(msg.to_json())
    both["vectors"] = json.loads(plain.to_json())["vectors"]
    with pytest.raises(QueryRejected, match="temporal"):
        parse_query_message(json.dumps(both))
    no_thr = json.loads(msg.to_json())
    del no_thr["temporal"]["parts"][1]["threshold"]
    with pytest.raises(QueryRejected, match="temporal.parts.1.threshold"):
        parse_query_message(json.dumps(no_thr))


# --------------------------------------------------------------------------- pipeline and CLI (tones)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """beep (1 kHz) at 6-9 s, whistle (3 kHz) at 14-16 s."""
    return write_scene(
        tmp_path_factory.mktemp("temporal") / "scene.wav",
        [("noise", 6), ("1000", 3), ("noise", 5), ("3000", 2), ("noise", 4)],
        32000,
    )


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_fires_a_sequence_once_in_order_and_within_the_limit(capsys, tiny_bundle, scene) -> None:
    queries = [
        "beep followed by whistle within 10 s",  # gap 5 s: fires
        "whistle followed by beep within 10 s",  # wrong order
        "beep then whistle within 2 s",  # gap over the limit
        "beep while whistle",  # no overlap
    ]
    argv = ["run", "--bundle", str(tiny_bundle.root), "--source", str(scene), "--threshold", "0.5", "--json",
            "--cooldown", "0"]
    for q in queries:
        argv += ["--query", q]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    events = [parse_event(line) for line in out.splitlines()]
    assert {e.query for e in events} == {queries[0]}
    assert [e.final for e in events] == [True]  # fired once (a file source prints final updates only)
    final = events[-1]
    assert final.relation == "sequence" and final.within_s == 10.0
    assert [(p.text, p.start_s, p.end_s) for p in final.parts] == [("beep", 6.0, 9.0), ("whistle", 14.0, 16.0)]
    assert (final.start_s, final.end_s) == (6.0, 16.0)
    assert "#" not in out  # hidden part ids never leave the pipeline


def test_run_table_names_the_parts(capsys, tiny_bundle, scene) -> None:
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
                           "--threshold", "0.5", "--query", "whistle after beep")
    assert rc == 0, err
    assert "part: beep" in out and "part: whistle" in out


def test_overlap_fires_only_on_mixed_sounds(tiny_bundle, tmp_path) -> None:
    rate = 32000
    both = noise(3, rate, seed=9) + tone(1000.0, 3, rate) + tone(3000.0, 3, rate)
    x = np.concatenate([noise(6, rate, seed=1), both, noise(4, rate, seed=2)]).astype(np.float32)
    qb = QueryBuilder(tiny_bundle)
    msg, _ = qb.build("beep while whistle", "mix", 0.5, temporal=True)
    pipe = Pipeline(tiny_bundle, [msg], sample_rate=rate)
    finals = [t.event for t in pipe.feed(x) + pipe.close() if t.final]
    assert [e.query_id for e in finals] == ["mix"]
    assert [p.query for p in finals[0].parts] in (["beep", "whistle"], ["whistle", "beep"])


def test_updates_and_deletions_reach_the_parts(tiny_bundle) -> None:
    qb = QueryBuilder(tiny_bundle)
    pipe = Pipeline(tiny_bundle)
    v1, _ = qb.build("beep then whistle", "t", 0.5, version=1, temporal=True)
    v2, _ = qb.build("whistle then beep", "t", 0.5, version=2, temporal=True)
    assert pipe.add_query(v1) and sorted(pipe.matcher.snapshot.ids) == ["t#1", "t#2"]
    assert pipe.add_query(v2) and not pipe.add_query(v1)  # an older version is ignored
    assert [q.text for q in pipe.matcher.snapshot.queries] == ["whistle", "beep"]
    plain, _ = qb.build("beep", "t", 0.5, version=3)  # the id becomes a plain query
    assert pipe.add_query(plain) and pipe.matcher.snapshot.ids == ["t"] and not pipe.temporal
    v4, _ = qb.build("beep then whistle", "t", 0.5, version=4, temporal=True)
    assert pipe.add_query(v4) and sorted(pipe.matcher.snapshot.ids) == ["t#1", "t#2"]
    tomb = QueryMessage.model_validate({"schema": 1, "query_id": "t", "version": 5, "deleted": True})
    assert pipe.add_query(tomb) and pipe.matcher.snapshot.ids == [] and not pipe.temporal
    assert not pipe.add_query(v4)  # a replayed older message stays deleted


@pytest.mark.parametrize(("query", "needle"), [
    ("beep followed by", "has no second part"),
    ("beep then whistle within 3 fortnights", "unknown unit 'fortnights'"),
    ("beep then whistle within -1 min", "is negative"),
])
def test_bad_temporal_queries_are_one_line(capsys, tiny_bundle, scene, query: str, needle: str) -> None:
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene), "--query", query)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and out == "" and len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_explain_shows_parts_labels_and_relation(capsys, tiny_bundle) -> None:
    rc, out, _ = run_cli(capsys, "explain", "whistle after beep within 30 s", "--bundle", str(tiny_bundle.root), "--json")
    assert rc == 0
    got = json.loads(out)
    assert got["relation"] == {"kind": "sequence", "word": "after", "within_s": 30.0}
    assert [p["text"] for p in got["parts"]] == ["beep", "whistle"]
    assert all(p["experts"] and p["experts"][0]["top"] for p in got["parts"])


# --------------------------------------------------------------------------- real recordings (BirdNET)

# dev-half clips on which the part queries fire at any offset (checked with Pipeline on the dev half)
GUNSHOT, ENGINE = "gunshot_warzone2100_mgbar1", "engine_searchandrescue_helicopter_engine_outside3"
SEQUENCE = "gunshot followed by car engine within 30 s"


@pytest.fixture(scope="module")
def real(birdnet_bundle):  # noqa: ANN201
    from edge_retrieval.defaults import default_policy, default_threshold
    from edge_retrieval.offline.scenes import read_fixture

    clips = {c.clip_id: c for c in read_fixture(Path(__file__).parents[1] / "data" / "fixture.csv")}
    if GUNSHOT not in clips or ENGINE not in clips:
        pytest.skip("fixture recordings are not fetched (scripts/fetch_sounds.py)")
    qb = QueryBuilder(birdnet_bundle)

    def build(text: str) -> QueryMessage:
        tq = parse_temporal(text)
        assert tq is not None
        thr = [default_threshold(birdnet_bundle, t) for t in tq.parts]
        return qb.build(text, "alert", 0.0, part_thresholds=thr, temporal=True)[0]

    def fire(msg: QueryMessage, x: np.ndarray, rate: int) -> list:  # noqa: ANN202
        pipe = Pipeline(birdnet_bundle, [msg], default_policy(birdnet_bundle), sample_rate=rate)
        return [t.event for t in pipe.feed(x) + pipe.close() if t.final]

    return clips, build, fire


@pytest.mark.slow
@pytest.mark.parametrize(("order", "gap_s", "fires"), [
    ((GUNSHOT, ENGINE), 10.0, True),
    ((ENGINE, GUNSHOT), 10.0, False),
    ((GUNSHOT,), 10.0, False),
    ((GUNSHOT, ENGINE), 45.0, False),
])
def test_gunshot_followed_by_engine_on_real_recordings(real, order, gap_s: float, fires: bool) -> None:
    from edge_retrieval.offline.scenes import build_stream

    clips, build, fire = real
    rate = 48000
    x, segs = build_stream([clips[c] for c in order], rate, gap_s=gap_s, lead_s=6.0)
    events = fire(build(SEQUENCE), x, rate)
    assert len(events) == (1 if fires else 0), [(e.start_s, e.end_s) for e in events]
    if fires:
        (ev,) = events
        g, e = segs
        assert [p.query for p in ev.parts] == ["gunshot", "car engine"]
        assert ev.parts[0].start_s < g.end_s and ev.parts[0].end_s > g.start_s  # the gunshot's time
        assert ev.parts[1].start_s < e.end_s and ev.parts[1].end_s > e.start_s  # the engine's time


@pytest.mark.slow
def test_while_fires_only_on_overlap_of_real_recordings(real) -> None:
    from edge_retrieval.offline.scenes import build_stream, load_clip

    clips, build, fire = real
    rate = 48000
    msg = build("gunshot while car engine")
    apart, _ = build_stream([clips[GUNSHOT], clips[ENGINE]], rate, gap_s=10.0, lead_s=6.0)
    assert fire(msg, apart, rate) == []
    mixed, segs = build_stream([clips[ENGINE]], rate, gap_s=6.0, lead_s=6.0)
    shot = load_clip(clips[GUNSHOT].path, rate)
    at = int((segs[0].start_s + 1.0) * rate)
    mixed[at : at + shot.size] += shot
    (ev,) = fire(msg, mixed, rate)
    assert ev.relation == "overlap" and {p.query for p in ev.parts} == {"gunshot", "car engine"}


def test_archive_search_ranks_the_span_where_the_pattern_occurs(capsys, tiny_bundle, tmp_path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    write_scene(root / "in_order.wav", [("noise", 4), ("1000", 3), ("noise", 5), ("3000", 3), ("noise", 3)], 32000)
    write_scene(root / "reversed.wav", [("noise", 4), ("3000", 3), ("noise", 5), ("1000", 3), ("noise", 3)], 32000)
    write_scene(root / "beep_only.wav", [("noise", 4), ("1000", 3), ("noise", 11)], 32000)
    assert main(["index", str(root), "--bundle", str(tiny_bundle.root), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["search", "beep followed by whistle within 20 s", "--index", str(tmp_path / "idx"), "--json", "--top", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    hits = json.loads(out)["hits"]
    assert Path(hits[0]["file"]).name == "in_order.wav"
    assert [p["text"] for p in hits[0]["parts"]] == ["beep", "whistle"]
    beep, whistle = (p["offset_s"] for p in hits[0]["parts"])
    assert 2.0 <= beep <= 7.0 and 10.0 <= whistle <= 15.0  # the windows of each sound
    assert all(h["score"] < hits[0]["score"] / 2 for h in hits[1:])  # neither order nor half the pattern scores alike
    rc = main(["search", "beep followed by", "--index", str(tmp_path / "idx")])
    _, err = capsys.readouterr()
    assert rc != 0 and "has no second part" in err and len(err.strip().splitlines()) == 1


def test_plain_builds_keep_relation_words_as_words(tiny_bundle) -> None:
    msg, _ = QueryBuilder(tiny_bundle).build("a beep while a whistle plays", "w", 0.5)  # retrieval, evaluation
    assert msg.temporal is None and msg.vectors


def test_evaluate_reads_sequence_captions(capsys, tiny_bundle, tmp_path) -> None:
    for name, order in (("in_order", ("1000", "3000")), ("reversed", ("3000", "1000"))):
        write_scene(tmp_path / f"{name}.wav", [("noise", 4), (order[0], 3), ("noise", 5), (order[1], 3), ("noise", 3)], 32000)
    csv_path = tmp_path / "seq.csv"
    csv_path.write_text("path,caption\nin_order.wav,beep followed by whistle\nreversed.wav,whistle followed by beep\n")
    argv = ["evaluate", "--bundle", str(tiny_bundle.root), "--dataset", str(csv_path), "--json", "--quiet"]
    assert main([*argv, "--temporal"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["R@1"] == 1.0 and "2 temporal caption(s)" in err
    assert main(argv) == 0  # read as plain captions, both clips hold both sounds: order is not seen
    assert json.loads(capsys.readouterr()[0])["R@1"] < 1.0


def test_a_signed_temporal_message_runs_on_the_device(tmp_path, tiny_bundle, scene) -> None:
    from edge_retrieval.device.daemon import Daemon
    from edge_retrieval.device.query_store import QueryStore
    from edge_retrieval.device.sinks import ListSink
    from edge_retrieval.device.sources import FileSource
    from edge_retrieval.protocol import group_query_topic

    key = Ed25519PrivateKey.generate()
    daemon = Daemon(tiny_bundle, FileSource(scene, realtime=False), device_id="dev-1")
    sink = ListSink()
    daemon.add_sink(sink)
    reports: list = []
    qs = QueryStore(tmp_path / "q.sqlite", daemon, device="dev-1", public_key=key.public_key(), report=reports.append)
    msg, _ = QueryBuilder(tiny_bundle).build("whistle after beep within 10 s", "poach-1", 0.5, temporal=True)
    topic = group_query_topic("site-a", "poach-1")
    msg = msg.model_copy(update={"topic": topic})  # a signed query names its topic (issue 12)
    assert qs.handle(topic, sign_message(msg, key).to_json()) == "applied", reports
    daemon.run()
    (ev,) = sink.finals()
    assert parse_event(ev.to_json()) == ev  # the wire form carries the parts
    assert (ev.query_id, ev.relation, [p.text for p in ev.parts]) == ("poach-1", "sequence", ["beep", "whistle"])
    tomb = QueryMessage.model_validate({"schema": 1, "query_id": "poach-1", "version": 2, "deleted": True, "topic": topic})
    assert qs.handle(topic, sign_message(tomb, key).to_json()) == "removed"
    assert len(daemon.matcher) == 0


def test_alerts_add_publishes_one_signed_temporal_message(capsys, tmp_path, tiny_bundle, broker) -> None:
    from edge_retrieval.cli.commands.keys import generate
    from edge_retrieval.server import ServerStore

    priv, pub = generate(tmp_path / "keys")
    base = ["--group", "site-a", "--bundle", str(tiny_bundle.root), "--broker", broker.url, "--db",
            str(tmp_path / "s.db"), "--key", str(priv)]
    rc = main(["alerts", "add", "beep followed by", *base])
    err = capsys.readouterr().err
    assert rc != 0 and "has no second part" in err and len(err.strip().splitlines()) == 1
    rc = main(["alerts", "add", "whistle after beep within 40 s", "--threshold", "0.5", "--id", "poach", *base, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    store = ServerStore(tmp_path / "s.db")
    held = store.alert("poach")
    store.close()
    assert held is not None
    msg = parse_query_message(held["message"])
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    verify_signature(msg, load_pem_public_key(pub.read_bytes()))
    assert msg.temporal is not None and (msg.temporal.relation, msg.temporal.within_s) == ("sequence", 40.0)
    assert [p.text for p in msg.temporal.parts] == ["beep", "whistle"] and held["threshold"] == 0.5
