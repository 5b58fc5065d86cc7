"""Default thresholds and policy for local runs, per bundle space.

Order for a query's threshold: the query's own (``--threshold``, queries file) > the device
config's ``detection.threshold`` > the tuned defaults in ``data/default_policy.json`` for this
space id (per query text, then the space's default; chosen on the dev half of the fixture by
``scripts/tune_defaults.py``) > the bundle's ``notes.default_threshold`` > a built-in value per
space kind. The tuned policy sits just above the built-in policy (below config and query).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from .bundle import Bundle
from .policy import PolicyOverlay

BUILTIN_THRESHOLD = {"labels": 0.3, "joint": 0.3, "ensemble": 0.3}


@lru_cache(maxsize=1)
def tuned_table() -> dict[str, Any]:
    try:
        text = resources.files("edge_retrieval").joinpath("data/default_policy.json").read_text("utf-8")
    except (FileNotFoundError, OSError):
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data.get("spaces", {}) if isinstance(data, dict) else {}


def tuned_for(bundle: Bundle) -> dict[str, Any]:
    return tuned_table().get(bundle.manifest.space.id, {})


def default_threshold(bundle: Bundle, text: str, config_threshold: float | None = None) -> float:
    if config_threshold is not None:
        return float(config_threshold)
    tuned = tuned_for(bundle)
    per_query = tuned.get("thresholds", {})
    key = " ".join(text.lower().split())
    if key in per_query:
        return float(per_query[key])
    if "default_threshold" in tuned:
        return float(tuned["default_threshold"])
    note = bundle.manifest.notes.get("default_threshold")
    if isinstance(note, int | float):
        return float(note)
    return BUILTIN_THRESHOLD.get(bundle.manifest.space.kind, 0.3)


def default_policy(bundle: Bundle) -> PolicyOverlay | None:
    pol = tuned_for(bundle).get("policy")
    return PolicyOverlay.model_validate(pol) if pol else None


def merge_overlays(*layers: PolicyOverlay | None) -> PolicyOverlay | None:
    """Merge overlays, highest precedence first (a field left None falls through)."""
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        if layer is not None:
            merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return PolicyOverlay.model_validate(merged) if merged else None
