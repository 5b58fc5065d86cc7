"""Sentence encoder at run time: tokenizers + onnxruntime, no torch.

The ONNX graph (written by ``edge_retrieval.export.text_encoder``) pools and L2-normalises, so
``encode`` returns unit float32 vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import BundleError, EncoderError

MAX_TOKENS = 256


class SentenceEncoder:
    """``encode(list[str]) -> [N, dim]`` unit float32 vectors."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, max_tokens: int = MAX_TOKENS,
                 threads: int = 1, batch: int = 64) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # a runtime dependency, but say which
            raise ImportError("tokenizers is not installed; pip install edge-retrieval") from exc
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise BundleError(f"cannot read tokenizer {str(tokenizer_path)!r}: {exc}") from exc
        self.tokenizer.enable_truncation(int(max_tokens))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        from ..pipeline.expert import OnnxEncoder

        self.encoder = OnnxEncoder(str(onnx_path), "input_ids", ["embedding"], threads=threads)
        inputs = {i.name for i in self.encoder.session.get_inputs()}
        if inputs != {"input_ids", "attention_mask"}:
            raise EncoderError(f"sentence encoder {str(onnx_path)!r} has inputs {sorted(inputs)}, "
                               "expected ['attention_mask', 'input_ids']")
        self.batch = max(1, int(batch))  # texts per onnxruntime call: bounds memory on long lists
        self.dim = int(self.encoder.session.get_outputs()[0].shape[-1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, dim] unit vectors (float32)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, got a single str")
        out = np.zeros((len(texts), self.dim), np.float32)
        for s in range(0, len(texts), self.batch):
            enc = self.tokenizer.encode_batch(list(texts[s : s + self.batch]))
            ids = np.asarray([e.ids for e in enc], np.int64)
            mask = np.asarray([e.attention_mask for e in enc], np.int64)
            try:
                res = self.encoder.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
            except Exception as exc:
                raise EncoderError(f"sentence encoder failed: {str(exc).splitlines()[0][:200]}") from exc
            out[s : s + len(enc)] = res
        return out
