"""One audio expert on the device: front end + onnxruntime encoder (+ sigmoid / projection).

``AudioExpert.embed(windows)`` maps a batch of windows at the expert's own rate to the vectors
the matcher scores: class probabilities (labels space, sigmoid applied here, once) or unit
embeddings (joint / trained spaces).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, ExpertSpec
from ..errors import BundleError, EncoderError
from ..frontends import make_frontend

log = logging.getLogger(__name__)


def session_options(threads: int = 1, spin: bool = False):  # noqa: ANN201
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:  # a busy-waiting pool steals the core from the audio thread on a small board
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


ORT_CACHE_ENV = "EDGE_RETRIEVAL_ORT_CACHE"
"""``off`` (or 0/false/no) disables the optimised-model cache; a path puts the cache there."""


def ort_cache_dir() -> Path | None:
    """Where optimised models are cached, or None when the cache is off (see ``ORT_CACHE_ENV``)."""
    val = os.environ.get(ORT_CACHE_ENV, "").strip()
    if val.lower() in {"off", "0", "false", "no"}:
        return None
    if val and val.lower() not in {"on", "1", "true", "yes"}:
        return Path(val).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-retrieval" / "ort"


def _cpu_signature() -> str:
    """Machine + CPU feature flags: ORT_ENABLE_ALL picks kernels and layouts (NCHWc) per CPU."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in {"flags", "features"}:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def ort_cache_key(path: str, providers: Sequence[str]) -> str:
    """sha256 over the model's bytes, the onnxruntime version, the providers and the CPU."""
    import onnxruntime as ort

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"|ort={ort.__version__}|providers={','.join(providers)}|cpu={_cpu_signature()}".encode())
    return h.hexdigest()


def _cached_session(path: str, threads: int, providers: list[str]):  # noqa: ANN202
    """A session on the cached optimised model (built and saved on the first load), or None.

    Why: a session built with ORT_ENABLE_ALL keeps its reordered weights beside the originals
    (~2x the model in RSS); the saved optimised graph reloaded with optimisations off holds one
    copy at the same speed. The file is specific to this CPU and onnxruntime, so it lives on the
    device, keyed by both. Any failure here (unreadable cache, full disk, read-only dir) logs a
    WARNING and returns None: the caller then builds the normal session.
    """
    import onnxruntime as ort

    cache = ort_cache_dir()
    if cache is None:
        return None
    try:
        target = cache / f"{ort_cache_key(path, providers)}.onnx"
    except OSError:
        return None  # the model itself is unreadable: the normal load reports it
    if target.is_file():
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(target), sess_options=so, providers=providers)
        except Exception as exc:
            log.warning("optimised-model cache %s is unreadable (%s); rebuilding it",
                        target, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            try:
                target.unlink()
            except OSError:
                pass
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.onnx")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        so = session_options(threads)
        so.optimized_model_filepath = str(tmp)
        so.log_severity_level = 3  # its "hardware specific" warning is why the cache is keyed per CPU
        sess = ort.InferenceSession(path, sess_options=so, providers=providers)
        del sess  # only built to write the optimised graph; its doubled weights go with it
        os.replace(tmp, target)  # atomic: a reader never sees a half-written model
        so = session_options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(target), sess_options=so, providers=providers)
    except Exception as exc:
        log.warning("cannot use the optimised-model cache %s (%s); loading %s without it",
                    cache, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, path)
        return None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


def available_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Requested providers that this onnxruntime build has, CPU always last."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    wanted = list(requested or ["CPUExecutionProvider"])
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    for p in wanted:
        if p not in have:
            log.warning("execution provider %s is not available in this onnxruntime; using CPU", p)
    return chosen + ["CPUExecutionProvider"]


class OnnxEncoder:
    """An onnxruntime session with named input and outputs; failures become EncoderError."""

    def __init__(
        self,
        path: str,
        input_name: str,
        output_names: Sequence[str],
        threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        chosen = available_providers(providers)
        try:
            cached = _cached_session(path, threads, chosen) if chosen == ["CPUExecutionProvider"] else None
            self.session = cached or ort.InferenceSession(
                path, sess_options=session_options(threads), providers=chosen
            )
            self.cached = cached is not None
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise EncoderError(f"cannot load ONNX model {path!r}: {str(exc).splitlines()[0][:200]}") from exc
        names = {i.name for i in self.session.get_inputs()}
        if input_name not in names:
            raise EncoderError(f"ONNX model {path!r} has no input {input_name!r}; inputs: {sorted(names)}")
        outs = {o.name for o in self.session.get_outputs()}
        missing = [o for o in output_names if o not in outs]
        if missing:
            raise EncoderError(f"ONNX model {path!r} has no output(s) {missing}; outputs: {sorted(outs)}")
        self.input_name = input_name
        self.output_names = list(output_names)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, {self.input_name: x})
        except Exception as exc:
            raise EncoderError(f"inference failed: {str(exc).splitlines()[0][:200]}") from exc


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -15.0, 15.0)))


class _LastCall:
    """Remembers one call of a pure function: the last input (a copy) and its outputs (read-only).

    Several experts of one bundle may share a front end or an ONNX file (BirdNET's labels and its
    embedding); when the next expert passes equal input, the shared work is not done again.
    Bounded: one batch of inputs and outputs (a few MB for 8 BirdNET windows).
    """

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        self.fn = fn
        self._lock = threading.Lock()
        self._x: np.ndarray | None = None
        self._out: Any = None

    def __call__(self, x: np.ndarray) -> Any:
        with self._lock:
            last = self._x
            if last is not None and (x is last or (x.shape == last.shape and x.dtype == last.dtype
                                                   and np.array_equal(x, last))):
                return self._out
            out = self.fn(x)
            outs = [o.copy() if (o is x or o.base is x) else o for o in (out if isinstance(out, list) else [out])]
            for o in outs:
                o.flags.writeable = False  # shared between experts: nobody may change it
            self._x = x if not x.flags.writeable else x.copy()  # a read-only input is kept as is
            self._out = outs if isinstance(out, list) else outs[0]
            return self._out


class _SharedOutputs:
    """One expert's view (its output names, in order) of an encoder run shared by several experts."""

    def __init__(self, run: _LastCall, names: Sequence[str], expert: str) -> None:
        self.run = run
        self.all_names: list[str] = run.fn.output_names  # type: ignore[attr-defined]
        self.pick = [self.all_names.index(n) for n in names]
        self.output_names = list(names)
        self.expert = expert

    def __call__(self, feats: np.ndarray) -> list[np.ndarray]:
        outs = self.run(feats)
        return [outs[i] for i in self.pick]


class AudioExpert:
    """Front end + encoder for one expert of a bundle."""

    def __init__(
        self,
        bundle: Bundle,
        spec: ExpertSpec,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        extra_outputs: Sequence[str] = (),
        *,
        shared: dict[tuple[str, ...], Any] | None = None,
    ) -> None:
        """``shared`` (given by ``load_experts``): front ends and encoder runs that experts on the
        same file and front end reuse, so each runs once per batch of windows."""
        self.spec = spec
        self.name = spec.name
        self.sample_rate = spec.sample_rate
        self.window_samples = int(round(spec.window_s * spec.sample_rate))
        fe_key = ("frontend", spec.frontend.kind, json.dumps(spec.frontend.params, sort_keys=True, default=str))
        if shared is not None and fe_key in shared:
            self.frontend = shared[fe_key]
        else:
            self.frontend = make_frontend(spec.frontend.kind, spec.frontend.params, root=bundle.root)
            if shared is not None:
                self.frontend = shared[fe_key] = _LastCall(self.frontend)
        for o in extra_outputs:
            if o not in spec.extra_outputs:
                raise BundleError(f"expert {spec.name!r} has no extra output {o!r}; has {sorted(spec.extra_outputs)}")
        self.extra_names = list(extra_outputs)
        names = [spec.output_name, *self.extra_names]
        enc_key = ("encoder", spec.file, spec.input_name)
        self.encoder: OnnxEncoder | _SharedOutputs
        if shared is not None and enc_key in shared:
            self.encoder = _SharedOutputs(shared[enc_key], names, spec.name)
        else:
            self.encoder = OnnxEncoder(str(bundle.path(spec.file)), spec.input_name,
                                       shared.get(("outputs", spec.file), names) if shared is not None else names,
                                       threads, providers)
            if shared is not None:
                shared[enc_key] = _LastCall(self.encoder)
                self.encoder = _SharedOutputs(shared[enc_key], names, spec.name)
        self.projection: tuple[np.ndarray, np.ndarray] | None = None
        if spec.projection_file:
            with np.load(bundle.path(spec.projection_file)) as z:
                self.projection = (z["W"].astype(np.float32), z["b"].astype(np.float32))

    @property
    def dim(self) -> int:
        return self.spec.dim

    def features(self, windows: np.ndarray) -> np.ndarray:
        return self.frontend(windows)

    def encode(self, feats: np.ndarray) -> list[np.ndarray]:
        return self.encoder(feats)

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Raw encoder output -> the vector the matcher scores."""
        x = raw.astype(np.float32, copy=False)
        if self.spec.output_kind == "logits":
            return _sigmoid(x)
        if self.projection is not None:
            w, b = self.projection
            x = x @ w + b
        if self.spec.output_kind == "embedding":
            x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x

    def embed(self, windows: np.ndarray, with_extra: bool = False) -> np.ndarray | tuple[np.ndarray, list[np.ndarray]]:
        """windows [B, window_samples] float32 at ``sample_rate`` -> [B, dim] float32."""
        if windows.ndim != 2 or windows.shape[1] != self.window_samples:
            raise EncoderError(
                f"expert {self.name!r} expects windows of shape [B, {self.window_samples}], got {windows.shape}"
            )
        outs = self.encode(self.features(windows))
        vec = self.finish(outs[0])
        return (vec, outs[1:]) if with_extra else vec


def load_experts(
    bundle: Bundle, threads: int = 1, providers: Sequence[str] | None = None
) -> list[AudioExpert]:
    """The bundle's experts; experts on one ONNX file share one session (the union of their
    outputs) and one front end, so BirdNET listed twice (labels + embedding) runs once a window."""
    specs = bundle.manifest.device.experts
    per_file: dict[str, list[str]] = {}
    for spec in specs:
        per_file.setdefault(spec.file, []).append(spec.output_name)
    if all(len(v) == 1 for v in per_file.values()) and len({s.frontend.kind for s in specs}) == len(specs):
        return [AudioExpert(bundle, spec, threads, providers) for spec in specs]
    shared: dict[tuple[str, ...], Any] = {("outputs", f): list(dict.fromkeys(v)) for f, v in per_file.items()}
    return [AudioExpert(bundle, spec, threads, providers, shared=shared) for spec in specs]
