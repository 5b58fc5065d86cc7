"""The streaming pipeline: windows -> gate -> experts (front end + encoder) -> matcher -> detector.

``Pipeline`` (``core``) strings the parts together; the daemon, offline scoring and archive
embedding all run through it.
"""

from __future__ import annotations

from .core import STAGES, Pipeline, run_detector
from .detector import ActiveEvent, Transition

__all__ = ["STAGES", "ActiveEvent", "Pipeline", "Transition", "run_detector"]
