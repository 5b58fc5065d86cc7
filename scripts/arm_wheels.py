"""Does ``pip install 'edge-retrieval[mic]'`` resolve from wheels alone on aarch64, per Python?

Why: a board that finds no aarch64 wheel for a dependency falls back to building it from source
(compilers, Rust, BLAS headers: minutes to hours on a Pi, or a cryptic failure). This resolves
the project's own requirement list (pyproject ``dependencies`` + the ``mic`` extra) with
``pip install --dry-run --only-binary=:all:`` for aarch64 manylinux tags up to glibc 2.35
(Ubuntu 22.04 / JetPack 6; Raspberry Pi OS Bookworm has 2.36), for each Python version, and
names every requirement that has no wheel. Environment markers of the project's own requirements
are evaluated for the target Python and aarch64 Linux here; pip evaluates those of transitive
dependencies against the running interpreter (a pip limitation), so a dependency that only an
older Python pulls in is not checked. Needs network access to the package index::

    python scripts/arm_wheels.py [--python 3.10,3.11,3.12,3.13] [--glibc 2.35] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the project depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def requirements(pyproject: Path = ROOT / "pyproject.toml", extras: Sequence[str] = ("mic",)) -> list[str]:
    """The device install's requirements, exactly as pyproject states them."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def for_target(reqs: Sequence[str], python: str) -> list[str]:
    """The requirements that apply on aarch64 Linux with CPython ``python``, markers removed
    (pip would evaluate them against the interpreter it runs on)."""
    from packaging.requirements import Requirement

    env = {"python_version": python, "python_full_version": f"{python}.0", "platform_machine": "aarch64",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    out = []
    for r in reqs:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def platforms(glibc_minor: int) -> list[str]:
    """aarch64 manylinux tags a system with glibc 2.<glibc_minor> accepts."""
    return ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, glibc_minor + 1)]


def resolve(reqs: Sequence[str], python: str, glibc_minor: int, no_deps: bool = False) -> tuple[bool, dict, str]:
    """pip's dry-run resolution: (ok, {name: (version, wheel file)}, error text)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--disable-pip-version-check", "--report", str(report), "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp"]
        for p in platforms(glibc_minor):
            cmd += ["--platform", p]
        if no_deps:
            cmd.append("--no-deps")
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True)
        if proc.returncode != 0:
            err = "\n".join(line for line in proc.stderr.splitlines() if "is ignored" not in line)
            return False, {}, err
        data = json.loads(report.read_text(encoding="utf-8"))
    got = {}
    for item in data["install"]:
        meta = item["metadata"]
        got[meta["name"].lower()] = (meta["version"], item["download_info"]["url"].rsplit("/", 1)[-1])
    return True, got, ""


def missing_names(reqs: Sequence[str], python: str, glibc_minor: int, err: str) -> list[str]:
    """Every requirement (direct, or the transitive one pip stopped at) with no usable wheel."""
    bad = [r for r in reqs if not resolve([r], python, glibc_minor, no_deps=True)[0]]
    m = re.findall(r"No matching distribution found for (\S+)", err)
    return sorted(set(bad) | set(m))


def wheel_tag(filename: str) -> str:
    """'onnxruntime-1.32.0-cp311-cp311-manylinux_2_27_aarch64.whl' -> 'cp311 manylinux_2_27_aarch64'."""
    parts = filename[: -len(".whl")].split("-")
    return f"{parts[-3]} {parts[-1]}" if len(parts) >= 5 else filename


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default="3.10,3.11,3.12,3.13", help="comma-separated versions")
    p.add_argument("--glibc", default="2.35", help="newest glibc of the target boards (default 2.35, JetPack 6)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for benchmarks/README.md)")
    a = p.parse_args(argv)
    if not re.fullmatch(r"2\.\d+", a.glibc):
        p.error(f"--glibc {a.glibc!r}: expected 2.N (e.g. 2.35)")
    glibc_minor = int(a.glibc.split(".")[1])
    versions = [v.strip() for v in a.python.split(",") if v.strip()]
    for v in versions:
        if not re.fullmatch(r"3\.\d+", v):
            p.error(f"--python: {v!r} is not a version like 3.11")
    results = {}
    for v in versions:
        reqs = for_target(requirements(), v)
        ok, got, err = resolve(reqs, v, glibc_minor)
        results[v] = (ok, got, [] if ok else missing_names(reqs, v, glibc_minor, err))
        print(f"python {v}: {'resolves from aarch64 wheels' if ok else 'NO wheel for ' + ', '.join(results[v][2])}",
              file=sys.stderr)
    names = sorted({n for ok, got, _ in results.values() for n in got})
    if a.markdown:
        print("| package | " + " | ".join(f"Python {v}" for v in versions) + " |")
        print("|---|" + "---|" * len(versions))
        for n in names:
            cells = []
            for v in versions:
                got = results[v][1]
                cells.append(f"{got[n][0]} `{wheel_tag(got[n][1])}`" if n in got else "–")
            print(f"| {n} | " + " | ".join(cells) + " |")
        print("| **resolves** | " + " | ".join(
            "yes" if results[v][0] else "**no**: " + ", ".join(results[v][2]) for v in versions) + " |")
    else:
        for v in versions:
            ok, got, bad = results[v]
            print(f"Python {v}: {'OK' if ok else 'FAIL'}")
            for n in sorted(got):
                print(f"  {n:20s} {got[n][0]:12s} {got[n][1]}")
            for b in bad:
                print(f"  no aarch64 wheel: {b}")
    return 0 if all(ok for ok, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
