"""The streaming pipeline: windows -> gate -> experts (front end + encoder) -> matcher -> detector.

``Pipeline`` (``core``) strings the parts together (and ``temporal`` turns the events of a temporal
query's parts into its own); the daemon, offline scoring and archive
embedding all run through it.
"""

from __future__ import annotations

from .core import STAGES, Pipeline, run_detector
from .detector import ActiveEvent, Transition
from .temporal import TemporalEvent

__all__ = ["STAGES", "ActiveEvent", "Pipeline", "TemporalEvent", "Transition", "run_detector"]
