"""Where a command finds its bundle when ``--bundle`` is not given.

In order: ``--bundle DIR``; ``$EDGE_RETRIEVAL_BUNDLE``; the default bundle that ``edge-retrieval
demo`` (and ``export default --out`` to the same place) builds, ``~/.cache/edge-retrieval/bundles/
default-fp32``, named on stderr when it is used. Nothing found: one line saying the three ways.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ...errors import ConfigError

BUNDLE_ENV = "EDGE_RETRIEVAL_BUNDLE"


def default_bundle_dir() -> Path:
    """The default bundle's folder (read at call time: ``$HOME`` may differ between processes)."""
    return Path.home() / ".cache" / "edge-retrieval" / "bundles" / "default-fp32"


def find_bundle(given: Path | None) -> Path:
    """``given`` if set, else ``$EDGE_RETRIEVAL_BUNDLE``, else the built default bundle; ConfigError if none."""
    if given is not None:
        return given
    env = os.environ.get(BUNDLE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    d = default_bundle_dir()
    if (d / "manifest.json").is_file():
        print(f"using the default bundle {d} (--bundle DIR or ${BUNDLE_ENV} picks another)", file=sys.stderr)
        return d
    raise ConfigError(f"no bundle: pass --bundle DIR, set ${BUNDLE_ENV}, or build the default one with "
                      f"'edge-retrieval export default --out {d}' (bash scripts/demo.sh builds it too)")
