"""Detection policy: when a stream of scores becomes an event (docs/architecture.md).

Precedence: the query's own policy (from the alert) > the device config's defaults > built-in
defaults; CLI flags override the config in local runs only. ``resolve`` merges field by field:
a field a layer leaves unset (None) falls through to the next layer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PolicyOverlay(BaseModel):
    """A partial policy: every field optional, so layers can be merged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_hits: int | None = Field(default=None, ge=1, le=100)  # N of M windows over threshold
    of_windows: int | None = Field(default=None, ge=1, le=100)
    hysteresis: float | None = Field(default=None, ge=0, le=1)  # stay on until score < thr - hysteresis
    cooldown_s: float | None = Field(default=None, ge=0, le=86400)  # quiet time after an event ends
    max_event_s: float | None = Field(default=None, gt=0, le=86400)  # split very long events
    adapt: bool | None = None  # score against the running background quantile
    adapt_quantile: float | None = Field(default=None, gt=0, lt=1)
    adapt_windows: int | None = Field(default=None, ge=4, le=100000)  # history length (windows)
    adapt_margin: float | None = Field(default=None, ge=0, le=1)  # score must exceed baseline by this

    @model_validator(mode="after")
    def _n_of_m(self) -> PolicyOverlay:
        if self.min_hits is not None and self.of_windows is not None and self.min_hits > self.of_windows:
            raise ValueError(f"min_hits ({self.min_hits}) must be <= of_windows ({self.of_windows})")
        return self


class DetectionPolicy(BaseModel):
    """A complete policy, as the detector uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_hits: int = Field(default=1, ge=1, le=100)
    of_windows: int = Field(default=1, ge=1, le=100)
    hysteresis: float = Field(default=0.05, ge=0, le=1)
    cooldown_s: float = Field(default=5.0, ge=0)
    max_event_s: float = Field(default=300.0, gt=0)
    adapt: bool = True
    adapt_quantile: float = Field(default=0.95, gt=0, lt=1)
    adapt_windows: int = Field(default=200, ge=4)
    adapt_margin: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _n_of_m(self) -> DetectionPolicy:
        if self.min_hits > self.of_windows:
            raise ValueError(f"min_hits ({self.min_hits}) must be <= of_windows ({self.of_windows})")
        return self


BUILTIN = DetectionPolicy()


def resolve(*layers: PolicyOverlay | dict[str, Any] | None, base: DetectionPolicy = BUILTIN) -> DetectionPolicy:
    """Merge overlays, highest precedence first, over ``base``."""
    merged: dict[str, Any] = base.model_dump()
    for layer in reversed(layers):
        if layer is None:
            continue
        ov = layer if isinstance(layer, PolicyOverlay) else PolicyOverlay.model_validate(layer)
        merged.update({k: v for k, v in ov.model_dump().items() if v is not None})
    return DetectionPolicy.model_validate(merged)
