"""``edge-retrieval bench --experts B1 B2 ...``: CPU per hop of whole bundles, interleaved, and peak RSS.

What a device pays every hop is the front end + encoder of every expert of its bundle. Here each
bundle runs ``Pipeline.encode`` (the daemon's code) on the same real ticks, one tick per call
(the batch a device uses when it keeps up), all bundles interleaved in one run (benchmarks/timing),
at ``threads`` onnxruntime threads. Reported per bundle: median / p95 wall and CPU ms per hop, and
the ratio to the first bundle (ratio of medians and the paired per-round median). Peak RSS comes
from the daemon itself on the demo stream in a fresh process per bundle (benchmarks/daemon_bench,
max_batch 1 as on the small-board profiles).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..bundle import load_bundle
from ..errors import EdgeRetrievalError
from .timing import interleaved, ratio, summaries

TICKS_PER_ROUND = 4  # hops encoded per measured call (one at a time), divided out in the report


def _ticks(pipe: Any, wav: Path) -> list[Any]:
    from ..device.sources import FileSource

    src = FileSource(wav)
    pipe.new_stream(src.sample_rate)
    ticks = []
    for block in src.blocks():
        ticks.extend(pipe.push(block))
    return ticks + pipe.flush()


def _encode(pipe: Any, ticks: Sequence[Any]) -> None:
    for t in ticks:
        pipe.encode([t], [0])


def bench_experts(
    bundles: Sequence[Path], threads: int = 1, repeats: int = 30, warmup: int = 3, rss: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from ..pipeline.core import Pipeline
    from .daemon_bench import bench_daemon, demo_recording

    say = progress or (lambda msg: None)
    if len(bundles) < 1:
        raise EdgeRetrievalError("--experts needs at least one bundle directory")
    loaded = [load_bundle(b, part="device") for b in bundles]
    names = [f"{b.manifest.name} ({Path(p).name})" for b, p in zip(loaded, bundles, strict=True)]
    with tempfile.TemporaryDirectory(prefix="er-experts-") as tmp:
        rate = max(e.sample_rate for b in loaded for e in b.manifest.device.experts)
        wav, what = demo_recording(rate, Path(tmp) / "stream.wav")
        pipes = [Pipeline(b, gate_dbfs=None, threads=threads, max_batch=1) for b in loaded]
        ticks = [_ticks(p, wav) for p in pipes]
        n = min(len(t) for t in ticks)
        if n < TICKS_PER_ROUND:
            raise EdgeRetrievalError(f"the demo stream gave {n} ticks, need {TICKS_PER_ROUND}")
        # the same hops for every bundle: a loud stretch from the middle of the stream
        mid = n // 2
        variants = {name: partial(_encode, p, t[mid : mid + TICKS_PER_ROUND])
                    for name, p, t in zip(names, pipes, ticks, strict=True)}
        say(f"experts: {len(variants)} bundles interleaved, {repeats} rounds of {TICKS_PER_ROUND} hops, {threads} thread(s)")
        samples = interleaved(variants, repeats, warmup)
        per_hop = {k: {m: (round(v / TICKS_PER_ROUND, 4) if m.endswith("_ms") else v) for m, v in s.items()}
                   for k, s in summaries(samples).items()}
        ratios = {k: ratio(samples, k, names[0]) for k in names[1:]}
        cpu_ratios = {k: round(per_hop[k]["cpu_median_ms"] / per_hop[names[0]]["cpu_median_ms"], 4) for k in names[1:]}
    memory = {}
    if rss:
        for name, b in zip(names, bundles, strict=True):
            say(f"experts: daemon peak RSS of {name} (fresh process, max_batch 1)")
            r = bench_daemon(Path(b), None, threads=(threads,), progress=None, memory_variants=False, max_batch=1)
            run = r["runs"][0]
            memory[name] = {"peak_rss_mb": run["peak_rss_mb"], "cpu_s_per_audio_s": run["cpu_s_per_audio_s"],
                            "device_bytes": r.get("device_bytes")}
    return {"threads": threads, "repeats": repeats, "ticks_per_round": TICKS_PER_ROUND, "recording": what,
            "reference": names[0], "per_hop": per_hop, "wall_ratio_to_reference": ratios,
            "cpu_ratio_to_reference": cpu_ratios, "daemon": memory}


def table(res: dict[str, Any]) -> str:
    ref = res["reference"]
    lines = [f"experts: CPU per 1 s hop at {res['threads']} thread(s), {res['repeats']} interleaved rounds "
             f"({res['recording']}); ratio to {ref}",
             "| bundle | wall median ms | wall p95 ms | CPU median ms | wall ratio (of medians / paired) | CPU ratio | daemon peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in res["per_hop"].items():
        r = res["wall_ratio_to_reference"].get(name)
        rr = f"{r['of_medians']:.2f} / {r['paired_median']:.2f}" if r else "1"
        cr = res["cpu_ratio_to_reference"].get(name, 1.0)
        mem = res["daemon"].get(name, {}).get("peak_rss_mb", "-")
        lines.append(f"| {name} | {s['median_ms']:.1f} | {s['p95_ms']:.1f} | {s['cpu_median_ms']:.1f} | {rr} | {cr:.2f} | {mem} |")
    return "\n".join(lines)
