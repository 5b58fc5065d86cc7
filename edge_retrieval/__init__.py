"""edge-retrieval: natural-language audio retrieval on field devices.

Embed the detector in a program: ``Pipeline(bundle, queries, policy).feed(samples)`` returns
the transitions (onset, final update) of the events the samples complete; see docs/architecture.md.

The runtime (this package) needs numpy and onnxruntime only; the export stage lives in
``edge_retrieval.export`` and is the only part that may import torch.
"""

from __future__ import annotations

from .bundle import Bundle, BundleWriter, Manifest, load_bundle, slim_bundle
from .errors import (
    BundleError,
    ConfigError,
    EdgeRetrievalError,
    EncoderError,
    ExportError,
    QueryRejected,
    SourceError,
    StoreError,
    TransportError,
)
from .pipeline import Pipeline, Transition
from .policy import DetectionPolicy, PolicyOverlay
from .protocol import Event, QueryMessage

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "BundleError",
    "BundleWriter",
    "ConfigError",
    "DetectionPolicy",
    "EdgeRetrievalError",
    "EncoderError",
    "Event",
    "ExportError",
    "Manifest",
    "Pipeline",
    "PolicyOverlay",
    "QueryMessage",
    "QueryRejected",
    "SourceError",
    "StoreError",
    "Transition",
    "TransportError",
    "__version__",
    "load_bundle",
    "slim_bundle",
]
