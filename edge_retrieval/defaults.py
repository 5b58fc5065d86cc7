"""Default thresholds and policy for local runs, per bundle space.

Order for a query's threshold: the query's own (``--threshold``, queries file) > the device
config's ``detection.threshold`` > the tuned defaults in ``data/default_policy.json`` for this
space id (per query text, then the space's default; chosen on the dev half of the fixture by
``scripts/tune_defaults.py``) > the bundle's ``notes.default_threshold`` > a built-in value per
space kind. The tuned policy sits just above the built-in policy (below config and query).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from .bundle import Bundle
from .errors import ConfigError
from .policy import PolicyOverlay

log = logging.getLogger(__name__)

TUNED_FILE = "data/default_policy.json"
BUILTIN_THRESHOLD = {"labels": 0.3, "joint": 0.3, "ensemble": 0.3}


@lru_cache(maxsize=1)
def tuned_table() -> dict[str, Any]:
    """The ``spaces`` table of the shipped ``data/default_policy.json`` (read once)."""
    return read_tuned(resources.files("edge_retrieval").joinpath(TUNED_FILE))


def read_tuned(res: Traversable) -> dict[str, Any]:
    """The ``spaces`` table of a tuned-defaults file (space id -> thresholds and policy).

    Missing (an install without package data): a WARNING and no tuned values. Unreadable or
    malformed: a ConfigError naming the file, not a silent fall back to the built-in values.
    """
    try:
        text = res.read_text("utf-8")
    except FileNotFoundError:
        log.warning("%s is missing: thresholds and policies fall back to the built-in values", res)
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tuned defaults {str(res)!r} cannot be read ({exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"tuned defaults {str(res)!r} are not valid JSON ({exc})") from exc
    spaces = data.get("spaces") if isinstance(data, dict) else None
    if not isinstance(spaces, dict) or not all(isinstance(v, dict) for v in spaces.values()):
        raise ConfigError(f"tuned defaults {str(res)!r}: expected an object with a 'spaces' object of objects")
    return spaces


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


def feedback_floor(space_id: str, builtin: float) -> float:
    """The least cosine to a feedback negative that suppresses a window (pipeline/feedback.py):
    the space's ``feedback_floor`` (chosen on the dev half by scripts/feedback_cv.py), else ``builtin``."""
    v = tuned_table().get(space_id, {}).get("feedback_floor", builtin)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < float(v) <= 1.0:
        raise ConfigError(f"tuned defaults {TUNED_FILE}: space {space_id[:12]}... feedback_floor {v!r} "
                          "is not a number in (0, 1]")
    return float(v)


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
