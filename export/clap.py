"""CLAP (``transformers.ClapModel``, unfused) -> a joint-space bundle: audio ONNX + text ONNX + tokenizer.

``edge-retrieval export clap --checkpoint laion/clap-htsat-unfused --out DIR --precision int8``

- Audio: ``get_audio_features`` (audio tower + projection, L2-normalised) to ONNX, input the
  log-mel ``[B, 1, 1001, 64]`` that ``edge_retrieval.frontends.clap`` computes in numpy
  (bit-identical to ``ClapFeatureExtractor(truncation="rand_trunc")`` on 10 s windows).
  Deterministic crop: the daemon hands the front end windows of exactly ``max_length_s``
  (10 s), so nothing is cropped; a longer input is centre-cropped (HF crops at random), a
  shorter one repeated and zero-padded as HF does.
- Text: ``get_text_features`` (text tower + projection, L2-normalised) to ONNX, plus the
  tokenizer as ``tokenizer.json`` (the ``tokenizers`` library), so the server needs no torch.
- Exporter: ``torch.onnx.export(dynamo=True)`` (IR 10, onnxruntime >= 1.17), or with
  ``--legacy-opset`` the TorchScript exporter at opset 17 (IR 8) and MatMul-only int8 with
  unused opset imports stripped (onnxruntime 1.16 has no int8 ConvInteger).
- int8: ``export.quantize.quantize_under_budget`` on calibration recordings; if no saving
  meets the budget the bundle ships fp32 and says so.
- Space id: from the weights (sha256 over the state dict), front-end parameters and output
  name; precision and exporter are left out, so fp32 and int8 bundles share it.
Fused checkpoints (``enable_fusion=True``) are refused: their 4-channel input and
data-dependent fusion path are not supported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import BundleWriter, FrontendSpec, expert_space_digest, space_id
from edge_retrieval.errors import EdgeRetrievalError, ExportError, missing_extra
from edge_retrieval.frontends.clap import ClapLogMel, ClapLogMelParams

from .quantize import Budget, embedding_metrics, quantize_under_budget, run_model, strip_metadata

log = logging.getLogger(__name__)

EXPERT = "clap"
AUDIO_FILE = "clap/audio.onnx"
TEXT_FILE = "text/clap_text.onnx"
TOKENIZER_FILE = "text/tokenizer.json"
AUDIO_INPUT = "input_features"
AUDIO_OUTPUT = "audio_embeds"
TEXT_OUTPUT = "text_embeds"
LEGACY_OPSET = 17
PARITY_TEXTS = ("a dog barks twice", "chainsaw in the forest", "rain on a tin roof with distant thunder", "x")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIRS = ("tests/data/clips", "tests/data/audio", "tests/data")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="Hugging Face id (already in the local cache) or a local directory")
    p.add_argument("--out", required=True, help="bundle directory to create (must not exist)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument(
        "--legacy-opset",
        action="store_true",
        help=f"TorchScript exporter at opset {LEGACY_OPSET} (IR 8) and MatMul-only int8, for onnxruntime < 1.17",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="recordings for the int8 budget and the parity report (default: the test fixture clips if present, else synthetic clips)",
    )
    p.add_argument("--calibration-max", type=int, default=16, help="at most this many 10 s windows (default 16)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for checks and latency (default 1)")
    p.add_argument("--hop", type=float, default=5.0, help="device scoring hop in seconds (default 5.0)")
    p.add_argument("--min-cosine", type=float, default=0.99, help="int8 budget: min cosine to fp32 (default 0.99)")
    p.add_argument("--cache-dir", help="int8 sensitivity cache (default ~/.cache/edge-retrieval/sensitivity)")
    p.add_argument("--name", help="bundle name (default from the checkpoint)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    """CLI entry: every failure leaves as one project error (the CLI prints it on one line)."""
    root = export_clap(
        checkpoint=args.checkpoint,
        out=args.out,
        precision=args.precision,
        legacy_opset=args.legacy_opset,
        calibration=args.calibration,
        calibration_max=args.calibration_max,
        threads=args.threads,
        hop_s=args.hop,
        budget=Budget(metric="embedding", min_cosine=args.min_cosine),
        cache_dir=args.cache_dir,
        name=args.name,
        quiet=getattr(args, "quiet", False),
    )
    from edge_retrieval.bundle import load_bundle

    b = load_bundle(root, part="all")
    s, e = b.summary(), b.manifest.expert(EXPERT)
    q = e.quantization or {}
    par = (e.parity or {}).get("device_path_vs_torch", {})
    print(
        f"wrote {s['path']}: space {s['space_id'][:12]}, audio {e.precision} {s['experts'][0]['mb']} MB, "
        f"total {s['total_mb']} MB; device path vs torch min cosine {par.get('min_cosine', float('nan')):.6f}"
        + (f"; int8 budget {'met' if q.get('budget_met') else 'NOT met (shipped fp32)'}" if q else "")
    )
    return 0


main = run  # the top-level CLI table calls ``main(args)``


# --------------------------------------------------------------------------- progress


class _Steps:
    """Stage lines on stderr with elapsed seconds (exports of the full model take minutes)."""

    def __init__(self, quiet: bool) -> None:
        self.t0 = time.perf_counter()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[export clap {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- checkpoint


def load_checkpoint(checkpoint: str) -> tuple[Any, Any, Any]:
    """(model, feature extractor, tokenizer) from a local dir or the HF cache; never downloads."""
    if "huggingface_hub" not in sys.modules:  # read at import: a fresh CLI process never goes online
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer, ClapModel
    except ImportError as exc:
        raise missing_extra("export", "transformers") from exc

    transformers.logging.set_verbosity_error()
    where = "local directory" if Path(checkpoint).is_dir() else "Hugging Face id (offline: must already be in the local cache)"
    try:
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(
            f"checkpoint {checkpoint!r} not found as a {where}; download it first "
            f"(huggingface-cli download {checkpoint}) or pass a directory with config.json"
        ) from exc
    if config.model_type != "clap":
        raise ExportError(f"checkpoint {checkpoint!r} is a {config.model_type!r} model, expected 'clap'")
    if getattr(config.audio_config, "enable_fusion", False):
        raise ExportError(
            f"checkpoint {checkpoint!r} is a fused CLAP (enable_fusion=True), which is not supported; "
            "use an unfused one such as laion/clap-htsat-unfused or laion/larger_clap_general"
        )
    try:
        model = ClapModel.from_pretrained(checkpoint, local_files_only=True).eval()
        fe = AutoFeatureExtractor.from_pretrained(checkpoint, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"checkpoint {checkpoint!r}: cannot load model, feature extractor and tokenizer ({str(exc).splitlines()[0][:160]})") from exc
    if not hasattr(tok, "backend_tokenizer"):
        raise ExportError(f"checkpoint {checkpoint!r}: tokenizer {type(tok).__name__} has no tokenizers backend (tokenizer.json)")
    return model, fe, tok


def frontend_params(fe: Any, model: Any) -> ClapLogMelParams:
    """The checkpoint's feature-extractor settings; truncation is rand_trunc (unfused model)."""
    try:
        params = ClapLogMelParams(
            sample_rate=int(fe.sampling_rate),
            n_fft=int(fe.fft_window_size),
            hop_length=int(fe.hop_length),
            n_mels=int(fe.feature_size),
            f_min=float(fe.frequency_min),
            f_max=float(fe.frequency_max),
            max_length_s=float(fe.max_length_s),
            padding=str(fe.padding),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ExportError(f"feature extractor {type(fe).__name__} is not a CLAP one: {exc}") from exc
    mel_bins = getattr(model.config.audio_config, "num_mel_bins", params.n_mels)
    if mel_bins != params.n_mels:
        raise ExportError(f"feature extractor gives {params.n_mels} mel bins, the audio tower expects {mel_bins}")
    return params


def state_dict_digest(model: Any) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), names sorted."""
    import torch

    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- calibration audio


def _read_audio(path: Path, sr: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    try:
        x, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
        raise ExportError(f"calibration file {str(path)!r} cannot be read: {exc}") from exc
    x = x.mean(axis=1)
    if rate != sr:
        x = soxr.resample(x, rate, sr).astype(np.float32)
    return x


def synthetic_clips(sr: int, seconds: float, n: int = 12, seed: int = 100) -> list[np.ndarray]:
    """Distinct structured 10 s clips (tones, noises, chirps, clicks, bursts, vibrato)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    out: list[np.ndarray] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            x = 0.4 * np.sin(2 * np.pi * (220 * (i + 1)) * t)
        elif kind == 1:
            x = 0.2 * rng.standard_normal(t.size)
        elif kind == 2:
            f0, f1 = 100 + 300 * i, 6000 + 500 * i
            x = 0.4 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
        elif kind == 3:
            x = np.zeros(t.size)
            x[:: int(sr / (3 + i))] = 0.9
        elif kind == 4:
            env = (np.sin(2 * np.pi * (0.5 + 0.3 * i) * t) > 0.3).astype(np.float64)
            x = 0.3 * env * np.cumsum(rng.standard_normal(t.size)) / np.sqrt(t.size)
        else:
            vib = 1 + 0.02 * np.sin(2 * np.pi * 5 * t)
            x = sum(0.2 / h * np.sin(2 * np.pi * 180 * (1 + i / 6) * h * t * vib) for h in range(1, 6))
        out.append(np.asarray(x, np.float32))
    return out


def calibration_windows(source: str | None, params: ClapLogMelParams, limit: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Up to ``limit`` distinct 10 s windows at the model rate, and where they came from."""
    n = params.max_samples
    fit = ClapLogMel(params).fit_length
    files: list[Path] = []
    kind = "synthetic"
    if source:
        root = Path(source)
        if not root.is_dir():
            raise ExportError(f"--calibration {source!r} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTS)
        if not files:
            raise ExportError(f"--calibration {source!r} holds no audio files ({', '.join(AUDIO_EXTS)})")
        kind = "recordings"
    else:
        for d in FIXTURE_DIRS:
            cand = REPO_ROOT / d
            if cand.is_dir():
                files = sorted(p for p in cand.rglob("*") if p.suffix.lower() in AUDIO_EXTS)
                if files:
                    kind = "fixture recordings"
                    source = str(cand)
                    break
    windows: list[np.ndarray] = []
    names: list[str] = []
    for f in files:
        x = _read_audio(f, params.sample_rate)
        starts = list(range(0, max(1, len(x) - n + 1), n))[:4] if len(x) >= n else [0]
        for s in starts:
            w = fit(x[s : s + n])
            if np.sqrt(np.mean(np.square(w, dtype=np.float64))) < 1e-4:
                continue  # silent windows all look alike and would fail the identity check spuriously
            windows.append(w.astype(np.float32))
            names.append(f"{f.name}@{s / params.sample_rate:.0f}s")
        if len(windows) >= limit:
            break
    if len(windows) < 2:
        if kind == "recordings":
            raise ExportError(f"--calibration {source!r} gave {len(windows)} non-silent 10 s windows; need at least 2")
        windows = [fit(c) for c in synthetic_clips(params.sample_rate, params.max_length_s)]
        names = [f"synthetic-{i}" for i in range(len(windows))]
        kind, source = "synthetic", "export.clap.synthetic_clips(seed=100)"
    windows, names = windows[:limit], names[:limit]
    return np.stack(windows), {"kind": kind, "source": source, "windows": len(windows), "examples": names[:8]}


# --------------------------------------------------------------------------- torch -> ONNX


@contextlib.contextmanager
def _quiet_export():  # noqa: ANN202
    """torch.onnx prints progress to stdout and warns a lot; keep the CLI's output readable."""
    levels = {n: logging.getLogger(n).level for n in ("torch", "torch.onnx", "torch.export", "onnxscript")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def _wrappers(model: Any) -> tuple[Any, Any]:
    import torch

    class AudioPath(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            out = self.m.get_audio_features(input_features=input_features)
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x / 5.x

    class TextPath(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    return AudioPath(model).eval(), TextPath(model).eval()


def export_audio(model: Any, feats: np.ndarray, path: Path, legacy: bool) -> None:
    import torch

    audio, _ = _wrappers(model)
    x = torch.from_numpy(np.ascontiguousarray(feats[:2], np.float32))
    try:
        with _quiet_export(), torch.no_grad():
            if legacy:
                torch.onnx.export(
                    audio, (x,), str(path), dynamo=False, opset_version=LEGACY_OPSET,
                    input_names=[AUDIO_INPUT], output_names=[AUDIO_OUTPUT],
                    dynamic_axes={AUDIO_INPUT: {0: "batch"}, AUDIO_OUTPUT: {0: "batch"}},
                )
            else:
                torch.onnx.export(
                    audio, (x,), str(path), dynamo=True, external_data=False,
                    input_names=[AUDIO_INPUT], output_names=[AUDIO_OUTPUT],
                    dynamic_shapes={"input_features": {0: torch.export.Dim("batch", min=1, max=1024)}},
                )
    except Exception as exc:  # torch.onnx raises many types; the first line names the cause
        raise ExportError(f"audio tower export to ONNX failed: {str(exc).splitlines()[0][:200]}") from exc


def export_text(model: Any, tok: Any, path: Path, legacy: bool) -> None:
    import torch

    _, text = _wrappers(model)
    enc = tok(list(PARITY_TEXTS[:2]), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    try:
        with _quiet_export(), torch.no_grad():
            if legacy:
                torch.onnx.export(
                    text, (ids, mask), str(path), dynamo=False, opset_version=LEGACY_OPSET,
                    input_names=["input_ids", "attention_mask"], output_names=[TEXT_OUTPUT],
                    dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, TEXT_OUTPUT: {0: "batch"}},
                )
            else:
                b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=4096)
                torch.onnx.export(
                    text, (ids, mask), str(path), dynamo=True, external_data=False,
                    input_names=["input_ids", "attention_mask"], output_names=[TEXT_OUTPUT],
                    dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}},
                )
    except Exception as exc:
        raise ExportError(f"text tower export to ONNX failed: {str(exc).splitlines()[0][:200]}") from exc


def check_onnx(path: Path) -> dict[str, Any]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx.checker.ValidationError, DecodeError
        raise ExportError(f"exported ONNX {path.name!r} is invalid: {str(exc).splitlines()[0][:200]}") from exc
    return {
        "ir_version": int(m.ir_version),
        "opsets": {o.domain or "ai.onnx": int(o.version) for o in m.opset_import},
        "nodes": len(m.graph.node),
    }


# --------------------------------------------------------------------------- references


def torch_audio_embeds(model: Any, feats: np.ndarray) -> np.ndarray:
    import torch

    audio, _ = _wrappers(model)
    with torch.no_grad():
        return audio(torch.from_numpy(np.ascontiguousarray(feats, np.float32))).numpy()


def text_limits(tok: Any, model: Any) -> int:
    """Longest token sequence the text tower takes (RoBERTa positions start after padding_idx)."""
    cfg = model.config.text_config
    pos = int(getattr(cfg, "max_position_embeddings", 514)) - int(getattr(cfg, "pad_token_id", 1) or 0) - 1
    mml = getattr(tok, "model_max_length", pos)
    return int(min(pos, mml if isinstance(mml, int) and mml > 0 else pos))


def text_parity(model: Any, tok: Any, onnx_path: Path, tok_path: Path, max_length: int) -> dict[str, float]:
    """ONNX text tower + tokenizers (the server path) vs torch get_text_features, per text."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    _, text = _wrappers(model)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    t = Tokenizer.from_file(str(tok_path))
    t.no_padding()
    t.enable_truncation(max_length)
    ref, got = [], []
    for s in PARITY_TEXTS:
        enc = tok(s, return_tensors="pt", truncation=True, max_length=max_length)
        with torch.no_grad():
            ref.append(text(enc["input_ids"], enc["attention_mask"]).numpy()[0])
        e = t.encode(s)
        ids = np.asarray([e.ids], np.int64)
        if not np.array_equal(ids, enc["input_ids"].numpy()):
            raise ExportError(f"tokenizer.json gives other ids than the checkpoint's tokenizer for {s!r}")
        got.append(sess.run([TEXT_OUTPUT], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0])
    r, g = np.stack(ref), np.stack(got)
    cos = np.sum(r * g, axis=1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(r - g).max()), "n": len(PARITY_TEXTS)}


def _licence(checkpoint: str) -> str:
    readme = Path(checkpoint) / "README.md"
    if readme.is_file():
        m = re.search(r"^licen[cs]e:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        if m:
            return m.group(1)
    return "see the checkpoint's model card"


def _slug(checkpoint: str) -> str:
    base = Path(checkpoint.rstrip("/")).name or "clap"
    return re.sub(r"[^a-z0-9_.-]+", "-", base.lower()).strip("-.") or "clap"


# --------------------------------------------------------------------------- export


def export_clap(
    checkpoint: str,
    out: str | os.PathLike[str],
    precision: str = "fp32",
    legacy_opset: bool = False,
    calibration: str | None = None,
    calibration_max: int = 16,
    threads: int = 1,
    hop_s: float = 5.0,
    budget: Budget | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    quiet: bool = False,
) -> Path:
    """Build the bundle at ``out`` (nothing is left behind on failure); returns its path."""
    if precision not in ("fp32", "int8"):
        raise ExportError(f"--precision {precision!r} must be 'fp32' or 'int8'")
    if not 0 < hop_s <= 60:
        raise ExportError(f"--hop {hop_s!r} must be in (0, 60] seconds")
    if calibration_max < 2:
        raise ExportError(f"--calibration-max {calibration_max!r} must be >= 2")
    step = _Steps(quiet)
    t_start = time.perf_counter()
    with BundleWriter(out) as writer:  # refuses an existing --out before any slow work
        try:
            bundle = _export(writer, step, checkpoint, precision, legacy_opset, calibration, calibration_max,
                             max(1, int(threads)), hop_s, budget or Budget(), cache_dir, name, t_start)
        except EdgeRetrievalError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"export of {checkpoint!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    step(f"done: {bundle.root} ({time.perf_counter() - t_start:.1f}s)")
    return bundle.root


def _export(
    writer: BundleWriter, step: _Steps, checkpoint: str, precision: str, legacy: bool, calibration: str | None,
    calibration_max: int, threads: int, hop_s: float, budget: Budget, cache_dir: Any, name: str | None, t_start: float,
) -> Any:
    import onnxruntime as ort
    import torch
    import transformers

    from edge_retrieval.bundle import load_bundle

    step(f"loading checkpoint {checkpoint!r}")
    model, fe, tok = load_checkpoint(checkpoint)
    params = frontend_params(fe, model)
    frontend = ClapLogMel(params)
    source_digest = state_dict_digest(model)
    windows, calib_info = calibration_windows(calibration, params, calibration_max)
    step(f"calibration: {calib_info['windows']} windows ({calib_info['kind']})")
    feats = frontend(windows)
    exporter = f"legacy TorchScript, opset {LEGACY_OPSET}" if legacy else "dynamo"
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="er-clap-") as work_dir:
        work = Path(work_dir)
        fp32 = work / "audio_fp32.onnx"
        step(f"exporting audio tower to ONNX ({exporter})")
        t = time.perf_counter()
        export_audio(model, feats, fp32, legacy)
        timings["audio_export_s"] = round(time.perf_counter() - t, 2)
        audio_info = check_onnx(fp32)
        ref = torch_audio_embeds(model, feats)
        got = run_model(fp32, feats, AUDIO_OUTPUT, threads)
        parity: dict[str, Any] = {
            "audio_onnx_fp32_vs_torch": {**embedding_metrics(ref, got), "max_abs_diff": float(np.abs(ref - got).max())},
        }
        step("exporting text tower to ONNX")
        t = time.perf_counter()
        text_onnx = writer.dest(TEXT_FILE)
        export_text(model, tok, text_onnx, legacy)
        timings["text_export_s"] = round(time.perf_counter() - t, 2)
        strip_metadata(text_onnx)
        text_info = check_onnx(text_onnx)
        tok.backend_tokenizer.save(str(writer.dest(TOKENIZER_FILE)))
        max_len = text_limits(tok, model)
        parity["text_onnx_vs_torch"] = text_parity(model, tok, text_onnx, writer.dest(TOKENIZER_FILE), max_len)
        writer.register(TEXT_FILE, "server")
        writer.register(TOKENIZER_FILE, "server")

        shipped = fp32
        quant: dict[str, Any] | None = None
        file_precision = "fp32"
        if precision == "int8":
            step("int8 under the accuracy budget")
            t = time.perf_counter()
            q = work / "audio_int8.onnx"
            quant = quantize_under_budget(
                fp32, q, feats, AUDIO_OUTPUT, budget, legacy=legacy, threads=threads,
                cache_dir=cache_dir, progress=not step.quiet, step=step,
            )
            timings["int8_s"] = round(time.perf_counter() - t, 2)
            quant["calibration"] = calib_info
            if quant["budget_met"]:
                shipped = q
                file_precision = "int8" if quant["shipped"] == "int8" else "mixed"
        strip_metadata(shipped)
        writer.add_file(shipped, AUDIO_FILE, "device")

    fe_spec = FrontendSpec(kind="clap_logmel", params=asdict(params))
    digest = expert_space_digest(space_kind="joint", source_digest=source_digest, frontend=fe_spec, output_name=AUDIO_OUTPUT)
    dim = int(model.config.projection_dim)
    spec = {
        "name": EXPERT,
        "family": "clap",
        "sample_rate": params.sample_rate,
        "window_s": params.max_length_s,
        "frontend": fe_spec.model_dump(),
        "file": AUDIO_FILE,
        "precision": file_precision,
        "input_name": AUDIO_INPUT,
        "output_name": AUDIO_OUTPUT,
        "output_kind": "embedding",
        "dim": dim,
        "quantization": quant,
        "parity": parity,
    }
    text_params = {
        "model": TEXT_FILE,
        "tokenizer": TOKENIZER_FILE,
        "max_length": max_len,
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "output": TEXT_OUTPUT,
        "dim": dim,
    }
    manifest: dict[str, Any] = {
        "name": name or f"clap-{_slug(checkpoint)}-{file_precision}",
        "licence": _licence(checkpoint),
        "licence_note": "CLAP weights keep the checkpoint's licence (LAION CLAP checkpoints on the Hugging Face Hub: Apache-2.0).",
        "space": {"kind": "joint", "id": space_id("joint", [(EXPERT, digest)])},
        "device": {"experts": [spec], "hop_s": hop_s},
        "server": {"text": [{"expert": EXPERT, "kind": "joint", "params": text_params}]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": f"edge-retrieval export clap (torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime {ort.__version__})",
        "notes": {
            "checkpoint": checkpoint,
            "source_digest": source_digest,
            "exporter": exporter,
            "audio_onnx": audio_info,
            "text_onnx": text_info,
            "requested_precision": precision,
            "crop": (
                "deterministic: the daemon's windows are exactly max_length_s, so nothing is cropped; a longer input "
                "is centre-cropped ((len - max) // 2), where ClapFeatureExtractor crops at random; shorter input is "
                f"{params.padding} as in ClapFeatureExtractor"
            ),
            "truncation_in_checkpoint": getattr(fe, "truncation", None),
            "calibration": calib_info,
            "timings": timings,
        },
    }
    if precision == "int8" and quant is not None and not quant["budget_met"]:
        manifest["notes"]["int8"] = f"int8 requested but no saving met the budget; shipped fp32 ({quant.get('reason')})"

    # device path parity: numpy front end + onnxruntime on raw windows (what the daemon runs),
    # checked in a staging copy of the bundle before it is committed
    step("checking the device path against torch")
    dev_parity = _device_parity(writer, manifest, model, fe, windows, threads)
    parity["device_path_vs_torch"] = dev_parity
    if file_precision != "fp32":
        parity["int8_vs_torch"] = dev_parity
    manifest["notes"]["timings"]["total_s"] = round(time.perf_counter() - t_start, 2)
    bundle = writer.commit(manifest)
    # the committed manifest must load and its files verify
    load_bundle(bundle.root, part="all")
    return bundle


def _device_parity(writer: BundleWriter, manifest: dict[str, Any], model: Any, fe: Any, windows: np.ndarray, threads: int) -> dict[str, float]:
    """AudioExpert on raw 48 kHz windows vs torch on ClapFeatureExtractor(rand_trunc) features."""
    import torch

    from edge_retrieval.bundle import Bundle, Manifest
    from edge_retrieval.pipeline.expert import AudioExpert

    data = dict(manifest)
    data["files"] = {k: v.model_dump() for k, v in writer.files.items()}
    m = Manifest.model_validate(data)
    expert = AudioExpert(Bundle(writer.tmp, m), m.expert(EXPERT), threads=threads)
    got = expert.embed(np.ascontiguousarray(windows, np.float32))
    hf = fe(list(windows.astype(np.float32)), sampling_rate=expert.sample_rate, truncation="rand_trunc", return_tensors="pt")
    audio, _ = _wrappers(model)
    with torch.no_grad():
        ref = audio(hf["input_features"]).numpy()
    return {**embedding_metrics(ref, got), "max_abs_diff": float(np.abs(ref / np.linalg.norm(ref, axis=1, keepdims=True) - got).max())}
