"""Device-path cost of the mixture bundle against the default BirdNET bundle (prints a table).

    python -m edge_retrieval.benchmarks.moee_device --bundle BUNDLE [--bundle BUNDLE2 ...]
        [--threads 1] [--json benchmarks/results/moee_device.json]

Each row is the daemon on the demo stream (``daemon_bench.worker``: device part only, queries
compiled beforehand, file read as fast as inference goes), in a fresh process, so peak RSS is
its own. ``--no-share`` rows load every expert alone (``AudioExpert`` per spec, as before
``load_experts`` shared sessions): BirdNET listed twice (labels + embedding) then runs twice a
window. ms/window = CPU of front end + encoder (thread CPU, complete at 1 thread) and of the
whole process, over the windows encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..bundle import load_bundle
from . import daemon_bench

QUERIES = ("gunshot", "siren", "a dog barking", "an engine running", "thunder")


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--wav", type=Path, required=True)
    p.add_argument("--queries", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--no-share", action="store_true")
    a = p.parse_args(argv)
    if a.no_share:  # the loader before sessions were shared: one AudioExpert per spec
        from ..pipeline import core, expert

        def alone(bundle, threads=1, providers=None):  # noqa: ANN001, ANN202
            return [expert.AudioExpert(bundle, s, threads, providers) for s in bundle.manifest.device.experts]

        core.load_experts = alone
    print(json.dumps(daemon_bench.worker(a.bundle, a.wav, a.queries, a.threads, a.max_batch)))
    return 0


def measure(bundles: list[Path], threads: int, batches: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="moee-dev-") as tmp:
        rate = load_bundle(bundles[0], part="device").manifest.device.experts[0].sample_rate
        wav, what = daemon_bench.demo_recording(rate, Path(tmp) / "stream.wav")
        for b in bundles:
            bundle = load_bundle(b, part="device")
            qfile = Path(tmp) / f"q_{len(rows)}.json"
            qfile.write_text(json.dumps(daemon_bench.compile_queries(b, QUERIES)))
            files = [e.file for e in bundle.manifest.device.experts]
            variants = [False] + ([True] if len(set(files)) < len(files) else [])
            for no_share in variants:
                for mb in batches:
                    cmd = [sys.executable, "-m", "edge_retrieval.benchmarks.moee_device", "--worker", "--bundle", str(b),
                           "--wav", str(wav), "--queries", str(qfile), "--threads", str(threads), "--max-batch", str(mb)]
                    cmd += ["--no-share"] if no_share else []
                    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    if r.returncode != 0:
                        raise SystemExit(f"worker failed for {b}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    run = json.loads(r.stdout.strip().splitlines()[-1])
                    n = max(1, int(run["encoded"] or 0))
                    st = run["stage_cpu_s"]
                    rows.append({
                        "bundle": bundle.manifest.name, "experts": bundle.manifest.expert_names,
                        "shared_sessions": (not no_share) if len(variants) > 1 else None, "threads": threads, "max_batch": mb, "recording": what,
                        "windows_encoded": n, "audio_s": run["audio_s"],
                        "frontend_ms_per_window": round(1e3 * st.get("frontend", 0.0) / n, 2),
                        "encoder_ms_per_window": round(1e3 * st.get("encoder", 0.0) / n, 2),
                        "model_ms_per_window": round(1e3 * (st.get("frontend", 0.0) + st.get("encoder", 0.0)) / n, 2),
                        "process_cpu_ms_per_window": round(1e3 * run["process_cpu_s"] / n, 2),
                        "cpu_s_per_audio_s": round(run["process_cpu_s"] / max(run["audio_s"], 1e-9), 4),
                        "peak_rss_mb": run["peak_rss_mb"], "rss_loaded_mb": run["rss_loaded_mb"],
                        "device_bytes": daemon_bench.bundle_bytes(bundle)["device_bytes"],
                    })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| bundle | sessions | batch | front end + encoder ms/window | process CPU ms/window | CPU s / audio s | "
           "peak RSS MB | device part MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['bundle']} | { {True: 'shared', False: 'one per expert', None: 'one expert'}[r['shared_sessions']] } | {r['max_batch']} | "
                   f"{r['model_ms_per_window']:.1f} | {r['process_cpu_ms_per_window']:.1f} | {r['cpu_s_per_audio_s']:.3f} | "
                   f"{r['peak_rss_mb']:.0f} | {r['device_bytes'] / 1e6:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    p = argparse.ArgumentParser(prog="moee_device", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = measure(a.bundle, a.threads)
    print(table(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"threads": a.threads, "queries": list(QUERIES), "rows": rows}, indent=1) + "\n",
                          encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
