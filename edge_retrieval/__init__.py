"""edge-retrieval: natural-language audio retrieval on field devices.

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
    "PolicyOverlay",
    "QueryMessage",
    "QueryRejected",
    "SourceError",
    "StoreError",
    "TransportError",
    "__version__",
    "load_bundle",
    "slim_bundle",
]
