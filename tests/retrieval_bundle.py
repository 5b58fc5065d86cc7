"""A tiny real bundle for archive/evaluate tests: an in-graph ONNX model over raw audio.

The graph frames the window, takes a DFT by MatMul with constant cos/sin matrices, and sums the
power in ``BANDS`` equal frequency bands. A labels expert emits logits (band share, scaled) over
labels "band0".."band15"; an embedding expert emits the band-energy shares (unit-normalised by
the runtime). A tone in band k therefore scores highest for band k in both kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_retrieval.bundle import BundleWriter, expert_space_digest, sha256_file, space_id
from edge_retrieval.offline.retrieval import QueryVectors, query_from_message
from edge_retrieval.protocol import SCHEMA, QueryMessage, encode_dense, encode_sparse

RATE = 8000
WINDOW_S = 1.0
FRAME = 250
BANDS = 16


def band_hz(k: int) -> float:
    """Centre frequency of band k (Hz)."""
    return (k + 0.5) * (RATE / 2) / BANDS


def _model(kind: str, window: int) -> onnx.ModelProto:
    frames = window // FRAME
    n = np.arange(FRAME)
    bins = FRAME // 2
    f = np.arange(bins)
    cos = np.cos(2 * np.pi * np.outer(n, f) / FRAME).astype(np.float32)
    sin = np.sin(2 * np.pi * np.outer(n, f) / FRAME).astype(np.float32)
    band = np.zeros((bins, BANDS), np.float32)
    band[f, (f * BANDS) // bins] = 1.0
    inits = [
        numpy_helper.from_array(np.array([-1, frames, FRAME], np.int64), "shape"),
        numpy_helper.from_array(cos, "cos"),
        numpy_helper.from_array(sin, "sin"),
        numpy_helper.from_array(band, "band"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([1e-9], np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Reshape", ["audio", "shape"], ["fr"]),
        helper.make_node("MatMul", ["fr", "cos"], ["re"]),
        helper.make_node("MatMul", ["fr", "sin"], ["im"]),
        helper.make_node("Mul", ["re", "re"], ["re2"]),
        helper.make_node("Mul", ["im", "im"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["pw"]),
        helper.make_node("MatMul", ["pw", "band"], ["bp"]),
        helper.make_node("ReduceMean", ["bp", "ax1"], ["be"], keepdims=0),
        helper.make_node("Add", ["be", "eps"], ["be_eps"]),
        helper.make_node("ReduceSum", ["be_eps", "ax1"], ["tot"], keepdims=1),
        helper.make_node("Div", ["be_eps", "tot"], ["share"]),
    ]
    if kind == "labels":
        inits += [
            numpy_helper.from_array(np.array([20.0], np.float32), "scale"),
            numpy_helper.from_array(np.array([5.0], np.float32), "shift"),
        ]
        nodes += [
            helper.make_node("Mul", ["share", "scale"], ["sc"]),
            helper.make_node("Sub", ["sc", "shift"], ["out"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["share"], ["out"]))
    graph = helper.make_graph(
        nodes, f"tiny_{kind}",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", window])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", BANDS])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def make_bundle(out: Path, kind: str = "labels", hop_s: float = WINDOW_S, salt: str = "") -> Path:
    """Write a tiny bundle (device part only) with one expert of ``kind`` ("labels" or "embedding")."""
    window = int(RATE * WINDOW_S)
    tmp = out.parent / f".{out.name}.model.onnx"
    onnx.save(_model(kind, window), str(tmp))
    fe = {"kind": "in-graph", "params": {}}
    labels = [f"band{k}" for k in range(BANDS)]
    space_kind = "labels" if kind == "labels" else "joint"
    digest = expert_space_digest(
        space_kind=space_kind, source_digest=sha256_file(tmp) + salt, frontend=fe, output_name="out",
        label_order=labels if kind == "labels" else None,
    )
    with BundleWriter(out) as w:
        w.add_file(tmp, "tiny.onnx", "device")
        if kind == "labels":
            w.add_text("\n".join(labels), "labels.txt", "device")
        w.commit({
            "name": f"tiny-{kind}",
            "licence": "test",
            "space": {"kind": space_kind, "id": space_id(space_kind, [("tiny", digest)])},
            "device": {
                "hop_s": hop_s,
                "experts": [{
                    "name": "tiny", "family": "test", "sample_rate": RATE, "window_s": WINDOW_S,
                    "frontend": fe, "file": "tiny.onnx", "precision": "fp32", "input_name": "audio",
                    "output_name": "out", "output_kind": "logits" if kind == "labels" else "embedding",
                    "dim": BANDS, "labels_file": "labels.txt" if kind == "labels" else None,
                }],
            },
        })
    tmp.unlink()
    return out


def band_query(bundle_manifest, k: int, text: str = "") -> QueryVectors:  # noqa: ANN001
    """Query vectors for band k, built the way the server would (sparse for labels, f16 for joint)."""
    labels = bundle_manifest.space.kind == "labels"
    if labels:
        vec = encode_sparse("tiny", np.array([k]), np.array([1.0]))
    else:
        v = np.zeros(BANDS, np.float32)
        v[k] = 1.0
        vec = encode_dense("tiny", v)
    msg = QueryMessage.model_validate({
        "schema": SCHEMA, "query_id": f"band{k}", "version": 1, "text": text or f"band {k}",
        "space_id": bundle_manifest.space.id, "vectors": [vec.model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5,
    })
    return query_from_message(msg, bundle_manifest)


def tone(k: int, seconds: float, rate: int = RATE, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A tone in the centre of band k with a little noise (float32, mono)."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * np.pi * band_hz(k) * t) + 0.003 * rng.standard_normal(t.size)).astype(np.float32)
