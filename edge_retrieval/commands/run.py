"""``edge-retrieval run``: listen to a source and raise an event when a window matches a text query.

Local mode: ``--query`` texts (and a queries file, and ``--query-audio`` examples) become query
vectors through the bundle's text side; events go to stdout as a table or JSON lines. With
``--config`` the device config is the base and CLI flags override it; when the config names an
MQTT broker, the device agent receives queries and delivers events instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..bundle import Bundle, load_bundle
from ..clips import ClipWriter
from ..daemon import Daemon, source_from_config
from ..defaults import default_policy, default_threshold, merge_overlays
from ..errors import ConfigError, QueryRejected, SourceError
from ..policy import PolicyOverlay
from ..protocol import QueryMessage
from ..sinks import JsonLinesSink, Sink, TableSink
from ..sources import FileSource, Source, open_source

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, help="model bundle directory (default: the config's model.bundle)")
    p.add_argument("--config", type=Path, help="device config TOML (CLI flags override it)")
    p.add_argument("--source", help="'mic', an audio file (WAV/FLAC/OGG), or '-' for raw PCM on stdin")
    p.add_argument("--realtime", action="store_true", default=None, help="replay a file at real speed")
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="text query (repeatable)")
    p.add_argument(
        "--threshold", action="append", type=float, default=[], metavar="X",
        help="threshold per --query, in order (one value applies to all)",
    )
    p.add_argument("--queries-file", type=Path, help="TOML ([[queries]] text/threshold/id/policy) or JSON lines")
    p.add_argument("--query-audio", action="append", default=[], type=Path, metavar="FILE",
                   help="use a recording's own vector as a query (repeatable)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout, one object per event")
    p.add_argument("--json-updates", action="store_true", help="JSON lines for onsets too (same event_id)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--providers", help="comma-separated onnxruntime providers (e.g. CUDAExecutionProvider)")
    p.add_argument("--overlap", type=float, help="window overlap, fraction of the hop in [0, 0.95]")
    p.add_argument("--gate-dbfs", help="energy gate in dBFS (e.g. -70), or 'off'")
    p.add_argument("--device-id", help="device id carried in events")
    p.add_argument("--mic-device", help="PortAudio input device name or index (mic source)")
    p.add_argument("--stdin-rate", type=int, help="sample rate of raw PCM on stdin (default 48000)")
    p.add_argument("--stdin-format", choices=["s16le", "f32le"], help="raw PCM format on stdin")
    p.add_argument("--max-batch", type=int, help="most windows per encoder call when behind")
    p.add_argument("--clips-dir", type=Path, help="write FLAC clips of detections here")
    p.add_argument("--scores", action="store_true",
                   help="print every window's score per query on stderr (to see how far below its threshold a sound stayed)")
    g = p.add_argument_group("detection policy (overrides the config's defaults)")
    g.add_argument("--min-hits", type=int, help="N: hits needed among --of-windows windows")
    g.add_argument("--of-windows", type=int, help="M: window span for N of M")
    g.add_argument("--hysteresis", type=float, help="stay on until score < threshold - hysteresis")
    g.add_argument("--cooldown", type=float, help="seconds of quiet after an event")
    g.add_argument("--no-adapt", action="store_true", help="no background adaptation")


# --------------------------------------------------------------------------- queries


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip().lower()).strip("-._")[:56] or "q"
    qid, n = base, 2
    while qid in taken:
        qid, n = f"{base}-{n}", n + 1
    taken.add(qid)
    return qid


def read_queries_file(path: Path) -> list[dict[str, Any]]:
    """TOML with ``[[queries]]`` tables, or JSON lines of objects: text, threshold?, id?, policy?."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"queries file {str(path)!r}: {exc.strerror or exc}") from exc
    items: list[Any]
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            items = tomllib.loads(raw).get("queries", [])
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"queries file {str(path)!r}: not valid TOML ({exc})") from exc
    else:
        items = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"queries file {str(path)!r} line {n}: not a JSON object ({exc.msg})") from exc
    out = []
    for n, it in enumerate(items, 1):
        if not isinstance(it, dict) or not isinstance(it.get("text"), str):
            raise ConfigError(f"queries file {str(path)!r} entry {n}: expected an object with a 'text' string")
        unknown = set(it) - {"text", "threshold", "id", "policy"}
        if unknown:
            raise ConfigError(f"queries file {str(path)!r} entry {n}: unknown key(s) {sorted(unknown)}")
        out.append(it)
    if not out:
        raise ConfigError(f"queries file {str(path)!r} holds no queries")
    return out


def local_queries(
    bundle: Bundle,
    specs: list[dict[str, Any]],
    config_threshold: float | None,
    warn: Any = None,
) -> list[QueryMessage]:
    """Text specs -> query messages through the bundle's text side; prints resolution warnings."""
    from ..text import QueryBuilder, query_warnings

    qb = QueryBuilder(bundle)
    taken: set[str] = {s["id"] for s in specs if s.get("id")}
    msgs = []
    for s in specs:
        text = s["text"]
        if not text.strip():
            raise QueryRejected("query text is empty (expected a few words, e.g. --query 'chainsaw sound')")
        thr = s.get("threshold")
        if thr is None:
            thr = default_threshold(bundle, text, config_threshold)
        if not isinstance(thr, int | float) or isinstance(thr, bool):
            raise QueryRejected(f"threshold {thr!r} for query {text!r} is not a number")
        policy = None
        if s.get("policy") is not None:
            try:
                policy = PolicyOverlay.model_validate(s["policy"])
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ConfigError(f"policy of query {text!r}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
        qid = s.get("id") or _slug(text, taken)
        msg, res = qb.build(text, qid, float(thr), policy=policy)
        if warn is not None:
            for w in query_warnings(text, res):
                warn(f"warning: query {text!r}: {w}")
        msgs.append(msg)
    return msgs


# --------------------------------------------------------------------------- main


def _policy_from_args(args: argparse.Namespace) -> PolicyOverlay | None:
    fields = {
        "min_hits": args.min_hits,
        "of_windows": args.of_windows,
        "hysteresis": args.hysteresis,
        "cooldown_s": args.cooldown,
        "adapt": False if args.no_adapt else None,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if not fields:
        return None
    try:
        return PolicyOverlay.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(map(str, err["loc"])) or "policy"
        raise ConfigError(f"policy flag {loc}: {err['msg']}") from exc


def _gate(value: str | None, default: float | None) -> float | None:
    if value is None:
        return default
    if value.strip().lower() in ("off", "none", "no"):
        return None
    try:
        v = float(value)
    except ValueError as exc:
        raise ConfigError(f"--gate-dbfs {value!r}: expected a level in dBFS such as -70, or 'off'") from exc
    if not -200.0 <= v <= 0.0:
        raise ConfigError(f"--gate-dbfs {v!r}: expected a level in [-200, 0] dBFS, or 'off'")
    return v


def _make_source(args: argparse.Namespace, cfg: Any) -> Source:
    if args.source is None and cfg is not None:
        if args.realtime is not None and cfg.audio.source == "file":
            return FileSource(cfg.audio.path, realtime=True)
        return source_from_config(cfg)
    spec = args.source or "mic"
    audio = cfg.audio if cfg is not None else None
    device: Any = args.mic_device if args.mic_device is not None else (audio.device if audio else None)
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    if args.source is None:
        try:
            return open_source("mic", device=device, capture_rate=audio.capture_rate if audio else None,
                               block_s=audio.block_s if audio else 0.1)
        except SourceError as exc:
            raise SourceError(f"no --source given, so the microphone was chosen: {exc} (pass --source FILE for "
                              "a recording, --source - for raw PCM on stdin, or --mic-device NAME)") from exc
    return open_source(
        spec,
        realtime=bool(args.realtime) if args.realtime is not None else False,
        device=device,
        stdin_rate=args.stdin_rate or (audio.stdin_rate if audio else 48000),
        stdin_format=args.stdin_format or (audio.stdin_format if audio else "s16le"),
        capture_rate=audio.capture_rate if audio else None,
        channels=audio.channels if (audio and spec == "-") else 1,
        block_s=audio.block_s if audio else 0.1,
    )


def _check_range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is not None and not lo <= value <= hi:
        raise ConfigError(f"{name} {value!r} is out of range (expected {lo:g}..{hi:g})")


def main(args: argparse.Namespace) -> int:
    err = sys.stderr
    cfg = None
    if args.config is not None:
        from ..config import load_config

        cfg = load_config(args.config)
    bundle_path = args.bundle or (cfg.model.bundle if cfg else None)
    if bundle_path is None:
        raise ConfigError("no bundle: pass --bundle DIR (a model bundle directory) or --config FILE")
    _check_range("--overlap", args.overlap, 0.0, 0.95)
    _check_range("--threads", args.threads, 1, 64)
    _check_range("--max-batch", args.max_batch, 1, 256)

    specs: list[dict[str, Any]] = []
    if args.threshold and args.query and len(args.threshold) not in (1, len(args.query)):
        raise ConfigError(
            f"{len(args.threshold)} --threshold values for {len(args.query)} --query texts "
            "(expected one per query, or one for all)"
        )
    for i, text in enumerate(args.query):
        thr = None
        if args.threshold:
            thr = args.threshold[i] if len(args.threshold) > 1 else args.threshold[0]
        specs.append({"text": text, "threshold": thr})
    if args.queries_file is not None:
        specs += read_queries_file(args.queries_file)
    if cfg is not None and not specs:
        specs += [
            {"text": q.text, "threshold": q.threshold, "id": q.id, "policy": q.policy} for q in cfg.queries
        ]
    mqtt = cfg is not None and cfg.mqtt is not None
    if not specs and not args.query_audio and not mqtt:
        raise ConfigError("no queries: pass --query TEXT, --queries-file FILE or --query-audio FILE")

    bundle = load_bundle(bundle_path, part="all" if specs else "device")
    source = _make_source(args, cfg)
    cli_policy = _policy_from_args(args)
    try:
        policy = merge_overlays(cli_policy, cfg.detection.policy if cfg else None, default_policy(bundle))
    except ValidationError as exc:
        raise ConfigError(f"detection policy after CLI flags: {exc.errors()[0]['msg']}") from exc
    cfg_thr = cfg.detection.threshold if cfg else None
    msgs = local_queries(bundle, specs, cfg_thr, warn=lambda line: print(line, file=err)) if specs else []
    # start lines, printed once everything is validated (an error stays one line)
    starts = [f"query {m.query_id!r}: {m.text!r}, threshold {m.threshold:g}" for m in msgs]
    if args.query_audio:
        from ..query_audio import EXAMPLE_ALPHA, WEAK_SELF_SCORE, example_from_audio

        taken = {m.query_id for m in msgs}
        for path in args.query_audio:
            thr = args.threshold[0] if (args.threshold and not args.query) else None
            msg, own = example_from_audio(bundle, path, _slug(f"like-{path.stem}", taken), thr)
            how = "--threshold" if thr is not None else f"{EXAMPLE_ALPHA:g} x its self-score"
            starts.append(f"query {msg.query_id!r} (example {path.name}): self-score {own:.3f}, threshold "
                          f"{msg.threshold:.3f} ({how})")
            if own < WEAK_SELF_SCORE:
                starts.append(f"warning: example {path.name} scores only {own:.3f} against itself: the bundle "
                              "hears little in it, and the query may fire on unrelated sounds")
            elif own < msg.threshold:
                starts.append(f"warning: example {path.name} scores {own:.3f} against itself, below its "
                              f"threshold {msg.threshold:.3f}: it would not find itself")
            msgs.append(msg)

    clips = None
    if args.clips_dir is not None:
        clips = ClipWriter(args.clips_dir)
    elif cfg is not None and cfg.clips.enabled:
        c = cfg.clips
        clips = ClipWriter(c.dir or cfg.storage.dir / "clips", c.max_mb, c.pre_s, c.post_s, c.max_clip_s)

    sinks: list[Sink] = []
    if args.json or args.json_updates:
        sinks.append(JsonLinesSink(updates=args.json_updates))
    elif not mqtt:
        sinks.append(TableSink(onsets=source.live))

    clock = None
    if cfg is not None:
        from ..config import clock_status

        clock = _cached(clock_status, 60.0)
        if cfg.device.require_clock_sync and clock() != "synced":
            log.warning(
                "the system clock is not synchronised (device.require_clock_sync): events carry "
                "clock=%r until NTP syncs; their times are corrected from then on", clock()
            )
    daemon = Daemon(
        bundle,
        source,
        device_id=args.device_id or (cfg.device.id if cfg else "local"),
        threads=args.threads or (cfg.model.threads if cfg else 1),
        providers=args.providers.split(",") if args.providers else (list(cfg.model.providers) if cfg else None),
        overlap=args.overlap if args.overlap is not None else (cfg.windows.overlap if cfg else 0.0),
        gate_dbfs=_gate(args.gate_dbfs, (cfg.gate.energy_dbfs if cfg.gate.enabled else None) if cfg else -70.0),
        policy=policy,
        sinks=sinks,
        max_batch=args.max_batch or (cfg.windows.max_batch if cfg else 8),
        max_queue_s=cfg.windows.max_queue_s if cfg else 30.0,
        clock=clock,
        site=cfg.device.site if cfg else None,
        lat=cfg.device.lat if cfg else None,
        lon=cfg.device.lon if cfg else None,
        clips=clips,
        on_scores=ScorePrinter({m.query_id: m.threshold for m in msgs}, err) if args.scores else None,
    )
    for m in msgs:
        daemon.apply_query(m)
    for line in starts:
        print(line, file=err)

    agent = None
    if mqtt:
        try:
            from ..agent import DeviceAgent
        except ImportError:
            print("edge-retrieval run: MQTT is not available in this build (no edge_retrieval.agent); "
                  "running locally", file=err)
            if not sinks:
                daemon.add_sink(TableSink(onsets=source.live))
        else:
            agent = DeviceAgent(cfg, daemon)
            daemon.add_sink(agent)
            agent.start()

    old_handlers = _install_signals(daemon)
    from ..sdnotify import Supervisor  # systemd READY/WATCHDOG (Type=notify unit); no-op elsewhere

    watch = Supervisor(daemon.health).start()
    try:
        daemon.run()
    finally:
        watch.stop()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if agent is not None:
            agent.stop()
        for s in sinks:
            s.close()
    h = daemon.health()
    print(summary_line(h), file=err)
    window_s = max(e.window_s for e in bundle.manifest.device.experts)
    if not source.live and 0 < h["source_s"] < window_s:
        print(f"note: the recording ({h['source_s']:.2f} s) is shorter than the bundle's {window_s:g} s window: "
              "it was scored once, padded with silence, so its scores may be lower than for a full window", file=err)
    if daemon.source_error:
        print(f"edge-retrieval run: error: {daemon.source_error}", file=err)
        return 1
    return 0


def summary_line(h: dict[str, Any]) -> str:
    rtf = h["rtf"]
    rtf_s = f"{rtf:.3f}" if rtf is not None else "n/a"
    src = h["source"]
    extra = ""
    if isinstance(src, dict) and src.get("ring_overflow_samples"):
        extra = f", mic overflow {src['ring_overflow_samples']} samples"
    return (
        f"summary: {h.get('source_s', h['audio_s']):.2f} s of audio, windows {h['windows']}, encoded {h['encoded']}, "
        f"gated {h['gated']}, dropped {h['dropped']}, failed {h['failed']}, RTF {rtf_s}, "
        f"events {h['events']}{extra}"
    )


class ScorePrinter:
    """``run --scores``: one stderr line per window with each query's score and threshold."""

    def __init__(self, thresholds: dict[str, float], stream: Any) -> None:
        self.thresholds, self.stream = thresholds, stream

    def __call__(self, start_s: float, end_s: float, ids: list[str], row: Any) -> None:
        if row is None:
            cols = "not scored (gated as silence, or no query)"
        else:
            cols = "  ".join(
                f"{qid} {float(v):.4f}{'*' if float(v) >= self.thresholds.get(qid, float('inf')) else ''}"
                f" (thr {self.thresholds[qid]:g})" if qid in self.thresholds else f"{qid} {float(v):.4f}"
                for qid, v in zip(ids, row, strict=True)
            )
        print(f"scores {start_s:8.2f}-{end_s:8.2f} s  {cols}", file=self.stream, flush=True)


def _cached(fn: Any, ttl_s: float) -> Any:
    """Call ``fn`` at most every ``ttl_s`` seconds (clock status runs a subprocess)."""
    import time

    state: dict[str, Any] = {"t": -1e18, "v": "unknown"}

    def call() -> Any:
        now = time.monotonic()
        if now - state["t"] >= ttl_s:
            state["v"], state["t"] = fn(), now
        return state["v"]

    return call


def _install_signals(daemon: Daemon) -> dict[int, Any]:
    """SIGINT/SIGTERM stop the daemon cleanly (open events are closed); returns the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: object) -> None:
        daemon.stop()

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    return old


__all__ = ["add_arguments", "local_queries", "main", "read_queries_file", "summary_line"]
