"""Front ends: pure functions ``windows [B, samples] float32 -> encoder input``, by registry key.

A manifest's ``frontend.kind`` names the key; ``frontend.params`` are parsed by the front end's
frozen dataclass. A new model family registers here and never edits the daemon.
Modules that register front ends are imported lazily by ``make_frontend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError


class Frontend(Protocol):
    def __call__(self, windows: np.ndarray) -> np.ndarray:  # [B, samples] float32 -> model input
        ...


_REGISTRY: dict[str, Callable[[dict[str, Any]], Frontend]] = {}
# key -> module that registers it (imported on first use)
_MODULES: dict[str, str] = {
    "in-graph": "edge_retrieval.frontends",
    "birdnet": "edge_retrieval.frontends.birdnet",
    "clap_logmel": "edge_retrieval.frontends.clap",
    "aisfx_logmel": "edge_retrieval.frontends.aisfx",
}


def register_frontend(kind: str) -> Callable[[Callable[[dict[str, Any]], Frontend]], Callable[[dict[str, Any]], Frontend]]:
    def deco(factory: Callable[[dict[str, Any]], Frontend]) -> Callable[[dict[str, Any]], Frontend]:
        _REGISTRY[kind] = factory
        return factory

    return deco


def make_frontend(kind: str, params: dict[str, Any]) -> Frontend:
    if kind not in _REGISTRY and kind in _MODULES:
        importlib.import_module(_MODULES[kind])
    if kind not in _REGISTRY:
        raise BundleError(f"unknown front end {kind!r}; known: {sorted(set(_REGISTRY) | set(_MODULES))}")
    try:
        return _REGISTRY[kind](params)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"front end {kind!r}: bad parameters {params!r} ({exc})") from exc


@register_frontend("in-graph")
def _in_graph(params: dict[str, Any]) -> Frontend:
    """The ONNX graph takes raw audio: pass windows through as float32."""
    if params:
        raise ValueError(f"'in-graph' takes no parameters, got {sorted(params)}")
    return lambda windows: np.ascontiguousarray(windows, dtype=np.float32)
