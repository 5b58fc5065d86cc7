"""Results JSON -> markdown tables, goals met or not (with the measured ratio), and PNG plots.

``python -m edge_retrieval.benchmarks.report benchmarks/results/*.json`` prints the tables the
README shows; ``--readme FILE`` replaces the block between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` in FILE. Goals are judged here, from the numbers, never in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Goal:
    """One goal row: what, the measured value, met (None = not measured), and why."""

    goal: str
    measured: str
    met: bool | None
    reason: str

    def row(self) -> str:
        mark = "not measured" if self.met is None else ("**met**" if self.met else "**not met**")
        return f"| {self.goal} | {self.measured} | {mark} | {self.reason} |"


def _ms(v: dict[str, Any] | None, key: str = "median_ms") -> float | None:
    return None if not v or key not in v else float(v[key])


def _fmt(x: float | None, unit: str = "", nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}{unit}"


def _ratio(entry: dict[str, Any], key: str) -> float | None:
    r = entry.get("ratios", {}).get(key) or {}
    v = r.get("of_medians")
    return None if v is None else float(v)


# --------------------------------------------------------------------------- goals


def goals(res: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    bn = res.get("birdnet")
    if bn:
        top1 = bn.get("top1", {})
        agree = top1.get("ours_vs_litert")
        same = agree is not None and agree >= 1.0
        for t, e in bn["by_threads"].items():
            r = _ratio(e, "ours/litert")
            v = e["variants"]
            ok = None if r is None else (r <= 0.8 and same)
            why = (f"ours {_fmt(_ms(v.get('ours')))} ms vs LiteRT {_fmt(_ms(v.get('litert')))} ms (median); "
                   f"top-1 same on {_fmt(100 * agree if agree is not None else None, '%', 0)} of {top1.get('windows', 0)} windows")
            out.append(Goal(f"BirdNET ours <= 0.8x LiteRT, same top-1 ({t} thr)", f"{_fmt(r)}x", ok, why))
        for t, e in bn["by_threads"].items():
            r = _ratio(e, "frontend/onnx_cnn")
            v = e["variants"]
            why = f"front end {_fmt(_ms(v.get('frontend')))} ms (numpy, 1 thread always) vs CNN {_fmt(_ms(v.get('onnx_cnn')))} ms"
            rs = _ratio(e, "frontend_scipyfft/onnx_cnn")
            if rs is not None:
                why += f"; float32 scipy.fft {_fmt(_ms(v.get('frontend_scipyfft')))} ms = {_fmt(rs)}x, but off parity"
            out.append(Goal(f"BirdNET front end <= 0.5x CNN ({t} thr)", f"{_fmt(r)}x", None if r is None else r <= 0.5, why))
    cl = res.get("clap")
    if cl:
        for t, e in cl["by_threads"].items():
            r = _ratio(e, "onnx_int8/onnx_fp32")
            rt = _ratio(e, "torch_eager/onnx_fp32")
            v = e["variants"]
            why = (f"int8 {_fmt(_ms(v.get('onnx_int8')), ' ms', 1)} vs fp32 {_fmt(_ms(v.get('onnx_fp32')), ' ms', 1)}; "
                   f"torch eager {_fmt(_ms(v.get('torch_eager')), ' ms', 1)} ({_fmt(rt)}x fp32)")
            out.append(Goal(f"CLAP int8 <= 0.6x ONNX fp32 ({t} thr)", f"{_fmt(r)}x", None if r is None else r <= 0.6, why))
    for key, label in (("matcher", "default BLAS threads"), ("matcher_blas1", "BLAS 1 thread")):
        m = res.get(key)
        if not m:
            continue
        e = m["sizes"].get("10000")
        for kind, desc in (("dense", "dense 512-d"), ("sparse", "sparse <= 64 labels")):
            if e is None:
                out.append(Goal(f"10,000 queries <= 1 ms/window, {desc} ({label})", "–", None, "size 10000 not run"))
                continue
            v = e["variants"].get(f"{kind}_match")
            med, p95 = _ms(v), _ms(v, "p95_ms")
            out.append(Goal(
                f"10,000 queries <= 1 ms/window, {desc} ({label})", f"{_fmt(med, ' ms', 3)}",
                None if med is None else med <= 1.0,
                f"median, p95 {_fmt(p95, ' ms', 3)}; scoring arrays {e.get(f'{kind}_matrix_bytes', 0) / 1e6:.1f} MB",
            ))
    d = res.get("daemon")
    if d and d.get("runs"):
        base = d["runs"][0]
        r = base.get("matcher_io_over_model")
        c = base["cpu_s_per_audio_s"]
        out.append(Goal(
            "matcher + I/O <= 10% of front end + encoder", f"{_fmt(None if r is None else 100 * r, '%', 1)}",
            None if r is None else r <= 0.10,
            f"{1e3 * c['matcher_io']:.2f} vs {1e3 * c['frontend_encoder']:.2f} ms CPU per audio s "
            f"({base['threads']} thr, {d.get('recording', '')}, {len(d.get('queries', []))} queries)",
        ))
        limit = d["device_bytes"] / 2**20 + 150
        for run in d["runs"]:
            peak = run["peak_rss_mb"]
            cfg = f"{run['threads']} thr, max_batch {run.get('max_batch', 8)}, arena {'on' if run.get('ort_arena', True) else 'off'}"
            out.append(Goal(
                f"daemon peak RSS <= bundle + 150 MB ({cfg})", f"{peak:.0f} MB", peak <= limit,
                f"device part {d['device_bytes'] / 2**20:.1f} MB + 150 = {limit:.0f} MB; loaded {run.get('rss_loaded_mb')} MB, "
                f"after imports {run.get('rss_after_imports_mb')} MB; whole bundle dir {d['dir_bytes'] / 2**20:.0f} MB",
            ))
    return out


# --------------------------------------------------------------------------- tables


def _variant_table(title: str, block: dict[str, Any], ratio_keys: Sequence[str]) -> list[str]:
    threads = list(block["by_threads"])
    names: list[str] = []
    for t in threads:
        for n in block["by_threads"][t]["variants"]:
            if n not in names:
                names.append(n)
    lines = [f"**{title}** (ms per window: median / p95, CPU median in brackets)", "",
             "| variant | " + " | ".join(f"{t} thread(s)" for t in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for n in names:
        cells = []
        for t in threads:
            v = block["by_threads"][t]["variants"].get(n)
            cells.append("n/a" if not v else f"{v['median_ms']:.2f} / {v['p95_ms']:.2f} ({v['cpu_median_ms']:.1f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for k in ratio_keys:
        cells = []
        for t in threads:
            r = block["by_threads"][t].get("ratios", {}).get(k)
            cells.append("n/a" if not r or r.get("of_medians") is None else
                         f"{r['of_medians']:.3f}x (paired {r['paired_median']:.3f}x)")
        lines.append(f"| ratio {k} | " + " | ".join(cells) + " |")
    return lines


def render_one(res: dict[str, Any]) -> str:
    b = res.get("board", {})
    lines = [f"### Board `{b.get('name', '?')}`", "",
             f"{b.get('cpu_model', '?')}, {b.get('cores', '?')} cores ({b.get('machine', '?')}), "
             f"{b.get('mem_total_mb', '?')} MB RAM; onnxruntime {b.get('onnxruntime', '?')}, "
             f"Python {b.get('python', '?')}; load average {b.get('load_average_start')} at start, "
             f"{b.get('load_average_end')} at end. Run {res.get('started', '?')}."]
    if b.get("note"):
        lines += ["", f"Note: {b['note']}"]
    s = res.get("settings", {})
    if s:
        lines += ["", f"Timing: {s.get('timing', '')}; {s.get('repeats')} rounds after {s.get('warmup')} warm-up."]
    lines += ["", "#### Goals", "", "| goal | measured | result | reason |", "|---|---|---|---|"]
    lines += [g.row() for g in goals(res)] or ["| (no goal measured) | | | |"]
    bn = res.get("birdnet")
    if bn:
        lines += ["", *_variant_table("BirdNET 2.4, one 3 s window", bn,
                                        ["ours/litert", "frontend/onnx_cnn", "frontend_scipyfft/onnx_cnn",
                                         "ours/birdnetlib", "litert/birdnetlib"])]
        extra = f"Input: {bn.get('input')}. Top-1: {bn.get('top1')}. ORT: {bn.get('ort_settings')}. LiteRT: {bn.get('litert_settings')}."
        extra += f" birdnetlib: {bn.get('birdnetlib') or bn.get('birdnetlib_unavailable')}."
        if "frontend_scipyfft_max_rel_diff" in bn:
            extra += (" frontend_scipyfft = the same front end with scipy.fft.rfft in float32 (timed, not shipped): "
                      f"{bn['frontend_scipyfft_max_rel_diff']:.1e} of the spectrogram's peak away from numpy's; against "
                      "the tflite about 2e-4, beyond the 1e-4 parity budget (numpy's FFT computes in double: ~1e-5).")
        lines += ["", extra]
    cl = res.get("clap")
    if cl:
        lines += ["", *_variant_table(f"CLAP audio tower ({cl.get('model')}), one 10 s window", cl,
                                        ["onnx_int8/onnx_fp32", "torch_eager/onnx_fp32"])]
        lines += ["", f"{cl.get('audio_params', 0) / 1e6:.1f} M audio parameters; ONNX fp32 "
                      f"{cl.get('onnx_fp32_bytes', 0) / 1e6:.0f} MB, int8 {cl.get('onnx_int8_bytes', 0) / 1e6:.0f} MB "
                      f"({cl.get('int8_method')}); frontend = numpy log-mel."]
    d = res.get("daemon")
    if d:
        lines += ["", f"**Daemon end to end** ({d.get('recording')}; {len(d.get('queries', []))} queries; "
                      f"bundle device part {d['device_bytes'] / 2**20:.1f} MB, whole {d['dir_bytes'] / 2**20:.1f} MB; "
                      f"ORT memory: {d.get('ort_memory')})", "",
                  "| config | decode | window+gate | front end | encoder | matcher | detector | process total | wall RTF | peak RSS |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["runs"]:
            c = r["cpu_s_per_audio_s"]
            cfg = f"{r['threads']} thr, batch<={r.get('max_batch', 8)}, arena {'on' if r.get('ort_arena', True) else 'off'}"
            cells = [c.get("decode", 0), c.get("window", 0) + c.get("gate", 0), c.get("frontend", 0), c.get("encoder", 0),
                     c.get("matcher", 0), c.get("detector", 0), c.get("process_total", 0)]
            lines.append(f"| {cfg} | " + " | ".join(f"{1e3 * x:.2f}" for x in cells) +
                         f" | {r.get('rtf_wall', 0):.4f} | {r['peak_rss_mb']:.0f} MB |")
        lines += ["", "Stage columns: CPU ms per second of audio (thread CPU of the stage's thread; "
                      "with > 1 ORT thread the pool's CPU is only in the process total)."]
    for key, label in (("matcher", "default BLAS threads"), ("matcher_blas1", "numpy BLAS limited to 1 thread")):
        m = res.get(key)
        if not m:
            continue
        lines += ["", f"**Matcher** ({label}; one window; {m.get('dense')} / {m.get('sparse')}; ms median / p95)", "",
                  "| queries | dense match | sparse match | dense build | sparse build | arrays dense / sparse | detector step |",
                  "|---|---|---|---|---|---|---|"]
        for n, e in m["sizes"].items():
            v = e["variants"]

            def mp(k: str, v: dict[str, Any] = v) -> str:
                x = v.get(k)
                return "–" if not x else f"{x['median_ms']:.3f} / {x['p95_ms']:.3f}"

            lines.append(
                f"| {int(n):,} | {mp('dense_match')} | {mp('sparse_match')} | {e['dense_build_ms']:.1f} | "
                f"{e['sparse_build_ms']:.1f} | {e['dense_matrix_bytes'] / 1e6:.1f} / {e['sparse_matrix_bytes'] / 1e6:.1f} MB | "
                f"{mp('detector_step')} |"
            )
    return "\n".join(lines)


def render(results: Sequence[dict[str, Any]]) -> str:
    return "\n\n".join(render_one(r) for r in results) + "\n"


# --------------------------------------------------------------------------- plots


def plot(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG plots of one results object; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    board = res.get("board", {}).get("name", "")
    files: list[Path] = []
    for key, title in (("birdnet", "BirdNET per 3 s window"), ("clap", "CLAP audio tower per 10 s window")):
        block = res.get(key)
        if not block:
            continue
        threads = list(block["by_threads"])
        names = sorted({n for t in threads for n in block["by_threads"][t]["variants"]})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(len(names), 1)
        for i, n in enumerate(names):
            med = [block["by_threads"][t]["variants"].get(n, {}).get("median_ms", 0.0) for t in threads]
            p95 = [block["by_threads"][t]["variants"].get(n, {}).get("p95_ms", 0.0) for t in threads]
            xs = [j + i * width for j in range(len(threads))]
            err = [max(0.0, a - b) for a, b in zip(p95, med, strict=True)]
            ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=3, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(threads))], [f"{t} thread(s)" for t in threads])
        ax.set_ylabel("ms (median, bar to p95)")
        ax.set_title(f"{title} — {board}")
        ax.legend(fontsize=8)
        f = out_dir / f"{key}_latency.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    m = res.get("matcher")
    if m:
        sizes = [int(n) for n in m["sizes"]]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in ("dense_match", "sparse_match", "detector_step"):
            pts = [(int(n), e["variants"][k]["median_ms"]) for n, e in m["sizes"].items() if k in e["variants"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.axhline(1.0, color="grey", ls="--", lw=1, label="1 ms goal")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("registered queries")
        ax.set_ylabel("ms per window (median)")
        ax.set_title(f"Matcher — {board} (sizes {sizes[0]}..{sizes[-1]})")
        ax.legend(fontsize=8)
        f = out_dir / "matcher.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    d = res.get("daemon")
    if d and d.get("runs"):
        stages = ["decode", "window", "gate", "frontend", "encoder", "matcher", "detector"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [f"{r['threads']}t b{r.get('max_batch', 8)} {'arena' if r.get('ort_arena', True) else 'no-arena'}"
                  for r in d["runs"]]
        bottom = [0.0] * len(labels)
        for st in stages:
            vals = [1e3 * r["cpu_s_per_audio_s"].get(st, 0.0) for r in d["runs"]]
            ax.bar(labels, vals, bottom=bottom, label=st)
            bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
        ax.set_ylabel("CPU ms per second of audio")
        ax.set_title(f"Daemon stages — {board}")
        ax.legend(fontsize=8)
        f = out_dir / "daemon_stages.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


# --------------------------------------------------------------------------- CLI


def standalone_main(prog: str, description: str, add_arguments: Any, run: Any, render_fn: Any,
                    argv: Sequence[str] | None, extra: Any = None) -> int:
    """``main`` of a benchmark module run on its own: its arguments (+ ``extra(parser)``), then
    ``--json/--board/--note``; runs it, writes the JSON if asked and prints ``render_fn(results)``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p)
    if extra is not None:
        extra(p)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--board", default=None)
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(render_fn(results))
    return 0


def is_bench_results(data: Any) -> bool:
    """A results file of ``edge-retrieval bench`` (other programs share benchmarks/results/)."""
    return (isinstance(data, dict) and isinstance(data.get("board"), dict) and "schema" in data
            and "part" not in data)  # archive_bench / server_bench results are summarised by hand


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Bench results among ``paths``, sorted by board; other JSON files (evaluate's) are skipped."""
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"report: cannot read results {str(p)!r}: {exc}") from exc
        if not is_bench_results(data):
            print(f"report: skipping {str(p)!r}: not an edge-retrieval bench results file", file=sys.stderr)
            continue
        out.append(data)
    if not out:
        raise SystemExit("report: no bench results among the files given (expected benchmarks/results/<board>.json)")
    return sorted(out, key=lambda d: str(d["board"].get("name", "")))


def update_readme(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"report: {str(path)!r} has no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_retrieval.benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results JSON files (benchmarks/results/*.json)")
    p.add_argument("--readme", type=Path, default=None, help="replace the bench block of this markdown file")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="also draw PNGs (one subfolder per board)")
    a = p.parse_args(argv)
    results = load_results(a.results)
    text = render(results)
    if a.readme is not None:
        update_readme(a.readme, text)
    if a.plot is not None:
        for r in results:
            plot(r, a.plot / str(r["board"].get("name", "board")))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
