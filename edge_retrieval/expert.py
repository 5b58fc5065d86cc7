"""One audio expert on the device: front end + onnxruntime encoder (+ sigmoid / projection).

``AudioExpert.embed(windows)`` maps a batch of windows at the expert's own rate to the vectors
the matcher scores: class probabilities (labels space, sigmoid applied here, once) or unit
embeddings (joint / trained spaces).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .bundle import Bundle, ExpertSpec
from .errors import BundleError, EncoderError
from .frontends import make_frontend

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

        try:
            self.session = ort.InferenceSession(
                path, sess_options=session_options(threads), providers=available_providers(providers)
            )
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


class AudioExpert:
    """Front end + encoder for one expert of a bundle."""

    def __init__(
        self,
        bundle: Bundle,
        spec: ExpertSpec,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        extra_outputs: Sequence[str] = (),
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.sample_rate = spec.sample_rate
        self.window_samples = int(round(spec.window_s * spec.sample_rate))
        self.frontend = make_frontend(spec.frontend.kind, spec.frontend.params, root=bundle.root)
        for o in extra_outputs:
            if o not in spec.extra_outputs:
                raise BundleError(f"expert {spec.name!r} has no extra output {o!r}; has {sorted(spec.extra_outputs)}")
        self.extra_names = list(extra_outputs)
        self.encoder = OnnxEncoder(
            str(bundle.path(spec.file)), spec.input_name, [spec.output_name, *self.extra_names], threads, providers
        )
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
    return [AudioExpert(bundle, spec, threads, providers) for spec in bundle.manifest.device.experts]
