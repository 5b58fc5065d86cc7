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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ...bundle import Bundle, load_bundle
from ...config import DeviceConfig, load_config, problems_of, validate_config
from ...defaults import default_threshold
from ...device.daemon import Daemon, source_from_config
from ...device.sinks import JsonLinesSink, Sink, TableSink
from ...errors import ConfigError, QueryRejected, SourceError
from ...policy import PolicyOverlay
from ...protocol import QueryMessage
from .bundle_arg import find_bundle

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, help="model bundle directory (default: the config's model.bundle; without "
                   "--config, $EDGE_RETRIEVAL_BUNDLE, else the demo's default bundle)")
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
    from ...text import QueryBuilder, query_warnings
    from ...text.temporal import parse_temporal

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
        tq = parse_temporal(text)  # "A followed by B": each part gets its own default threshold
        part_thr = None
        if tq is not None and s.get("threshold") is None:
            part_thr = [default_threshold(bundle, part, config_threshold) for part in tq.parts]
        msg, res = qb.build(text, qid, float(thr), policy=policy, part_thresholds=part_thr, temporal=True)
        if warn is not None:
            for part in (tq.parts if tq is not None else (text,)):
                for w in query_warnings(part, qb.resolve(part) if tq is not None else res):
                    warn(f"warning: query {part!r}: {w}")
        msgs.append(msg)
    return msgs


# --------------------------------------------------------------------------- main


# flag -> the config key it overrides: one wiring, flags are overrides of a DeviceConfig
FLAG_KEYS: dict[str, str] = {
    "--bundle": "model.bundle",
    "--threads": "model.threads",
    "--providers": "model.providers",
    "--overlap": "windows.overlap",
    "--max-batch": "windows.max_batch",
    "--gate-dbfs": "gate",
    "--device-id": "device.id",
    "--source": "audio",
    "--realtime": "audio.realtime",
    "--mic-device": "audio.device",
    "--stdin-rate": "audio.stdin_rate",
    "--stdin-format": "audio.stdin_format",
    "--clips-dir": "clips",
    "--min-hits": "detection.policy.min_hits",
    "--of-windows": "detection.policy.of_windows",
    "--hysteresis": "detection.policy.hysteresis",
    "--cooldown": "detection.policy.cooldown_s",
    "--no-adapt": "detection.policy.adapt",
}
LOCAL_DEVICE_ID = "local"  # device id of a run without --config


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for k in parents:
        tree = tree.setdefault(k, {})
    tree[leaf] = value


def _abs(path: Path) -> str:
    """A flag's path is relative to the working directory (a config file's to its own folder)."""
    return str(Path(path).expanduser().resolve())


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line flags as overrides of the device config (keys in ``FLAG_KEYS``)."""
    o: dict[str, Any] = {}
    if args.bundle is not None:
        _put(o, "model.bundle", _abs(args.bundle))
    if args.threads is not None:
        _put(o, "model.threads", args.threads)
    if args.providers:
        _put(o, "model.providers", [p.strip() for p in args.providers.split(",") if p.strip()])
    if args.overlap is not None:
        _put(o, "windows.overlap", args.overlap)
    if args.max_batch is not None:
        _put(o, "windows.max_batch", args.max_batch)
    if args.gate_dbfs is not None:
        if args.gate_dbfs.strip().lower() in ("off", "none", "no"):
            _put(o, "gate.enabled", False)
        else:
            try:
                level = float(args.gate_dbfs)
            except ValueError as exc:
                raise ConfigError(f"--gate-dbfs {args.gate_dbfs!r}: expected a level in dBFS such as -70, or 'off'") from exc
            _put(o, "gate.enabled", True)
            _put(o, "gate.energy_dbfs", level)
    if args.device_id is not None:
        _put(o, "device.id", args.device_id)
    if args.source is not None:
        if args.source == "mic":
            _put(o, "audio.source", "mic")
        elif args.source == "-":
            _put(o, "audio.source", "stdin")
        else:
            _put(o, "audio.source", "file")
            _put(o, "audio.path", _abs(Path(args.source)))
        _put(o, "audio.realtime", bool(args.realtime))  # a file named here plays as fast as it can unless --realtime
    elif args.realtime:
        _put(o, "audio.realtime", True)
    if args.mic_device is not None:
        _put(o, "audio.device", int(args.mic_device) if args.mic_device.isdigit() else args.mic_device)
    if args.stdin_rate is not None:
        _put(o, "audio.stdin_rate", args.stdin_rate)
    if args.stdin_format is not None:
        _put(o, "audio.stdin_format", args.stdin_format)
    if args.clips_dir is not None:
        _put(o, "clips.enabled", True)
        _put(o, "clips.dir", _abs(args.clips_dir))
    for flag, value in (("min_hits", args.min_hits), ("of_windows", args.of_windows),
                        ("hysteresis", args.hysteresis), ("cooldown_s", args.cooldown)):
        if value is not None:
            _put(o, f"detection.policy.{flag}", value)
    if args.no_adapt:
        _put(o, "detection.policy.adapt", False)
    return o


def device_config(args: argparse.Namespace) -> DeviceConfig:
    """The config file (or an empty one) with the flags as overrides, validated once."""
    overrides = config_overrides(args)
    try:
        if args.config is not None:
            return load_config(args.config, overrides=overrides)
        return validate_config({"device": {"id": LOCAL_DEVICE_ID}}, source="command line",
                               base_dir=Path.cwd(), overrides=overrides)
    except ConfigError as exc:
        problems = problems_of(exc)
        named = [_flag_problem(p) for p in problems]
        if all(named):  # every problem comes from a flag: say which, on one line
            raise ConfigError("; ".join(n for n in named if n)) from None
        raise


def _flag_problem(problem: str) -> str | None:
    """``key.path: message`` -> ``--flag: key.path: message`` when a flag set that key."""
    key = problem.split(": ", 1)[0]
    flags = [f for f, k in FLAG_KEYS.items() if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
    return f"{'/'.join(flags)}: {problem}" if flags else None


def apply_log_level(level: str) -> None:
    """The config's ``[logging] level`` for the root logger (what journald sees); ``-v`` can only add."""
    root = logging.getLogger()
    want = logging.getLevelName(level)
    root.setLevel(want if root.level >= logging.WARNING else min(root.level, want))


def main(args: argparse.Namespace) -> int:
    err = sys.stderr
    if args.bundle is None and args.config is None:  # no config to name one: $EDGE_RETRIEVAL_BUNDLE or the default
        args.bundle = find_bundle(None)
    cfg = device_config(args)
    if args.config is not None:
        apply_log_level(cfg.logging.level)

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
    if args.config is not None and not specs:
        specs += [
            {"text": q.text, "threshold": q.threshold, "id": q.id, "policy": q.policy} for q in cfg.queries
        ]
    mqtt = cfg.mqtt is not None
    if not specs and not args.query_audio and not mqtt:
        raise ConfigError("no queries: pass --query TEXT, --queries-file FILE or --query-audio FILE")

    # the source first: a missing microphone or file is the first thing to say
    try:
        source = source_from_config(cfg)
    except SourceError as exc:
        if args.source is not None or args.config is not None:
            raise
        raise SourceError(f"no --source given, so the microphone was chosen: {exc} (pass --source FILE for "
                          "a recording, --source - for raw PCM on stdin, or --mic-device NAME)") from exc

    bundle = load_bundle(cfg.model.bundle, part="all" if specs else "device")
    cfg_thr = cfg.detection.threshold
    msgs = local_queries(bundle, specs, cfg_thr, warn=lambda line: print(line, file=err)) if specs else []
    # start lines, printed once everything is validated (an error stays one line)
    starts = [_start_line(m) for m in msgs]
    if args.query_audio:
        from ...offline.query_audio import EXAMPLE_ALPHA, WEAK_SELF_SCORE, example_from_audio

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

    sinks: list[Sink] = []
    if args.json or args.json_updates:
        sinks.append(JsonLinesSink(updates=args.json_updates))
    elif not mqtt:
        sinks.append(TableSink(onsets=source.live))

    clock = None
    if args.config is not None:
        from ...config import clock_status

        clock = _cached(clock_status, 60.0)
        if cfg.device.require_clock_sync and clock() != "synced":
            log.warning(
                "the system clock is not synchronised (device.require_clock_sync): events carry "
                "clock=%r until NTP syncs; their times are corrected from then on", clock()
            )
    on_scores = ScorePrinter({m.query_id: m.threshold for m in msgs}, err) if args.scores else None
    daemon = Daemon.from_config(cfg, sinks, bundle=bundle, clock=clock, source=source, on_scores=on_scores)
    for m in msgs:
        daemon.apply_query(m)
    for line in starts:
        print(line, file=err)

    agent = None
    if mqtt:
        try:
            from ...device.agent import DeviceAgent
        except ImportError:
            print("edge-retrieval run: MQTT is not available in this build (no edge_retrieval.device.agent); "
                  "running locally", file=err)
            if not sinks:
                daemon.add_sink(TableSink(onsets=source.live))
        else:
            agent = DeviceAgent(cfg, daemon)
            daemon.add_sink(agent)
            agent.start()

    old_handlers = _install_signals(daemon)
    from ...device.sdnotify import Supervisor  # systemd READY/WATCHDOG (Type=notify unit); no-op elsewhere

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


def _start_line(m: QueryMessage) -> str:
    if m.temporal is not None:  # a temporal query: each part has its own threshold
        parts = ", ".join(f"{p.text!r} threshold {p.threshold:g}" for p in m.temporal.parts)
        return f"query {m.query_id!r}: {m.text!r} ({m.temporal.relation} within {m.temporal.within_s:g} s: {parts})"
    return f"query {m.query_id!r}: {m.text!r}, threshold {m.threshold:g}"


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


def _cached(fn: Callable[[], str], ttl_s: float) -> Callable[[], str]:
    """Call ``fn`` at most every ``ttl_s`` seconds (clock status runs a subprocess)."""
    import time

    state: dict[str, Any] = {"t": -1e18, "v": "unknown"}

    def call() -> str:
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


__all__ = ["add_arguments", "config_overrides", "device_config", "local_queries", "main", "read_queries_file",
           "summary_line"]
