"""One exception tree for the whole project.

    EdgeRetrievalError            base: the CLI prints str(exc) on one line and exits non-zero
    ├── BundleError               a model bundle is missing, corrupt or inconsistent
    ├── ExportError               the workstation export stage cannot build a bundle
    ├── ConfigError               a config file or CLI value is wrong (names key and expected form)
    ├── SourceError               audio cannot be read, decoded or captured
    ├── EncoderError              onnxruntime failed to load or run a model
    ├── QueryRejected             a query (text, vector or message) is unusable on this device
    ├── TransportError            MQTT/broker/TLS failures a caller must see
    └── StoreError                SQLite outbox / detection store failures

Third-party failures (onnxruntime, PortAudio, paho, SQLite) are translated at the boundary
with ``raise XError(...) from exc``.
"""

from __future__ import annotations


class EdgeRetrievalError(Exception):
    """Base of every error this project raises on purpose."""


class BundleError(EdgeRetrievalError):
    """A model bundle is missing, corrupt, or does not fit the request."""


class ExportError(EdgeRetrievalError):
    """The export stage cannot produce a bundle."""


class ConfigError(EdgeRetrievalError):
    """A configuration value is wrong; the message names the key and the expected form."""


class SourceError(EdgeRetrievalError):
    """Audio cannot be opened, decoded or captured."""


class EncoderError(EdgeRetrievalError):
    """onnxruntime could not load or run an encoder."""


class QueryRejected(EdgeRetrievalError):
    """A query is unusable here: empty text, wrong space id, bad vector, old version..."""


class TransportError(EdgeRetrievalError):
    """A transport (MQTT) failure that the caller must handle."""


class StoreError(EdgeRetrievalError):
    """A persistent store (outbox, detections) failed."""


def missing_extra(extra: str, module: str) -> ImportError:
    """ImportError that tells the user which extra to install."""
    return ImportError(
        f"{module!r} is not installed; install it with: pip install 'edge-retrieval[{extra}]'"
    )
