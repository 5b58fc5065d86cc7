"""Multiply-accumulates per window of every expert in a bundle, counted from its ONNX graph.

Why: emulated aarch64 times say nothing about a Pi, but the work per window does not depend on
the machine. Conv, ConvTranspose, Gemm and MatMul are counted with shapes from onnx shape
inference at batch 1; element-wise ops, pooling and the numpy front end are not (they are a few
percent of a CNN's work, and the front end's FFTs are timed by ``edge-retrieval bench``).
Needs the ``onnx`` package (export extra), so it runs on a workstation, not on the device::

    python -m edge_retrieval.benchmarks.macs BUNDLE [BUNDLE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import load_bundle
from edge_retrieval.errors import BundleError

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul")


@dataclass
class GraphMacs:
    """MACs of one ONNX graph at batch 1, by op type; nodes whose shapes stayed unknown are listed."""

    macs: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    params: int = 0
    unknown: list[str] = field(default_factory=list)


def _import_onnx():  # noqa: ANN202
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("counting MACs needs the onnx package: pip install 'edge-retrieval[export]' "
                          "(or pip install onnx)") from exc
    return onnx


def _fix_batch(model: Any, batch: int) -> None:
    """Give every symbolic input dimension the value ``batch`` so shape inference can resolve shapes."""
    init = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = batch


def count_graph(path: str | Path, batch: int = 1) -> GraphMacs:
    """Count MACs of the ONNX file at ``path`` for ``batch`` windows."""
    onnx = _import_onnx()

    model = onnx.load(str(path))
    _fix_batch(model, batch)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value for d in dims) if all(d.HasField("dim_value") for d in dims) else None
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    res = GraphMacs(params=int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer)))

    def shape(name: str) -> tuple[int, ...] | None:
        return shapes.get(name)

    for node in model.graph.node:
        op = node.op_type
        if op not in COUNTED:
            continue
        ins = list(node.input)
        out = shape(node.output[0])
        macs: int | None = None
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shape(ins[3] if op == "QLinearConv" else ins[1])
            if out is not None and w is not None:
                macs = int(np.prod(out, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        elif op == "ConvTranspose":
            x, w = shape(ins[0]), shape(ins[1])
            if x is not None and w is not None:
                macs = int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        elif op == "Gemm":
            a = shape(ins[0])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            if out is not None and a is not None:
                macs = int(np.prod(out, dtype=np.int64) * (a[0] if trans_a else a[-1]))
        else:  # MatMul family: out [..., M, N], K = last dim of A
            a = shape(ins[3] if op == "QLinearMatMul" else ins[0])
            if out is not None and a is not None:
                macs = int(np.prod(out, dtype=np.int64) * a[-1])
        if macs is None:
            res.unknown.append(f"{op} {node.name or node.output[0]}")
            continue
        res.macs += macs
        res.by_op[op] = res.by_op.get(op, 0) + macs
        res.nodes[op] = res.nodes.get(op, 0) + 1
    return res


def bundle_macs(root: str | Path) -> list[dict[str, Any]]:
    """One row per expert of the bundle's manifest: MACs per window and per second of audio."""
    bundle = load_bundle(root, part="device", verify=False)
    rows = []
    for spec in bundle.manifest.device.experts:
        g = count_graph(bundle.path(spec.file))
        rows.append({"bundle": bundle.manifest.name, "expert": spec.name, "file": spec.file,
                     "precision": spec.precision, "window_s": spec.window_s,
                     "macs_per_window": g.macs, "gmacs_per_window": round(g.macs / 1e9, 3),
                     "gmacs_per_audio_s_at_hop": round(g.macs / bundle.manifest.device.hop_s / 1e9, 3),
                     "params": g.params, "macs_by_op": dict(sorted(g.by_op.items())),
                     "nodes": g.nodes, "unknown_shape_nodes": g.unknown})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| bundle | expert | precision | window | MACs per window | by op | parameters | uncounted (unknown shape) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = ", ".join(f"{k} {v / 1e6:.1f} M ({r['nodes'][k]} nodes)" for k, v in r["macs_by_op"].items())
        lines.append(f"| {r['bundle']} | {r['expert']} | {r['precision']} | {r['window_s']} s | "
                     f"{r['macs_per_window'] / 1e9:.3f} G | {ops} | {r['params'] / 1e6:.2f} M | "
                     f"{len(r['unknown_shape_nodes'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_retrieval.benchmarks.macs", description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="+", type=Path, help="bundle directories")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    try:
        rows = [r for b in a.bundles for r in bundle_macs(b)]
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    for r in rows:
        if r["unknown_shape_nodes"]:
            print(f"note: {r['expert']}: {len(r['unknown_shape_nodes'])} node(s) with unknown shapes not counted: "
                  f"{', '.join(r['unknown_shape_nodes'][:5])}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
