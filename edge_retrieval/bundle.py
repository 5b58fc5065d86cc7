"""Model bundle: a directory with ``manifest.json`` and the files it names (docs/architecture.md).

The manifest has a ``device`` part (audio experts: front end, rate, window, ONNX file, output
kind) and a ``server`` part (text side). Every file carries its sha256, checked before loading.
A bundle is written to a temporary sibling directory and renamed at the end, so a failed
export leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

SpaceKind = Literal["joint", "labels", "ensemble"]
OutputKind = Literal["embedding", "probabilities", "logits"]
Precision = Literal["fp32", "int8", "mixed"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    """One file of the bundle, relative to the bundle root."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    part: Literal["device", "server"]


class FrontendSpec(_Model):
    """Which front end turns samples into the encoder input, with its parameters.

    ``kind`` is a registry key (edge_retrieval.frontends); ``params`` are parsed by that front end's
    frozen dataclass. ``kind == "in-graph"`` means the ONNX graph takes raw audio.
    """

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class ExpertSpec(_Model):
    """One audio expert on the device: its own rate, window, front end and ONNX file."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    family: str  # e.g. "birdnet", "clap", "aisfx": registry key for model-specific handling
    sample_rate: int = Field(gt=0)
    window_s: float = Field(gt=0)
    frontend: FrontendSpec
    file: str  # ONNX path relative to the bundle root
    precision: Precision
    input_name: str
    output_name: str  # the tensor the matcher scores
    output_kind: OutputKind
    dim: int = Field(gt=0)
    # labels space: the device applies the sigmoid to logits; the label order file
    labels_file: str | None = None
    extra_outputs: dict[str, int] = Field(default_factory=dict)  # e.g. {"embedding": 1024}
    # trained experts: projection applied after the encoder (npz with "W" [dim_in, dim], "b" [dim])
    projection_file: str | None = None
    quantization: dict[str, Any] | None = None  # achieved accuracy, size, latency, fp32 parts
    parity: dict[str, Any] | None = None  # export parity report (vs the reference runtime)

    @model_validator(mode="after")
    def _labels_need_file(self) -> ExpertSpec:
        if self.output_kind in ("probabilities", "logits") and not self.labels_file:
            raise ValueError(f"expert {self.name!r}: output_kind {self.output_kind!r} needs labels_file")
        return self


class DevicePart(_Model):
    """What a device needs: the audio experts and the common scoring hop (seconds)."""

    experts: list[ExpertSpec] = Field(min_length=1)
    hop_s: float = Field(gt=0)


class TextSpec(_Model):
    """Text side of one expert (server part). ``kind`` is a registry key (edge_retrieval.text).

    kinds: "label_bridge" (sentence encoder over label texts -> sparse weights),
    "joint" (text tower gives a unit vector), "projected" (trained text projection).
    """

    expert: str
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class ServerPart(_Model):
    """What the server needs to turn text into query vectors."""

    text: list[TextSpec] = Field(min_length=1)
    # ensemble gating (text-conditioned expert weights); None = fixed equal weights
    gating: dict[str, Any] | None = None


class SpaceSpec(_Model):
    kind: SpaceKind
    id: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Model):
    """The whole manifest.json."""

    format_version: int = FORMAT_VERSION
    name: str
    licence: str
    licence_note: str = ""
    space: SpaceSpec
    device: DevicePart
    server: ServerPart | None = None
    files: dict[str, FileEntry]
    created: str = ""
    created_by: str = ""
    notes: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _files_named(self) -> Manifest:
        named = [e.file for e in self.device.experts]
        named += [e.labels_file for e in self.device.experts if e.labels_file]
        named += [e.projection_file for e in self.device.experts if e.projection_file]
        for rel in named:
            if rel not in self.files:
                raise ValueError(f"file {rel!r} is named by an expert but missing from 'files'")
        names = [e.name for e in self.device.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        if self.server is not None:
            for t in self.server.text:
                if t.expert not in names:
                    raise ValueError(f"text side names unknown expert {t.expert!r}; experts: {names}")
        return self

    def expert(self, name: str) -> ExpertSpec:
        for e in self.device.experts:
            if e.name == name:
                return e
        raise BundleError(f"bundle {self.name!r} has no expert {name!r}")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.device.experts]


# --------------------------------------------------------------------------- space id


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def expert_space_digest(
    *,
    space_kind: str,
    source_digest: str,
    frontend: FrontendSpec | dict[str, Any],
    output_name: str,
    label_order: Iterable[str] | None = None,
    projection_digest: str | None = None,
) -> str:
    """Digest of one expert's contribution to the space id (precision and text side left out)."""
    fe = frontend.model_dump() if isinstance(frontend, FrontendSpec) else frontend
    parts: dict[str, Any] = {
        "space_kind": space_kind,
        "source": source_digest,
        "frontend": fe,
        "output": output_name,
    }
    if label_order is not None:
        parts["labels"] = hashlib.sha256("\n".join(label_order).encode()).hexdigest()
    if projection_digest is not None:
        parts["projection"] = projection_digest
    return hashlib.sha256(_canonical(parts)).hexdigest()


def space_id(space_kind: str, expert_digests: Iterable[tuple[str, str]]) -> str:
    """Space id = sha256 over the space kind and each (expert name, expert digest), in order."""
    return hashlib.sha256(_canonical({"kind": space_kind, "experts": list(expert_digests)})).hexdigest()


# --------------------------------------------------------------------------- loading


class Bundle:
    """A verified bundle on disk: its manifest and the root to resolve file names against."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def has_server_part(self) -> bool:
        return self.manifest.server is not None

    def require_server(self) -> ServerPart:
        if self.manifest.server is None:
            raise BundleError(
                f"bundle {str(self.root)!r} is a slim device bundle with no text side; "
                "use the full bundle (server part) to turn text into queries"
            )
        return self.manifest.server

    def labels(self, expert: str) -> list[str]:
        spec = self.manifest.expert(expert)
        if not spec.labels_file:
            raise BundleError(f"expert {expert!r} has no labels")
        return self.path(spec.labels_file).read_text(encoding="utf-8").splitlines()

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.root),
            "name": m.name,
            "format_version": m.format_version,
            "licence": m.licence,
            "space_kind": m.space.kind,
            "space_id": m.space.id,
            "hop_s": m.device.hop_s,
            "experts": [
                {
                    "name": e.name,
                    "family": e.family,
                    "precision": e.precision,
                    "sample_rate": e.sample_rate,
                    "window_s": e.window_s,
                    "frontend": e.frontend.kind,
                    "output": f"{e.output_kind}[{e.dim}]",
                    "file": e.file,
                    "mb": round(m.files[e.file].bytes / 1e6, 2),
                }
                for e in m.device.experts
            ],
            "server_part": m.server is not None,
            "text": [t.kind for t in m.server.text] if m.server else [],
            "files": len(m.files),
            "device_mb": round(sum(f.bytes for f in m.files.values() if f.part == "device") / 1e6, 2),
            "total_mb": round(sum(f.bytes for f in m.files.values()) / 1e6, 2),
        }


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not root.exists():
        raise BundleError(f"bundle {str(root)!r} does not exist (expected a bundle directory with {MANIFEST_NAME}, "
                          "built by `edge-retrieval export birdnet --out DIR` or the demo)")
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} is a file (expected a bundle directory with {MANIFEST_NAME})")
    if not mpath.is_file():
        raise BundleError(f"bundle {str(root)!r}: no {MANIFEST_NAME}")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {str(root)!r}: {MANIFEST_NAME} is not valid JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise BundleError(
            f"bundle {str(root)!r}: format_version {data.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise BundleError(f"bundle {str(root)!r}: manifest field {loc}: {err['msg']}") from exc


def load_bundle(
    root: str | os.PathLike[str], part: Literal["device", "server", "all"] = "device", verify: bool = True
) -> Bundle:
    """Read and check a bundle. ``part`` selects which files are hashed (and must exist)."""
    root = Path(root)
    manifest = read_manifest(root)
    if part in ("server", "all") and manifest.server is None and part == "server":
        raise BundleError(f"bundle {str(root)!r} has no server part (text side); it was slimmed")
    if verify:
        for rel, entry in manifest.files.items():
            if part == "device" and entry.part != "device":
                continue
            p = root / rel
            if not p.is_file():
                raise BundleError(f"bundle {str(root)!r}: file {rel!r} is missing")
            got = sha256_file(p)
            if got != entry.sha256:
                raise BundleError(
                    f"bundle {str(root)!r}: checksum of {rel!r} is {got[:12]}..., manifest says "
                    f"{entry.sha256[:12]}... (corrupt or modified file)"
                )
    return Bundle(root.resolve(), manifest)


# --------------------------------------------------------------------------- writing


class BundleWriter:
    """Build a bundle in a temporary sibling directory; ``commit`` renames it into place.

    Usage::

        with BundleWriter(out) as w:
            w.add_file(src_path, "audio.onnx", part="device")
            w.commit(manifest_without_files_dict)
    Leaving the block without ``commit`` (or by an exception) removes the temporary directory.
    """

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise BundleError(f"output {str(self.out)!r} already exists; choose another output directory or remove it")
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        self.files: dict[str, FileEntry] = {}
        self._committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _record(self, rel: str, part: Literal["device", "server"]) -> Path:
        dst = self.tmp / rel
        self.files[rel] = FileEntry(sha256=sha256_file(dst), bytes=dst.stat().st_size, part=part)
        return dst

    def dest(self, rel: str) -> Path:
        """Path inside the temporary bundle where a producer may write ``rel`` directly."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_file(self, src: str | os.PathLike[str], rel: str, part: Literal["device", "server"]) -> Path:
        dst = self.dest(rel)
        shutil.copyfile(src, dst)
        return self._record(rel, part)

    def add_bytes(self, data: bytes, rel: str, part: Literal["device", "server"]) -> Path:
        self.dest(rel).write_bytes(data)
        return self._record(rel, part)

    def add_text(self, text: str, rel: str, part: Literal["device", "server"]) -> Path:
        return self.add_bytes(text.encode("utf-8"), rel, part)

    def register(self, rel: str, part: Literal["device", "server"]) -> Path:
        """Record a file that a producer wrote at ``dest(rel)``."""
        if not (self.tmp / rel).is_file():
            raise BundleError(f"bundle file {rel!r} was not written")
        return self._record(rel, part)

    def commit(self, manifest: dict[str, Any]) -> Bundle:
        """Validate the manifest (``files`` is filled in here), write it, and rename into place."""
        data = dict(manifest)
        data["files"] = {k: v.model_dump() for k, v in self.files.items()}
        data.setdefault("format_version", FORMAT_VERSION)
        try:
            m = Manifest.model_validate(data)
        except ValidationError as exc:
            raise BundleError(f"invalid manifest for {str(self.out)!r}: {exc.errors()[0]['msg']}") from exc
        (self.tmp / MANIFEST_NAME).write_text(
            json.dumps(m.model_dump(mode="json"), indent=2, sort_keys=False) + "\n", encoding="utf-8"
        )
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        self._committed = True
        return Bundle(self.out.resolve(), m)


def slim_bundle(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Bundle:
    """Copy only the device part of ``src`` to ``out`` (no text tower: fits a Pi Zero 2 W)."""
    if Path(out).resolve().is_relative_to(Path(src).resolve()):
        raise BundleError(f"output {str(out)!r} is inside the source bundle {str(src)!r} "
                          "(expected a directory outside it: the source's checksums would no longer match)")
    b = load_bundle(src, part="device")
    m = b.manifest
    with BundleWriter(out) as w:
        for rel, entry in m.files.items():
            if entry.part == "device":
                w.add_file(b.path(rel), rel, "device")
        data = m.model_dump(mode="json")
        data["server"] = None
        data["notes"] = {**m.notes, "slimmed_from": m.name}
        return w.commit(data)
