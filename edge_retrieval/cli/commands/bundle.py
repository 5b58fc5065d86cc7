"""``edge-retrieval bundle verify DIR [--json]`` and ``bundle slim DIR OUT``.

verify: checksums of every file the manifest names, then each audio expert is loaded and run on
one window (front end + onnxruntime: outputs finite, of the declared size), and each text side
resolves a probe text. slim: copies only the device part (no text tower) for small boards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import Bundle, load_bundle, slim_bundle
from ...errors import BundleError, EdgeRetrievalError

PROBE_TEXT = "a dog barking"
# parity figures shown, when the exporter recorded them (they differ by expert kind)
PARITY_KEYS = ("windows", "top1_agreement", "max_abs_logit_diff", "max_abs_diff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check a bundle's files, encoders and text side; print its summary")
    v.add_argument("dir", type=Path, help="bundle directory")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    s = sub.add_parser("slim", help="copy the device part only (no text side) to OUT")
    s.add_argument("dir", type=Path, help="bundle directory")
    s.add_argument("out", type=Path, help="new bundle directory (must not exist)")


def check_experts(bundle: Bundle, threads: int = 1) -> list[dict[str, Any]]:
    """Load each audio expert and run one low-level noise window through it."""
    from ...pipeline.expert import AudioExpert

    checks = []
    rng = np.random.default_rng(0)
    for spec in bundle.manifest.device.experts:
        expert = AudioExpert(bundle, spec, threads=threads, extra_outputs=list(spec.extra_outputs))
        if spec.labels_file:
            n = len(bundle.labels(spec.name))
            if n != spec.dim:
                raise BundleError(f"expert {spec.name!r}: {spec.labels_file!r} has {n} labels, output dim is {spec.dim}")
        window = (0.01 * rng.standard_normal((1, expert.window_samples))).astype(np.float32)
        vec, extra = expert.embed(window, with_extra=True)
        if vec.shape != (1, spec.dim) or not np.all(np.isfinite(vec)):
            raise BundleError(f"expert {spec.name!r}: output {vec.shape} is not finite [1, {spec.dim}]")
        for name, arr in zip(expert.extra_names, extra, strict=True):
            if arr.shape[-1] != spec.extra_outputs[name]:
                raise BundleError(f"expert {spec.name!r}: extra output {name!r} has size {arr.shape[-1]}, "
                                  f"manifest says {spec.extra_outputs[name]}")
        checks.append({"expert": spec.name, "ran": True, "output": list(vec.shape)})
    return checks


def check_text(bundle: Bundle) -> list[dict[str, Any]]:
    """Resolve a probe text with every text side of a full bundle."""
    if not bundle.has_server_part:
        return []
    from ...text import QueryBuilder

    res = QueryBuilder(bundle).resolve(PROBE_TEXT)
    return [{"expert": r.expert, "probe": PROBE_TEXT, "top": r.top[0][0] if r.top else None,
             "fit": round(r.fit, 3)} for r in res]


def verify(path: Path, threads: int = 1) -> dict[str, Any]:
    bundle = load_bundle(path, part="all")
    summary = bundle.summary()
    summary["checks"] = {"checksums": True, "experts": check_experts(bundle, threads), "text": check_text(bundle)}
    for e, spec in zip(summary["experts"], bundle.manifest.device.experts, strict=True):
        if spec.parity:
            e["parity"] = {k: spec.parity[k] for k in PARITY_KEYS if k in spec.parity}
    summary["licence_note"] = bundle.manifest.licence_note
    return summary


def _parity_text(par: dict[str, Any]) -> str:
    """Whatever parity the exporter recorded (labels experts: top-1 and logits; embeddings: max diff)."""
    parts = []
    if "top1_agreement" in par:
        parts.append(f"top-1 {par['top1_agreement']:.1%}")
    if "max_abs_logit_diff" in par:
        parts.append(f"max |logit diff| {par['max_abs_logit_diff']:.3g}")
    if "max_abs_diff" in par:
        parts.append(f"max |diff| {par['max_abs_diff']:.3g}")
    if not parts:
        return ""
    n = f" over {par['windows']} windows" if "windows" in par else ""
    return f"; parity {', '.join(parts)}{n}"


def _print_summary(s: dict[str, Any]) -> None:
    print(f"bundle {s['name']} at {s['path']}: OK")
    print(f"  space     {s['space_kind']} {s['space_id']}")
    print(f"  licence   {s['licence']}" + (f" ({s['licence_note']})" if s.get("licence_note") else ""))
    print(f"  size      device {s['device_mb']} MB, total {s['total_mb']} MB, {s['files']} files; hop {s['hop_s']} s")
    for e in s["experts"]:
        ptxt = _parity_text(e.get("parity") or {})
        print(f"  expert    {e['name']} ({e['family']}, {e['precision']}): {e['sample_rate']} Hz, "
              f"{e['window_s']} s windows, front end {e['frontend']}, {e['output']}, {e['mb']} MB{ptxt}")
    if s["server_part"]:
        for t in s["checks"]["text"]:
            to = repr(t["top"]) if t["top"] is not None else "a projected vector (no labels to name)"
            print(f"  text      {t['expert']}: {t['probe']!r} -> {to} (fit {t['fit']})")
    else:
        print("  text      none (slim device bundle)")


def main(args: argparse.Namespace) -> int:
    if args.action == "verify":
        try:
            s = verify(args.dir, threads=args.threads)
        except EdgeRetrievalError:
            raise
        except (OSError, ValueError) as exc:
            raise BundleError(f"bundle {str(args.dir)!r}: {exc}") from exc
        if args.json:
            print(json.dumps(s, indent=2, default=str))
        else:
            _print_summary(s)
        return 0
    b = slim_bundle(args.dir, args.out)
    s = b.summary()
    print(f"wrote slim bundle {s['path']}: {s['files']} files, {s['device_mb']} MB (device part of {str(args.dir)!r})")
    return 0
