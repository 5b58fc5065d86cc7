"""int8 under an accuracy budget: dynamic QInt8 per-channel, checked against fp32 on real inputs.

Never quantize blindly (BirdNET's early convolutions break under int8). The whole graph is
quantized first; if that misses the budget, each block (nodes grouped by module path) is
quantized alone to rank blocks by damage, and the worst blocks stay fp32 until the budget
holds. The ranking is cached per model sha256 because it is slow on a 50-100 MB model. If no
saving meets the budget, the report says so and the caller ships fp32.

Budgets:
- ``embedding``: min cosine to fp32 >= ``min_cosine`` AND every int8 vector's nearest fp32
  vector comes from the same input (random-weight models make all vectors look alike, so the
  cosine alone cannot fail).
- ``labels``: mean overlap of the top-``top_k`` label sets with fp32 >= ``min_topk_overlap``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_retrieval.bundle import sha256_file
from edge_retrieval.errors import ExportError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_OP_TYPES = ("MatMul", "Conv")
LEGACY_OP_TYPES = ("MatMul",)  # onnxruntime 1.16 has no ConvInteger kernel for int8 weights


@dataclass(frozen=True)
class Budget:
    """Accuracy an int8 model must keep against fp32 on the evaluation inputs."""

    metric: Literal["embedding", "labels"] = "embedding"
    min_cosine: float = 0.99
    require_nn_identity: bool = True
    min_topk_overlap: float = 4.75
    top_k: int = 5


@dataclass
class Evaluation:
    met: bool
    metrics: dict[str, float]
    damage: float  # 0 = identical to fp32; larger = worse (ranks blocks)


def default_cache_dir() -> Path:
    root = os.environ.get("EDGE_RETRIEVAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edge-retrieval")
    return Path(root) / "sensitivity"


# --------------------------------------------------------------------------- metrics


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Cosine of each ``got`` row to its own ``ref`` row, and how often that row is also the nearest."""
    r, g = _unit(ref), _unit(got)
    sim = g @ r.T  # [N, N]: row i = int8 vector i against every fp32 vector
    own = np.diag(sim)
    # a tie with a duplicate input counts as a match: own score is the best score
    nn_ok = own >= sim.max(axis=1) - 1e-12
    return {
        "min_cosine": float(own.min()),
        "mean_cosine": float(own.mean()),
        "nn_identity": float(nn_ok.mean()),
        "n": float(len(own)),
    }


def topk_metrics(ref: np.ndarray, got: np.ndarray, k: int = 5) -> dict[str, float]:
    r = np.asarray(ref).reshape(len(ref), -1)
    g = np.asarray(got).reshape(len(got), -1)
    k = min(k, r.shape[1])
    tr = np.argsort(-r, axis=1, kind="stable")[:, :k]
    tg = np.argsort(-g, axis=1, kind="stable")[:, :k]
    overlap = np.array([len(set(a) & set(b)) for a, b in zip(tr, tg, strict=True)], np.float64)
    return {"mean_topk_overlap": float(overlap.mean()), "min_topk_overlap": float(overlap.min()), "k": float(k), "n": float(len(overlap))}


def evaluate(ref: np.ndarray, got: np.ndarray, budget: Budget) -> Evaluation:
    if budget.metric == "embedding":
        m = embedding_metrics(ref, got)
        met = m["min_cosine"] >= budget.min_cosine and (not budget.require_nn_identity or m["nn_identity"] == 1.0)
        return Evaluation(met, m, (1.0 - m["min_cosine"]) + (1.0 - m["nn_identity"]))
    m = topk_metrics(ref, got, budget.top_k)
    return Evaluation(m["mean_topk_overlap"] >= budget.min_topk_overlap, m, m["k"] - m["mean_topk_overlap"])


# --------------------------------------------------------------------------- running models


def _session(path: str | Path, threads: int):  # noqa: ANN202
    import onnxruntime as ort

    from edge_retrieval.pipeline.expert import session_options

    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own Fail/InvalidProtobuf types
        raise ExportError(f"cannot load ONNX model {str(path)!r}: {str(exc).splitlines()[0][:200]}") from exc


def run_model(path: str | Path, inputs: np.ndarray, output_name: str, threads: int = 1, input_name: str | None = None) -> np.ndarray:
    """Run ``inputs`` (first axis = examples) through a model, in chunks its batch axis allows."""
    sess = _session(path, threads)
    inp = sess.get_inputs()[0] if input_name is None else next(i for i in sess.get_inputs() if i.name == input_name)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else 0
    step = fixed or 8
    outs = []
    for i in range(0, len(inputs), step):
        chunk = np.ascontiguousarray(inputs[i : i + step], dtype=np.float32)
        try:
            outs.append(sess.run([output_name], {inp.name: chunk})[0])
        except Exception as exc:
            raise ExportError(f"running {str(path)!r} failed: {str(exc).splitlines()[0][:200]}") from exc
    return np.concatenate(outs, axis=0)


def interleaved_latency(paths: Sequence[str | Path], x: np.ndarray, threads: int = 1, rounds: int = 10, warmup: int = 2) -> list[float]:
    """Median ms per run of each model, rounds interleaved so that outside load hits all alike."""
    sessions = [_session(p, threads) for p in paths]
    feeds = [{s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


# --------------------------------------------------------------------------- blocks


def _module_path(node: Any) -> str:
    """Module path of a node: dynamo name scopes, else the legacy/tf2onnx ``/a/b/Op`` name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
    parts = [p for p in node.name.strip("/").split("/") if p]
    return ".".join(parts[:-1]) if len(parts) > 1 else node.name


def block_key(path: str) -> str:
    """Group a module path by its last numbered level (``layers.0.blocks.1``), else its parent."""
    parts = [p for p in re.split(r"[./]", path) if p]
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    if numeric:
        return ".".join(parts[: numeric[-1] + 1])
    return ".".join(parts[:-1]) if len(parts) > 2 else ".".join(parts)


def quantizable_blocks(model_path: str | Path, op_types: Sequence[str], max_blocks: int = 24) -> dict[str, list[str]]:
    """Blocks (in graph order) -> names of the nodes dynamic quantization would touch."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    blocks: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if not node.name:
            continue  # quantize_dynamic addresses nodes by name
        blocks.setdefault(block_key(_module_path(node)), []).append(node.name)
    if len(blocks) <= max_blocks:
        return blocks
    keys = list(blocks)
    merged: dict[str, list[str]] = {}
    for chunk in np.array_split(np.arange(len(keys)), max_blocks):
        names = [keys[i] for i in chunk]
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        merged[label] = [n for k in names for n in blocks[k]]
    return merged


# --------------------------------------------------------------------------- quantizing


def strip_unused_opsets(path: str | Path) -> None:
    """Drop opset imports no node uses (old onnxruntime rejects e.g. ai.onnx.ml 5)."""
    import onnx

    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))


def strip_metadata(path: str | Path) -> None:
    """Drop per-node metadata (dynamo stack traces, name scopes): ~0.5 MB on the tiny CLAP, none of it needed to run."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def quantize(
    src: str | Path,
    dst: str | Path,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    nodes_to_quantize: Sequence[str] | None = None,
    nodes_to_exclude: Sequence[str] | None = None,
    strip_opsets: bool = False,
) -> None:
    """Dynamic QInt8, per-channel weights (QUInt8 gave little speed-up; static QDQ was less accurate)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ort_log = logging.getLogger("onnxruntime")
    prev = ort_log.level
    ort_log.setLevel(logging.ERROR)  # "please run pre-processing" hints on every call
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(op_types),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize else None,
            nodes_to_exclude=list(nodes_to_exclude) if nodes_to_exclude else None,
        )
    except Exception as exc:  # onnx / onnxruntime raise many types on a bad graph
        raise ExportError(f"quantizing {str(src)!r} failed: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        ort_log.setLevel(prev)
    if strip_opsets:
        strip_unused_opsets(dst)


def _progress(items: Sequence[Any], desc: str, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="block", file=sys.stderr, leave=False)


def _inputs_digest(inputs: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(inputs, np.float32).tobytes()).hexdigest()


@dataclass
class _Ctx:
    fp32: Path
    work: Path
    inputs: np.ndarray
    ref: np.ndarray
    output_name: str
    budget: Budget
    op_types: tuple[str, ...]
    strip: bool
    threads: int
    trials: list[dict[str, Any]] = field(default_factory=list)

    def trial(self, name: str, quantize_only: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> tuple[Path, Evaluation]:
        out = self.work / f"{name}.onnx"
        quantize(self.fp32, out, self.op_types, quantize_only, exclude, self.strip)
        ev = evaluate(self.ref, run_model(out, self.inputs, self.output_name, self.threads), self.budget)
        return out, ev


def sensitivity(
    ctx: _Ctx, blocks: dict[str, list[str]], cache_file: Path | None, settings: dict[str, Any], progress: bool
) -> dict[str, dict[str, Any]]:
    """Damage of quantizing each block alone, worst first; read from / written to the cache."""
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            if cached.get("settings") == settings and set(cached.get("blocks", {})) == set(blocks):
                log.info("sensitivity from cache %s", cache_file)
                return dict(cached["blocks"])
        except (OSError, ValueError):
            pass  # a broken cache entry is recomputed
    result: dict[str, dict[str, Any]] = {}
    for i, (name, nodes) in enumerate(_progress(list(blocks.items()), "int8 sensitivity", progress)):
        _, ev = ctx.trial(f"block{i}", quantize_only=nodes)
        result[name] = {"nodes": len(nodes), "damage": ev.damage, "metrics": ev.metrics}
    result = dict(sorted(result.items(), key=lambda kv: -kv[1]["damage"]))
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "settings": settings, "blocks": result}, indent=1), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError as exc:
            log.warning("cannot write sensitivity cache %s: %s", cache_file, exc)
    return result


def quantize_under_budget(
    fp32_path: str | Path,
    out_path: str | Path,
    inputs: np.ndarray,
    output_name: str,
    budget: Budget | None = None,
    *,
    legacy: bool = False,
    op_types: Sequence[str] | None = None,
    threads: int = 1,
    cache_dir: str | Path | None = None,
    max_blocks: int = 24,
    latency_rounds: int = 10,
    progress: bool = True,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the smallest-damage int8 model that meets ``budget`` to ``out_path`` and report.

    ``inputs`` are encoder inputs from real recordings (first axis = examples; at least 2 and
    distinct for the embedding budget). Returns the report; ``report["budget_met"]`` False means
    nothing was written and the caller ships fp32. ``legacy`` quantizes MatMul only and strips
    unused opset imports (onnxruntime < 1.17).
    """
    budget = budget or Budget()
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise ExportError(f"ONNX model {str(fp32_path)!r} does not exist")
    if len(inputs) < 2:
        raise ExportError(f"the int8 budget needs at least 2 evaluation inputs, got {len(inputs)}")
    ops = tuple(op_types or (LEGACY_OP_TYPES if legacy else DEFAULT_OP_TYPES))
    say = step or (lambda msg: None)
    model_sha = sha256_file(fp32_path)
    settings = {
        "version": CACHE_VERSION,
        "op_types": list(ops),
        "per_channel": True,
        "weight_type": "QInt8",
        "strip_opsets": legacy,
        "budget": asdict(budget),
        "inputs_sha256": _inputs_digest(inputs),
        "output": output_name,
    }
    cache_file = Path(cache_dir or default_cache_dir()) / f"{model_sha}.json"
    report: dict[str, Any] = {
        "method": f"onnxruntime quantize_dynamic QInt8 per-channel, ops {list(ops)}",
        "budget": asdict(budget),
        "eval_inputs": int(len(inputs)),
        "threads": int(threads),
        "fp32_sha256": model_sha,
        "size_fp32_bytes": fp32_path.stat().st_size,
    }
    with tempfile.TemporaryDirectory(prefix="er-quant-") as work_dir:
        work = Path(work_dir)
        say(f"int8: fp32 reference on {len(inputs)} inputs")
        ref = run_model(fp32_path, inputs, output_name, threads)
        ctx = _Ctx(fp32_path, work, inputs, ref, output_name, budget, ops, legacy, threads)
        blocks = quantizable_blocks(fp32_path, ops, max_blocks)
        n_nodes = sum(len(v) for v in blocks.values())
        report["quantizable_nodes"] = n_nodes
        report["blocks"] = len(blocks)
        if not blocks:
            report.update(budget_met=False, shipped="fp32", reason=f"no {list(ops)} node with constant weights to quantize")
            return report
        say(f"int8: whole graph ({n_nodes} nodes in {len(blocks)} blocks)")
        chosen, ev = ctx.trial("all")
        kept: list[str] = []
        searched = False
        if not ev.met:
            searched = True
            say(f"int8: whole graph misses the budget ({_fmt(ev.metrics)}); ranking blocks by damage")
            ranking = sensitivity(ctx, blocks, cache_file, settings, progress)
            report["sensitivity"] = {k: {"nodes": v["nodes"], "damage": round(v["damage"], 8)} for k, v in ranking.items()}
            report["sensitivity_cache"] = str(cache_file)
            order = list(ranking)
            met = False
            for k in _progress(list(range(1, len(order))), "int8 search", progress):
                excluded = order[:k]
                cand, cev = ctx.trial(f"excl{k}", exclude=[n for b in excluded for n in blocks[b]])
                if cev.met:
                    chosen, ev, kept, met = cand, cev, excluded, True
                    break
            if not met:
                report.update(
                    budget_met=False,
                    shipped="fp32",
                    achieved=ev.metrics,
                    reason="no int8 variant (whole graph, or with the most sensitive blocks kept fp32) meets the budget",
                )
                say("int8: no saving meets the budget; shipping fp32")
                return report
        say("int8: interleaved latency fp32 vs int8")
        x = np.ascontiguousarray(inputs[:1], np.float32)
        lat = interleaved_latency([fp32_path, chosen], x, threads, latency_rounds)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen, out_path)
    size_q = Path(out_path).stat().st_size
    report.update(
        budget_met=True,
        shipped="int8" if not kept else "mixed",
        achieved=ev.metrics,
        size_int8_bytes=size_q,
        size_ratio=round(size_q / report["size_fp32_bytes"], 4),
        latency_ms_fp32=round(lat[0], 3),
        latency_ms_int8=round(lat[1], 3),
        latency_ratio=round(lat[1] / lat[0], 4) if lat[0] > 0 else None,
        latency_note=f"median of {latency_rounds} interleaved runs, batch 1, {threads} thread(s), this host",
        blocks_fp32=kept,
        nodes_fp32=sum(len(blocks[b]) for b in kept),
        sensitivity_searched=searched,
    )
    return report


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in metrics.items() if k != "n")
