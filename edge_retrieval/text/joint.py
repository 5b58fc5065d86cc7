"""Text side "joint" (CLAP family): tokenizer.json + ONNX text tower -> unit vector (f16 on the wire).

The server needs only ``tokenizers`` and onnxruntime. A joint space has no labels, so the
resolution's ``top`` is empty and ``fit`` is 1.0; empty text is refused by ``QueryBuilder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Bundle, TextSpec
from ..errors import BundleError, EncoderError
from ..protocol import encode_dense
from . import Resolution, TextSide, register_text_side


@dataclass(frozen=True)
class JointTextParams:
    """Manifest ``server.text[].params`` of a joint text side (paths relative to the bundle)."""

    model: str
    tokenizer: str
    dim: int
    max_length: int = 512
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    output: str = "text_embeds"


class JointTextSide(TextSide):
    """Tokenize, run the text tower, L2-normalise: the query vector is a point in the joint space."""

    def __init__(self, bundle: Bundle, spec: TextSpec, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        from ..pipeline.expert import OnnxEncoder

        try:
            self.params = JointTextParams(**spec.params)
        except TypeError as exc:
            raise BundleError(f"text side 'joint' of expert {spec.expert!r}: bad params {spec.params!r} ({exc})") from exc
        self.expert = spec.expert
        tok_path = bundle.path(self.params.tokenizer)
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"tokenizer {str(tok_path)!r} cannot be loaded: {str(exc)[:160]}") from exc
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.params.max_length)
        self.encoder = OnnxEncoder(
            str(bundle.path(self.params.model)), self.params.input_ids, [self.params.output], threads
        )
        if self.params.attention_mask not in {i.name for i in self.encoder.session.get_inputs()}:
            raise BundleError(f"text model {self.params.model!r} has no input {self.params.attention_mask!r}")

    def embed(self, text: str) -> np.ndarray:
        """One text -> unit float32 vector ``[dim]``."""
        ids = np.asarray([self.tokenizer.encode(text).ids], np.int64)
        feeds = {self.params.input_ids: ids, self.params.attention_mask: np.ones_like(ids)}
        try:
            out = self.encoder.session.run([self.params.output], feeds)[0][0]
        except Exception as exc:
            raise EncoderError(f"text tower failed on {text[:40]!r}: {str(exc).splitlines()[0][:160]}") from exc
        v = np.asarray(out, np.float32).ravel()
        if v.size != self.params.dim:
            raise BundleError(f"text model gives {v.size} values, manifest says dim {self.params.dim}")
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def resolve(self, text: str) -> Resolution:
        v = self.embed(text)
        extra: dict[str, Any] = {"tokens": len(self.tokenizer.encode(text).ids)}
        return Resolution(expert=self.expert, vector=encode_dense(self.expert, v, "f16"), top=[], fit=1.0, extra=extra)


@register_text_side("joint")
def _make(bundle: Bundle, spec: TextSpec) -> TextSide:
    return JointTextSide(bundle, spec)
