"""The daemon end to end on a recording: CPU seconds per second of audio by stage, peak RSS.

Each configuration runs in a fresh Python process, so its peak RSS is the daemon's own. Peak
RSS is the kernel's high-water mark of the process's memory map (``VmHWM``), read at the end;
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is kept beside it, but on Linux it carries the
parent's high-water mark across fork + exec (a bench parent holding CLAP reported 2.2 GB for
every child), so it is only an upper bound. The daemon gets the device part of the
bundle only (no text encoder), the queries compiled beforehand by the parent and passed as
JSON, a non-live file source read as fast as inference goes, no sinks but a counter. The
per-stage CPU split is the daemon's own ``stage_cpu_s`` (thread CPU time of the thread doing
each stage): complete at 1 onnxruntime thread; with more, the encoder's pool threads are not in
it, so the process CPU total is reported beside it.

"matcher + I/O" = decode + window + gate + matcher + detector (everything but front end and
encoder). onnxruntime memory settings are those of ``expert.session_options``: default CPU
arena and memory pattern, intra-op = threads, inter-op 1, ``allow_spinning=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, load_bundle
from ..errors import EdgeRetrievalError

IO_STAGES = ("decode", "window", "gate", "matcher", "detector")
MODEL_STAGES = ("frontend", "encoder")
ORT_MEMORY = "CPU arena on (default), memory pattern on (default), intra_op=threads, inter_op=1, allow_spinning=0"


def bundle_bytes(bundle: Bundle) -> dict[str, int]:
    """Bytes on disk of the device part, the server part, and the whole bundle directory."""
    files = bundle.manifest.files
    dev = sum(f.bytes for f in files.values() if f.part == "device")
    srv = sum(f.bytes for f in files.values() if f.part == "server")
    total = sum(p.stat().st_size for p in Path(bundle.root).rglob("*") if p.is_file())
    return {"device_bytes": int(dev), "server_bytes": int(srv), "dir_bytes": int(total)}


def demo_recording(rate: int, out: Path, fixture: Path | None = None) -> tuple[Path, str]:
    """The demo's stream (real clips in a row with noise gaps) when the clips exist, else synthetic."""
    import soundfile as sf

    from ..offline.scenes import build_stream, read_fixture

    repo = Path(__file__).resolve().parents[1]
    fixture = fixture or repo / "data" / "fixture.csv"
    clips = []
    if fixture.is_file():
        try:
            from ..cli.commands.demo import pick_clips

            clips = pick_clips(fixture) if read_fixture(fixture) else []
        except EdgeRetrievalError:
            clips = []
    if clips:
        x, segs = build_stream(clips, rate)
        what = f"demo stream: {len(segs)} real recordings of data/fixture.csv with noise gaps"
    else:
        rng = np.random.default_rng(0)
        t = np.arange(int(60 * rate)) / rate
        x = (0.01 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 2000 * t) * (np.sin(t) > 0.5)).astype(np.float32)
        what = "synthetic 60 s (noise + a gated 2 kHz tone; no fixture clips found)"
    sf.write(str(out), x, rate, subtype="PCM_16")
    return out, what


def compile_queries(bundle_dir: Path, texts: Sequence[str]) -> list[str]:
    """Query messages (JSON) for ``texts`` through the bundle's text side (needs its server part)."""
    from ..cli.commands.run import local_queries

    bundle = load_bundle(bundle_dir, part="all")
    msgs = local_queries(bundle, [{"text": t} for t in texts], None, warn=lambda line: None)
    return [m.to_json().decode("utf-8") for m in msgs]


def _ru_maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kb / 1024.0, 1)


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def _current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else _ru_maxrss_mb()


def _arena_off() -> None:
    """Bench-only experiment: the daemon's sessions without onnxruntime's CPU memory arena."""
    from ..pipeline import expert

    base = expert.session_options

    def patched(threads: int = 1, spin: bool = False):  # noqa: ANN202
        so = base(threads, spin)
        so.enable_cpu_mem_arena = False
        return so

    expert.session_options = patched


def worker(
    bundle_dir: Path, wav: Path, queries_json: Path, threads: int, max_batch: int = 8, arena: bool = True
) -> dict[str, Any]:
    """One measured run in this (fresh) process."""
    import onnxruntime  # noqa: F401  (counted in the baseline, as on a device)

    from ..device.daemon import Daemon
    from ..device.sources import FileSource
    from ..protocol import parse_query_message

    rss_imports = _current_rss_mb()
    bundle = load_bundle(bundle_dir, part="device")
    src = FileSource(wav, realtime=False)
    if not arena:
        _arena_off()
    d = Daemon(bundle, src, device_id="bench", threads=threads, sinks=[], max_batch=max_batch)
    for line in json.loads(queries_json.read_text()):
        d.apply_query(parse_query_message(line))
    rss_loaded = _current_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    d.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    h = d.health()
    return {
        "threads": threads,
        "max_batch": max_batch,
        "ort_arena": arena,
        "audio_s": float(src.duration_s),
        "wall_s": round(wall, 3),
        "process_cpu_s": round(cpu, 3),
        "stage_cpu_s": h["stage_cpu_s"],
        "windows": h.get("windows"),
        "encoded": h.get("encoded"),
        "gated": h.get("gated"),
        "queries": h.get("queries"),
        "events": h.get("events"),
        "rss_after_imports_mb": rss_imports,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "ru_maxrss_mb": _ru_maxrss_mb(),
    }


def bench_daemon(
    bundle_dir: Path,
    recording: Path | None,
    threads: Sequence[int] = (1,),
    queries: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    memory_variants: bool = True,
    max_batch: int = 8,
) -> dict[str, Any]:
    """Each config in a fresh subprocess; per-stage CPU s per audio s, peak RSS, bundle size.

    Configs: every thread count with the daemon's defaults (max_batch 8, arena on); with
    ``memory_variants`` also 1 thread with max_batch 1 and 1 thread with the ORT arena off.
    """
    say = progress or (lambda msg: None)
    bundle = load_bundle(bundle_dir, part="device")
    rate = bundle.manifest.device.experts[0].sample_rate
    if queries is None:
        from ..offline.scenes import DETECTION_QUERIES

        queries = list(DETECTION_QUERIES)
    with tempfile.TemporaryDirectory(prefix="er-bench-") as tmp:
        if recording is None:
            wav, what = demo_recording(rate, Path(tmp) / "stream.wav")
        else:
            if not Path(recording).is_file():
                raise EdgeRetrievalError(f"recording {str(recording)!r} does not exist (expected a WAV/FLAC/OGG file)")
            wav, what = Path(recording), f"file {Path(recording).name}"
        say(f"daemon: compiling {len(queries)} queries")
        qfile = Path(tmp) / "queries.json"
        qfile.write_text(json.dumps(compile_queries(bundle_dir, queries)))
        configs = [(t, max_batch, True) for t in threads]
        if memory_variants:
            configs += [(threads[0], 1, True), (threads[0], 8, False)]
        runs = []
        for t, mb, arena in configs:
            say(f"daemon: {what}: {t} thread(s), max_batch {mb}, arena {'on' if arena else 'off'} (fresh process)")
            cmd = [sys.executable, "-m", "edge_retrieval.benchmarks.daemon_bench", "--bundle", str(bundle_dir),
                   "--wav", str(wav), "--queries", str(qfile), "--threads", str(t), "--max-batch", str(mb)]
            cmd += [] if arena else ["--arena-off"]
            r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise EdgeRetrievalError(f"daemon bench worker failed ({t} thread(s), max_batch {mb}): {tail}")
            runs.append(_derive(json.loads(r.stdout.strip().splitlines()[-1])))
    sizes = bundle_bytes(bundle)
    return {
        "bundle": str(bundle_dir),
        "bundle_name": bundle.manifest.name,
        "recording": what,
        "queries": list(queries),
        "ort_memory": ORT_MEMORY,
        "io_stages": list(IO_STAGES),
        **sizes,
        "runs": runs,
    }


def _derive(run: dict[str, Any]) -> dict[str, Any]:
    audio = max(run["audio_s"], 1e-9)
    st = run["stage_cpu_s"]
    run["cpu_s_per_audio_s"] = {k: round(v / audio, 5) for k, v in st.items()}
    io = sum(st.get(k, 0.0) for k in IO_STAGES)
    model = sum(st.get(k, 0.0) for k in MODEL_STAGES)
    run["cpu_s_per_audio_s"]["matcher_io"] = round(io / audio, 5)
    run["cpu_s_per_audio_s"]["frontend_encoder"] = round(model / audio, 5)
    run["cpu_s_per_audio_s"]["process_total"] = round(run["process_cpu_s"] / audio, 5)
    run["matcher_io_over_model"] = round(io / model, 5) if model > 0 else None
    run["rtf_wall"] = round(run["wall_s"] / audio, 5)
    return run


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="daemon bench worker (one measured config, run in a fresh process)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--wav", type=Path, required=True)
    p.add_argument("--queries", type=Path, required=True, help="JSON list of query messages")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--arena-off", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(worker(a.bundle, a.wav, a.queries, a.threads, a.max_batch, not a.arena_off)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
