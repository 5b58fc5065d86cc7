"""aisfx 0.1.2 (sound-effects CNN, CC BY 4.0) -> ONNX expert for the mixture of experts.

Only the embedding network goes to ONNX (input ``MEL`` [B, 100, 96] in (time, mel) order, output
``EMBEDDING`` [B, 512]); its classifier heads have no class names and are dropped. The log-mel
runs in numpy on the device (``edge_retrieval.frontends.aisfx``). Parity against torch is
checked on every export (max abs difference must stay below ``PARITY_TOL``).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import BundleWriter, FrontendSpec, expert_space_digest, sha256_file
from edge_retrieval.errors import ExportError
from edge_retrieval.frontends.aisfx import AisfxParams

log = logging.getLogger(__name__)

EXPERT = "aisfx"
INPUT_NAME = "MEL"
OUTPUT_NAME = "EMBEDDING"
EMBEDDING_DIM = 512
ONNX_FILE = "aisfx/embedding_fp32.onnx"
LICENCE = "CC-BY-4.0"
LICENCE_NOTE = "aisfx 0.1.2 model weights (Tamir Ofek et al., ISMIR 2022), CC BY 4.0."
PARITY_TOL = 1e-5


def checkpoint_path() -> Path:
    """The checkpoint that the aisfx pip package ships (no import of its librosa code)."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("aisfx is not installed (it ships the model): pip install --no-deps aisfx==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "checkpoint.pth"
    if not path.is_file():
        raise ExportError(f"aisfx checkpoint {str(path)!r} is missing; reinstall aisfx")
    return path


def load_embedding_net():  # noqa: ANN201
    """aisfx's EmbeddingNet with the packaged weights, in eval mode (torch)."""
    import torch
    from aisfx.models.cnn2d import EmbeddingNet

    state, _ = torch.load(checkpoint_path(), map_location="cpu", weights_only=False)
    net = EmbeddingNet("max", 3, 1, 64)
    prefix = "embedding_net."
    net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    net.eval()
    return net


def export_onnx(out: Path, params: AisfxParams | None = None, opset: int = 17) -> dict[str, Any]:
    """Write the embedding net to ``out`` and return the parity report vs torch."""
    import torch

    p = params or AisfxParams()
    net = load_embedding_net()
    dummy = torch.zeros(1, p.frames, p.n_mels)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            net, (dummy,), str(out), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    except Exception as exc:  # torch raises many types here
        raise ExportError(f"aisfx ONNX export failed: {exc}") from exc
    return parity(net, out, p)


def parity(net: Any, onnx_path: Path, params: AisfxParams, n: int = 4, seed: int = 0) -> dict[str, Any]:
    """Max abs difference torch vs onnxruntime on front-end outputs of noise and tones."""
    import onnxruntime as ort
    import torch

    from edge_retrieval.frontends.aisfx import AisfxLogMel

    rng = np.random.default_rng(seed)
    t = np.arange(params.window_samples) / params.sample_rate
    wav = np.stack([
        0.1 * rng.standard_normal(params.window_samples),
        np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size),
        np.sin(2 * np.pi * (200 + 2000 * t) * t),
        rng.standard_normal(params.window_samples) * np.exp(-3 * t),
    ][:n]).astype(np.float32)
    feats = AisfxLogMel(params)(wav)
    with torch.no_grad():
        ref = net(torch.from_numpy(feats)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: feats})[0]
    diff = float(np.max(np.abs(ref - got)))
    report = {"reference": "torch 2 (aisfx EmbeddingNet)", "max_abs_diff": diff, "windows": int(len(wav)),
              "tolerance": PARITY_TOL}
    if not diff < PARITY_TOL:
        raise ExportError(f"aisfx ONNX parity failed: max abs difference {diff:.3g} >= {PARITY_TOL}")
    return report


def frontend_spec(params: AisfxParams | None = None) -> FrontendSpec:
    return FrontendSpec(kind="aisfx_logmel", params=(params or AisfxParams()).to_dict())


def expert_spec(file: str = ONNX_FILE, params: AisfxParams | None = None, projection_file: str | None = None,
                dim: int = EMBEDDING_DIM, parity_report: dict[str, Any] | None = None, name: str = EXPERT) -> dict[str, Any]:
    """ExpertSpec fields for an aisfx expert (``dim`` is the projected size when a projection is set)."""
    p = params or AisfxParams()
    return {
        "name": name, "family": "aisfx", "sample_rate": p.sample_rate,
        "window_s": p.window_samples / p.sample_rate, "frontend": frontend_spec(p).model_dump(), "file": file,
        "precision": "fp32", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "output_kind": "embedding",
        "dim": dim, "projection_file": projection_file, "parity": parity_report,
    }


def space_digest(params: AisfxParams | None = None, projection_digest: str | None = None) -> str:
    """This expert's part of the space id: checkpoint, front end, output, projection."""
    return expert_space_digest(space_kind="ensemble", source_digest=sha256_file(checkpoint_path()),
                               frontend=frontend_spec(params), output_name=OUTPUT_NAME,
                               projection_digest=projection_digest)


def add_expert(w: BundleWriter, params: AisfxParams | None = None, projection_file: str | None = None,
               dim: int = EMBEDDING_DIM, projection_digest: str | None = None) -> tuple[dict[str, Any], str]:
    """Export aisfx into a bundle being written; returns (ExpertSpec dict, expert space digest)."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "aisfx.onnx"
        report = export_onnx(onnx_path, params)
        w.add_file(onnx_path, ONNX_FILE, part="device")
    return (expert_spec(ONNX_FILE, params, projection_file, dim, report),
            space_digest(params, projection_digest))
