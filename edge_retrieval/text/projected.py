"""Text side ``projected``: the server half of a trained mixture of audio experts (numpy only).

MiniLM embeds the text once; each embedding expert gets ``unit(t @ W_t + b_t)``, and a gate
``softmax([t, label_fit, caption_fit] @ G + g)`` weighs the experts by how well the text matches
the label texts (the label bridge) versus the training captions. The gate lands in
``Resolution.extra["gate"]``, which ``QueryBuilder.expert_weights`` turns into the query weights.
The label-bridge expert of the mixture is wrapped by the same kind (params ``bridge``), so every
expert of the bundle reports its gate.

TextSpec.params (paths relative to the bundle root):
  file:       npz with ``experts`` (gate order), ``text_W_<e>``, ``text_b_<e>``, ``gate_W``, ``gate_b``
              (absent = equal weights), ``captions`` [N, 384] float16 unit caption embeddings
  encoder, tokenizer: the MiniLM ONNX graph and tokenizer.json
  bridge:     for the label-bridge expert only: the wrapped ``label_bridge`` TextSpec params
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..bundle import Bundle, TextSpec
from ..errors import BundleError
from ..protocol import VectorPayload
from . import Resolution, TextSide, make_text_side, register_text_side

BRIDGE = "bridge"  # gate name of the label-bridge expert
_CACHE_TEXTS = 256  # texts whose embedding + gate are kept (a query resolves all experts in a row)


class MoeeText:
    """Shared by all experts of one bundle: MiniLM once per text, gate over every expert."""

    def __init__(self, bundle: Bundle, params: dict[str, Any]) -> None:
        from .sentence import SentenceEncoder

        for key in ("file", "encoder", "tokenizer"):
            if key not in params:
                raise BundleError(f"projected text side: params need {key!r}, got {sorted(params)}")
        path = bundle.path(params["file"])
        try:
            with np.load(path) as z:
                self.experts = [str(e) for e in z["experts"]]
                self.text = {e: (z[f"text_W_{e}"].astype(np.float32), z[f"text_b_{e}"].astype(np.float32))
                             for e in self.experts if e != BRIDGE}
                self.gate = (z["gate_W"].astype(np.float32), z["gate_b"].astype(np.float32)) if "gate_W" in z else None
                self.captions = z["captions"].astype(np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"projected text side: cannot read {str(path)!r} ({exc})") from exc
        if self.gate is not None and self.gate[0].shape[1] != len(self.experts):
            raise BundleError(f"{str(path)!r}: gate has {self.gate[0].shape[1]} outputs for experts {self.experts}")
        self.encoder = SentenceEncoder(bundle.path(params["encoder"]), bundle.path(params["tokenizer"]))
        self.bridge_side: TextSide | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray, Resolution | None]] = OrderedDict()

    def attach_bridge(self, side: TextSide) -> None:
        self.bridge_side = side

    def analyse(self, text: str) -> tuple[np.ndarray, np.ndarray, Resolution | None]:
        """(unit text embedding [384], gate weights [E], the bridge's resolution or None)."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        t = self.encoder.encode([text])[0]
        bridge_res = self.bridge_side.resolve(text) if self.bridge_side is not None else None
        label_fit = float(bridge_res.fit) if bridge_res is not None else 0.0
        caption_fit = float(np.max(self.captions @ t)) if len(self.captions) else 0.0
        gates = gate_weights(self.gate, t, label_fit, caption_fit, len(self.experts))
        out = (t, gates, bridge_res)
        with self._lock:
            self._cache[text] = out
            while len(self._cache) > _CACHE_TEXTS:
                self._cache.popitem(last=False)
        return out

    def fits(self, text: str) -> tuple[float, float]:
        t, _, res = self.analyse(text)
        return (float(res.fit) if res is not None else 0.0, float(np.max(self.captions @ t)) if len(self.captions) else 0.0)


def gate_weights(gate: tuple[np.ndarray, np.ndarray] | None, t: np.ndarray, label_fit: float, caption_fit: float,
                 n: int) -> np.ndarray:
    """softmax([t, label_fit, caption_fit] @ G + g), or equal weights without a gate."""
    if gate is None:
        return np.full(n, 1.0 / n, np.float32)
    z = np.concatenate([t, [label_fit, caption_fit]]).astype(np.float32) @ gate[0] + gate[1]
    z = np.exp(z - z.max())
    return (z / z.sum()).astype(np.float32)


_SHARED: dict[tuple[str, str, str], MoeeText] = {}
_SHARED_LOCK = threading.Lock()


def _shared(bundle: Bundle, params: dict[str, Any]) -> MoeeText:
    key = (str(bundle.root), bundle.manifest.space.id, str(params.get("file")))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = MoeeText(bundle, {k: v for k, v in params.items() if k != "bridge"})
        return _SHARED[key]


class ProjectedSide(TextSide):
    """One embedding expert: unit(t @ W_t + b_t) as an f32 vector, with its gate weight."""

    def __init__(self, bundle: Bundle, spec: TextSpec) -> None:
        self.expert = spec.expert
        self.moee = _shared(bundle, spec.params)
        if self.expert not in self.moee.text:
            raise BundleError(f"projected text side: {spec.params['file']!r} has no text projection for {self.expert!r}")
        self.index = self.moee.experts.index(self.expert)
        self.dim = bundle.manifest.expert(self.expert).dim
        if self.moee.text[self.expert][0].shape[1] != self.dim:
            raise BundleError(f"projected text side: {self.expert!r} projects to "
                              f"{self.moee.text[self.expert][0].shape[1]} dims, the expert has {self.dim}")

    def resolve(self, text: str) -> Resolution:
        t, gates, _ = self.moee.analyse(text)
        w, b = self.moee.text[self.expert]
        v = t @ w + b
        v = (v / max(float(np.linalg.norm(v)), 1e-12)).astype("<f4")
        label_fit, caption_fit = self.moee.fits(text)
        return Resolution(
            expert=self.expert,
            vector=VectorPayload(expert=self.expert, encoding="f32", data=base64.b64encode(v.tobytes()).decode(), dim=self.dim),
            top=[],
            fit=caption_fit,
            extra={"gate": float(gates[self.index]), "label_fit": label_fit, "caption_fit": caption_fit},
        )


class BridgeSide(TextSide):
    """The label-bridge expert inside a mixture: the label_bridge's vector, with the mixture's gate."""

    def __init__(self, bundle: Bundle, spec: TextSpec) -> None:
        self.expert = spec.expert
        self.moee = _shared(bundle, spec.params)
        if BRIDGE not in self.moee.experts:
            raise BundleError(f"projected text side: {spec.params['file']!r} has no {BRIDGE!r} gate entry")
        self.index = self.moee.experts.index(BRIDGE)
        self.inner = make_text_side(bundle, TextSpec(expert=spec.expert, kind="label_bridge", params=spec.params["bridge"]))
        self.moee.attach_bridge(self.inner)

    def resolve(self, text: str) -> Resolution:
        _, gates, res = self.moee.analyse(text)
        assert res is not None
        return Resolution(expert=res.expert, vector=res.vector, top=res.top, fit=res.fit, warning=res.warning,
                          extra={**res.extra, "gate": float(gates[self.index])}, fits=res.fits)


@register_text_side("projected")
def _projected(bundle: Bundle, spec: TextSpec) -> TextSide:
    if spec.params.get("bridge") is not None:
        return BridgeSide(bundle, spec)
    return ProjectedSide(bundle, spec)

