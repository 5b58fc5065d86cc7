"""Front ends: pure functions ``windows [B, samples] float32 -> encoder input``, by registry key.

A manifest's ``frontend.kind`` names the key; ``frontend.params`` are parsed by the front end's
frozen dataclass. A new model family registers here and never edits the daemon.
Modules that register front ends are imported lazily by ``make_frontend``.
A front end whose constants live in a bundle file registers with ``needs_root=True``; its
factory is then called as ``factory(params, root)`` with the bundle root (or None).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError


class Frontend(Protocol):
    def __call__(self, windows: np.ndarray) -> np.ndarray:  # [B, samples] float32 -> model input
        ...


_REGISTRY: dict[str, Callable[[dict[str, Any]], Frontend]] = {}
_NEEDS_ROOT: set[str] = set()  # kinds whose factory takes (params, root)
# key -> module that registers it (imported on first use)
_MODULES: dict[str, str] = {
    "in-graph": "edge_retrieval.frontends",
    "birdnet": "edge_retrieval.frontends.birdnet",
    "clap_logmel": "edge_retrieval.frontends.clap",
    "aisfx_logmel": "edge_retrieval.frontends.aisfx",
    "yamnet_logmel": "edge_retrieval.frontends.yamnet",
}


def register_frontend(
    kind: str, needs_root: bool = False
) -> Callable[[Callable[..., Frontend]], Callable[..., Frontend]]:
    def deco(factory: Callable[..., Frontend]) -> Callable[..., Frontend]:
        _REGISTRY[kind] = factory
        if needs_root:
            _NEEDS_ROOT.add(kind)
        return factory

    return deco


def make_frontend(kind: str, params: dict[str, Any], root: str | Path | None = None) -> Frontend:
    """Build a front end; ``root`` (the bundle directory) resolves files its params name."""
    if kind not in _REGISTRY and kind in _MODULES:
        importlib.import_module(_MODULES[kind])
    if kind not in _REGISTRY:
        raise BundleError(f"unknown front end {kind!r}; known: {sorted(set(_REGISTRY) | set(_MODULES))}")
    try:
        if kind in _NEEDS_ROOT:
            return _REGISTRY[kind](params, None if root is None else Path(root))
        return _REGISTRY[kind](params)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"front end {kind!r}: bad parameters {params!r} ({exc})") from exc


def load_constants(constants: str | Path, root: Path | None, family: str) -> dict[str, np.ndarray]:
    """A front end's constants file (``.npz`` of float32 arrays), relative to the bundle root."""
    path = Path(constants)
    if not path.is_absolute():
        if root is None:
            raise ValueError(f"constants file {str(constants)!r} is relative and no bundle root was given")
        path = Path(root) / path
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(np.float32) for k in z.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {family} front-end constants {str(path)!r}: {exc}") from exc


@register_frontend("in-graph")
def _in_graph(params: dict[str, Any]) -> Frontend:
    """The ONNX graph takes raw audio: pass windows through as float32."""
    if params:
        raise ValueError(f"'in-graph' takes no parameters, got {sorted(params)}")
    return lambda windows: np.ascontiguousarray(windows, dtype=np.float32)
