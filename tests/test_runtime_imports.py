"""The device runtime must import without torch, transformers or tensorflow (STYLE.md)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import edge_retrieval

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("torch", "transformers", "tensorflow", "tf2onnx", "sentence_transformers")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked heavy import: {name}")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def runtime_modules() -> list[str]:
    """Every module of the runtime package, excluding the workstation export stage."""
    names = []
    for info in pkgutil.walk_packages(edge_retrieval.__path__, "edge_retrieval."):
        if info.name.startswith(("edge_retrieval.export", "edge_retrieval.benchmarks")):
            continue
        if info.name.endswith(".__main__"):  # importing it runs the program
            continue
        names.append(info.name)
    return names


def test_runtime_modules_import_without_heavy_frameworks() -> None:
    mods = runtime_modules()
    assert "edge_retrieval.bundle" in mods and "edge_retrieval.cli" in mods
    code = BLOCKER + "\nimport importlib\n" + "\n".join(f"importlib.import_module({m!r})" for m in mods)
    code += f"\nprint('imported', {len(mods)})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"imported {len(mods)}" in r.stdout


def test_blocker_really_blocks() -> None:
    r = subprocess.run([sys.executable, "-c", BLOCKER + "\nimport torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked heavy import" in r.stderr


def test_cli_help_lists_commands_and_unknown_command_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "export" in r.stdout
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr and "Traceback" not in r.stderr
