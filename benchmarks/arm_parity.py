"""Cross-architecture parity of a bundle's experts: the same windows through front end + ONNX.

Why: onnxruntime's ARM kernels (NEON, int8 dot products) and numpy's ARM builds are not the
x86 ones, so a bundle proven on x86 must be checked on aarch64 before a Pi trusts it. The check
is generic over ``manifest.device.experts``: every expert's front end, main output and
``extra_outputs`` are compared, so a new expert needs no change here.

Three steps, each a subcommand, so the two machines only exchange files::

    python -m edge_retrieval.benchmarks.arm_parity windows --bundle B --sounds DIR --out w.npz  # host
    python -m edge_retrieval.benchmarks.arm_parity outputs --bundle B --windows w.npz --out x.npz  # each arch
    python -m edge_retrieval.benchmarks.arm_parity compare REF.npz TEST.npz --json report.json   # host

The windows file holds the raw samples at each expert's rate, so both sides feed bit-identical
input (decoding and resampling are exercised separately by the daemon run). Imports only the
stable runtime modules (bundle, frontends) and onnxruntime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import Bundle, ExpertSpec, load_bundle
from edge_retrieval.errors import BundleError
from edge_retrieval.frontends import make_frontend

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
LABEL_KINDS = ("logits", "probabilities")
SEP = "/"  # npz key = expert / part / name


def _key(*parts: str) -> str:
    return SEP.join(parts)


# --------------------------------------------------------------------------- windows


def pick_files(sounds: Path, count: int) -> list[Path]:
    """``count`` recordings spread over the category folders (round robin, sorted: deterministic)."""
    if not sounds.is_dir():
        raise BundleError(f"sounds folder {str(sounds)!r} does not exist (expected <category>/<clip>.wav)")
    groups = [sorted(p for p in d.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
              for d in sorted(sounds.iterdir()) if d.is_dir()]
    groups = [g for g in groups if g]
    picked: list[Path] = []
    i = 0
    while len(picked) < count and any(i < len(g) for g in groups):
        picked.extend(g[i] for g in groups if i < len(g))
        i += 1
    if not picked:
        raise BundleError(f"sounds folder {str(sounds)!r} holds no {'/'.join(AUDIO_SUFFIXES)} files")
    return picked[:count]


def loudest_window(samples: np.ndarray, n: int) -> np.ndarray:
    """The non-overlapping ``n``-sample window of highest energy (zero-padded when shorter):
    a window with the sound in it, not the silence around it."""
    if len(samples) < n:
        return np.pad(samples, (0, n - len(samples))).astype(np.float32)
    k = len(samples) // n
    frames = samples[: k * n].reshape(k, n)
    return frames[int(np.argmax((frames.astype(np.float64) ** 2).sum(axis=1)))].astype(np.float32)


def make_windows(bundle: Bundle, files: Sequence[Path]) -> dict[str, np.ndarray]:
    """For every expert: one window per file at the expert's rate, ``[N, window_samples]`` float32."""
    import soundfile as sf
    import soxr

    out: dict[str, np.ndarray] = {}
    decoded = []
    for f in files:
        data, rate = sf.read(str(f), dtype="float32", always_2d=True)
        decoded.append((data.mean(axis=1), rate))
    for spec in bundle.manifest.device.experts:
        n = round(spec.sample_rate * spec.window_s)
        rows = []
        for mono, rate in decoded:
            x = mono if rate == spec.sample_rate else soxr.resample(mono, rate, spec.sample_rate)
            rows.append(loudest_window(np.asarray(x, dtype=np.float32), n))
        out[_key(spec.name, "windows")] = np.stack(rows)
    return out


# --------------------------------------------------------------------------- outputs


def _session(path: Path, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    so = ort.SessionOptions()  # what the daemon uses: full optimisation, sequential, no spinning
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unrelated classes; name the file
        raise BundleError(f"onnxruntime cannot load {str(path)!r}: {exc}") from exc


def expert_outputs(bundle: Bundle, spec: ExpertSpec, windows: np.ndarray, threads: int = 1) -> dict[str, np.ndarray]:
    """Front end features and every declared ONNX output, one window at a time (max_batch 1)."""
    frontend = make_frontend(spec.frontend.kind, spec.frontend.params, root=bundle.root)
    sess = _session(bundle.path(spec.file), threads)
    names = [spec.output_name, *spec.extra_outputs]
    feats: list[np.ndarray] = []
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(len(windows)):
        x = np.ascontiguousarray(frontend(windows[i : i + 1]), dtype=np.float32)
        feats.append(x[0])
        for name, arr in zip(names, sess.run(names, {spec.input_name: x}), strict=True):
            outs[name].append(np.asarray(arr, dtype=np.float32).reshape(arr.shape[0], -1)[0])
    res = {_key(spec.name, "frontend"): np.stack(feats)}
    res.update({_key(spec.name, "out", n): np.stack(v) for n, v in outs.items()})
    return res


def _sha(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def platform_note() -> dict[str, str]:
    import onnxruntime as ort

    return {"machine": platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__}


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class OutputParity:
    """One array of one expert compared over all windows."""

    expert: str
    output: str  # "frontend" or an ONNX output name
    role: str  # "frontend", "labels" (top-1 checked) or "vector" (cosine checked)
    windows: int
    max_abs_diff: float
    median_window_max_abs_diff: float
    ref_peak: float  # max |reference|: the scale the differences are read against
    cosine_min: float
    top1_agreement: float | None  # labels outputs only
    finite: bool


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64 = a.reshape(len(a), -1).astype(np.float64)
    b64 = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a64 * b64).sum(axis=1) / np.maximum(na * nb, 1e-300)
    return np.where(both_zero, 1.0, cos)


def compare_arrays(expert: str, output: str, role: str, ref: np.ndarray, test: np.ndarray) -> OutputParity:
    if ref.shape != test.shape:
        raise BundleError(f"expert {expert!r} output {output!r}: shapes differ, reference {ref.shape} vs {test.shape}")
    finite = bool(np.all(np.isfinite(test)))
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64)).reshape(len(ref), -1)
    per_window = diff.max(axis=1) if diff.size else np.zeros(len(ref))
    top1 = None
    if role == "labels":
        top1 = float(np.mean(ref.reshape(len(ref), -1).argmax(1) == test.reshape(len(test), -1).argmax(1)))
    return OutputParity(
        expert=expert, output=output, role=role, windows=len(ref),
        max_abs_diff=float(per_window.max()) if finite else float("inf"),
        median_window_max_abs_diff=float(np.median(per_window)) if finite else float("inf"),
        ref_peak=float(np.abs(ref).max()), cosine_min=float(_cosines(ref, test).min()) if finite else float("nan"),
        top1_agreement=top1, finite=finite,
    )


def compare(ref: dict[str, Any], test: dict[str, Any], manifest_experts: Sequence[dict[str, Any]]) -> list[OutputParity]:
    """Every expert of the manifest, every array the reference holds for it."""
    rows: list[OutputParity] = []
    for e in manifest_experts:
        name = e["name"]
        wk = _key(name, "windows_sha256")
        if str(ref.get(wk)) != str(test.get(wk)):
            raise BundleError(f"expert {name!r}: the two output files were computed from different windows")
        label_main = e["output_kind"] in LABEL_KINDS
        keys = [_key(name, "frontend")] + [_key(name, "out", o) for o in [e["output_name"], *e.get("extra_outputs", {})]]
        for k in keys:
            if k not in ref or k not in test:
                raise BundleError(f"expert {name!r}: {k!r} is missing from {'reference' if k not in ref else 'test'} outputs")
            out = k.split(SEP, 2)[-1] if SEP + "out" + SEP in k else "frontend"
            role = "frontend" if out == "frontend" else ("labels" if out == e["output_name"] and label_main else "vector")
            rows.append(compare_arrays(name, out, role, np.asarray(ref[k]), np.asarray(test[k])))
    return rows


def verdict(rows: Sequence[OutputParity], min_top1: float = 0.99, min_cosine: float = 0.999) -> list[str]:
    """The failures, one line each; empty means the test side agrees with the reference."""
    bad = []
    for r in rows:
        if not r.finite:
            bad.append(f"{r.expert}.{r.output}: non-finite values")
        if r.top1_agreement is not None and r.top1_agreement < min_top1:
            bad.append(f"{r.expert}.{r.output}: top-1 same on {r.top1_agreement:.1%} of {r.windows} windows (< {min_top1:.0%})")
        if r.role == "vector" and r.cosine_min < min_cosine:
            bad.append(f"{r.expert}.{r.output}: cosine min {r.cosine_min:.6f} (< {min_cosine})")
    return bad


def format_table(rows: Sequence[OutputParity]) -> str:
    lines = ["| expert | output | windows | top-1 same | max abs diff | median window max | reference peak | cosine min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t1 = "–" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
        lines.append(f"| {r.expert} | {r.output} | {r.windows} | {t1} | {r.max_abs_diff:.3g} | "
                     f"{r.median_window_max_abs_diff:.3g} | {r.ref_peak:.3g} | {r.cosine_min:.7f} |")
    return "\n".join(lines)


def _load_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{str(path)!r} is not an outputs file of arm_parity ({exc})") from exc


# --------------------------------------------------------------------------- CLI


def _cmd_windows(a: argparse.Namespace) -> int:
    bundle = load_bundle(a.bundle, part="device")
    files = pick_files(a.sounds, a.count)
    arrays = make_windows(bundle, files)
    meta = {"bundle": bundle.manifest.name, "space_id": bundle.manifest.space.id,
            "files": [str(f.relative_to(a.sounds)) for f in files]}
    np.savez(a.out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {len(files)} windows per expert ({', '.join(e.name for e in bundle.manifest.device.experts)}) to {a.out}")
    return 0


def _cmd_outputs(a: argparse.Namespace) -> int:
    bundle = load_bundle(a.bundle, part="device")
    win = _load_npz(a.windows)
    res: dict[str, Any] = {}
    for spec in bundle.manifest.device.experts:
        k = _key(spec.name, "windows")
        if k not in win:
            raise BundleError(f"{str(a.windows)!r} has no windows for expert {spec.name!r} (made for another bundle?)")
        res.update(expert_outputs(bundle, spec, win[k], threads=a.threads))
        res[_key(spec.name, "windows_sha256")] = np.array(_sha({k: win[k]}))
    experts = [e.model_dump(include={"name", "output_kind", "output_name", "extra_outputs", "precision"})
               for e in bundle.manifest.device.experts]
    res["meta"] = np.array(json.dumps({"platform": platform_note(), "bundle": bundle.manifest.name,
                                       "space_id": bundle.manifest.space.id, "experts": experts}))
    np.savez(a.out, **res)
    p = platform_note()
    print(f"wrote outputs of {len(experts)} expert(s) on {p['machine']} (onnxruntime {p['onnxruntime']}, "
          f"numpy {p['numpy']}) to {a.out}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    ref, test = _load_npz(a.reference), _load_npz(a.test)
    mref, mtest = json.loads(str(ref["meta"])), json.loads(str(test["meta"]))
    if mref["space_id"] != mtest["space_id"] or mref["bundle"] != mtest["bundle"]:
        raise BundleError(f"{str(a.test)!r} is from bundle {mtest['bundle']!r}, reference from {mref['bundle']!r}")
    rows = compare(ref, test, mref["experts"])
    bad = verdict(rows, a.min_top1, a.min_cosine)
    print(f"reference {mref['platform']}\ntest      {mtest['platform']}\nbundle    {mref['bundle']}")
    print(format_table(rows))
    if a.json:
        report = {"bundle": mref["bundle"], "reference": mref["platform"], "test": mtest["platform"],
                  "experts": mref["experts"], "min_top1": a.min_top1, "min_cosine": a.min_cosine,
                  "rows": [asdict(r) for r in rows], "failures": bad}
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for line in bad:
        print(f"FAIL {line}")
    print("parity: OK" if not bad else f"parity: {len(bad)} failure(s)")
    return 0 if not bad else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_retrieval.benchmarks.arm_parity", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows", help="pick windows from real recordings (host)")
    w.add_argument("--bundle", type=Path, required=True)
    w.add_argument("--sounds", type=Path, default=Path.home() / ".cache" / "edge-retrieval" / "sounds")
    w.add_argument("--count", type=int, default=48, help="windows per expert, one per recording (default 48)")
    w.add_argument("--out", type=Path, required=True)
    o = sub.add_parser("outputs", help="front end + ONNX outputs of every expert on the windows")
    o.add_argument("--bundle", type=Path, required=True)
    o.add_argument("--windows", type=Path, required=True)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="compare a test outputs file against a reference one")
    c.add_argument("reference", type=Path)
    c.add_argument("test", type=Path)
    c.add_argument("--min-top1", type=float, default=0.99, help="labels outputs: least top-1 agreement (0.99)")
    c.add_argument("--min-cosine", type=float, default=0.999, help="vector outputs: least cosine (0.999)")
    c.add_argument("--json", type=Path, help="write the report here")
    a = p.parse_args(argv)
    if getattr(a, "count", 1) < 1 or getattr(a, "threads", 1) < 1:
        p.error("--count and --threads must be >= 1")
    try:
        return {"windows": _cmd_windows, "outputs": _cmd_outputs, "compare": _cmd_compare}[a.cmd](a)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
