"""Audio fixtures (pytest plugin): generated sound files, a tiny test bundle, a PulseAudio null sink.

The tiny bundle is a real bundle with a real ONNX graph (built with onnx.helper), so the daemon,
matcher, sinks, overload and error paths are tested with onnxruntime independently of BirdNET:

- expert ``tones`` (labels space, 16 kHz, 1 s windows, in-graph front end): logits of the power
  at four frequencies, ``logit_k = ln(P_k + 1e-8) + 9`` with ``P_k`` the normalised DFT power at
  ``FREQS[k]``; labels ``LABELS``. A 0.5-amplitude tone at 1 kHz scores ~1 for "beep", noise ~0.
- expert ``bands`` (ensemble bundle only; 8 kHz, 0.5 s windows): a unit embedding of the same
  four powers (cosine to a one-hot query = that band's share).

Its text side (kind ``fixture_words``, registered here: injected, not patched) maps a text to
the labels whose words it contains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle, BundleWriter, TextSpec, expert_space_digest, space_id
from edge_retrieval.protocol import encode_dense, encode_sparse
from edge_retrieval.text import Resolution, TextSide, register_text_side

LABELS = ["low hum", "beep", "whistle", "chirp"]
FREQS = [200.0, 1000.0, 3000.0, 5000.0]


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def noise(seconds: float, rate: int, amp: float = 0.01, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(round(seconds * rate)))).astype(np.float32)


def _power_graph(name: str, rate: int, window_s: float, out_kind: str):  # noqa: ANN202
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = int(round(rate * window_s))
    t = np.arange(n) / rate
    cos = np.stack([np.cos(2 * np.pi * f * t) for f in FREQS], axis=1).astype(np.float32)
    sin = np.stack([np.sin(2 * np.pi * f * t) for f in FREQS], axis=1).astype(np.float32)
    inits = [
        numpy_helper.from_array(cos, "cos"),
        numpy_helper.from_array(sin, "sin"),
        numpy_helper.from_array(np.array(4.0 / n**2, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("MatMul", ["audio", "cos"], ["yc"]),
        helper.make_node("MatMul", ["audio", "sin"], ["ys"]),
        helper.make_node("Mul", ["yc", "yc"], ["yc2"]),
        helper.make_node("Mul", ["ys", "ys"], ["ys2"]),
        helper.make_node("Add", ["yc2", "ys2"], ["p0"]),
        helper.make_node("Mul", ["p0", "scale"], ["power"]),
    ]
    if out_kind == "logits":
        inits += [
            numpy_helper.from_array(np.array(1e-8, np.float32), "eps"),
            numpy_helper.from_array(np.array(9.0, np.float32), "offset"),
        ]
        nodes += [
            helper.make_node("Add", ["power", "eps"], ["pe"]),
            helper.make_node("Log", ["pe"], ["lp"]),
            helper.make_node("Add", ["lp", "offset"], ["logits"]),
        ]
        out = "logits"
    else:
        nodes += [helper.make_node("Sqrt", ["power"], ["embedding"])]
        out = "embedding"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", n])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", len(FREQS)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, out


def build_tiny_bundle(out: Path, ensemble: bool = False, hop_s: float = 1.0) -> Bundle:
    """Write the tiny bundle (see module doc) to ``out`` and return it."""
    import onnx

    experts = [("tones", 16000, 1.0, "logits")] + ([("bands", 8000, 0.5, "embedding")] if ensemble else [])
    kind = "ensemble" if ensemble else "labels"
    specs, digests = [], []
    with BundleWriter(out) as w:
        w.add_text("\n".join(LABELS) + "\n", "labels.txt", "device")
        for name, rate, win, okind in experts:
            model, out_name = _power_graph(name, rate, win, okind)
            onnx.save(model, str(w.dest(f"{name}.onnx")))
            w.register(f"{name}.onnx", "device")
            entry = w.files[f"{name}.onnx"]
            fe = {"kind": "in-graph", "params": {}}
            digests.append(
                (
                    name,
                    expert_space_digest(
                        space_kind=kind,
                        source_digest=entry.sha256,
                        frontend=fe,
                        output_name=out_name,
                        label_order=LABELS if okind == "logits" else None,
                    ),
                )
            )
            specs.append(
                {
                    "name": name,
                    "family": "fixture",
                    "sample_rate": rate,
                    "window_s": win,
                    "frontend": fe,
                    "file": f"{name}.onnx",
                    "precision": "fp32",
                    "input_name": "audio",
                    "output_name": out_name,
                    "output_kind": okind,
                    "dim": len(FREQS),
                    "labels_file": "labels.txt" if okind == "logits" else None,
                }
            )
        return w.commit(
            {
                "name": f"tiny-{kind}",
                "licence": "Apache-2.0",
                "space": {"kind": kind, "id": space_id(kind, digests)},
                "device": {"experts": specs, "hop_s": hop_s},
                "server": {"text": [{"expert": s["name"], "kind": "fixture_words"} for s in specs]},
                "notes": {"default_threshold": 0.5},
            }
        )


class FixtureWords(TextSide):
    """Text -> the labels whose words appear in it (the tiny bundle's whole text side)."""

    def __init__(self, bundle: Bundle, spec: TextSpec) -> None:
        self.expert = spec.expert
        self.labels = LABELS
        self.kind = bundle.manifest.expert(spec.expert).output_kind

    def resolve(self, text: str) -> Resolution:
        words = set(text.lower().split())
        hits = [i for i, lab in enumerate(self.labels) if set(lab.split()) & words]
        warning = None
        if not hits:
            hits = list(range(len(self.labels)))
            warning = f"{text!r} matches no label of this bundle; it will score every label equally"
        w = np.full(len(hits), 1.0 / len(hits))
        if self.kind == "logits":
            vec = encode_sparse(self.expert, np.asarray(hits), w)
        else:
            dense = np.zeros(len(self.labels), np.float32)
            dense[hits] = 1.0
            vec = encode_dense(self.expert, dense / np.linalg.norm(dense), "f32")
        return Resolution(
            expert=self.expert,
            vector=vec,
            top=[(self.labels[i], float(x)) for i, x in zip(hits, w, strict=True)],
            fit=0.0 if warning else 1.0,
            warning=warning,
        )


register_text_side("fixture_words")(FixtureWords)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny-ens", ensemble=True)


def write_scene(path: Path, parts: list[tuple[str, float]], rate: int, channels: int = 1, **sf_kw: object) -> Path:
    """Write a sequence of ("noise"|freq-as-str, seconds) parts as one file; returns the path."""
    import soundfile as sf

    chunks = []
    for i, (what, secs) in enumerate(parts):
        base = noise(secs, rate, seed=i)
        if what != "noise":
            base = base + tone(float(what), secs, rate)
        chunks.append(base)
    x = np.concatenate(chunks)
    if channels > 1:  # the same signal on every channel with a different small gain
        x = np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    sf.write(str(path), x, rate, **sf_kw)
    return path


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 6 s scene (2 s noise, 2 s of 1 kHz, 2 s noise) as WAV/FLAC/OGG at odd rates/channels."""
    d = tmp_path_factory.mktemp("audio")
    scene = [("noise", 2.0), ("1000", 2.0), ("noise", 2.0)]
    return {
        "wav": write_scene(d / "scene_44k1_stereo.wav", scene, 44100, channels=2),
        "flac": write_scene(d / "scene_22k05_mono.flac", scene, 22050, channels=1),
        "ogg": write_scene(d / "scene_48k_3ch.ogg", scene, 48000, channels=3, format="OGG", subtype="VORBIS"),
        "wav_f32_11k": write_scene(d / "scene_11025_f32.wav", scene, 11025, subtype="FLOAT"),
    }


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import soundfile as sf

    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    empty = d / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), np.float32), 16000)
    zero = d / "zero_bytes.flac"
    zero.write_bytes(b"")
    text = d / "notes.ogg"
    text.write_text("this is not an ogg file\n")
    return {"corrupt": corrupt, "empty": empty, "zero": zero, "text": text}


# --------------------------------------------------------------------------- PulseAudio


def _pactl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=10, check=check)


@pytest.fixture(scope="session")
def pulse_null_sink():  # noqa: ANN201
    """A running PulseAudio with a null sink ``fieldmic<pid>`` whose monitor PortAudio records.

    Yields a function ``play(path)`` that plays a file into the sink (paplay). Starts the
    server if none runs and stops it again at the end.
    """
    if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
        pytest.skip("pulseaudio is not installed (scripts/setup.sh installs pulseaudio pulseaudio-utils)")
    started = False
    if _pactl("info", check=False).returncode != 0:
        r = subprocess.run(
            ["pulseaudio", "--start", "--exit-idle-time=-1", "--daemonize=yes"],
            capture_output=True, text=True, timeout=30,
        )
        started = True
        for _ in range(50):
            if _pactl("info", check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"pulseaudio did not start: {r.stderr.strip()[:300]}")
    sink = f"fieldmic{os.getpid()}"  # one per test session: concurrent runs do not hear each other
    mod = _pactl("load-module", "module-null-sink", f"sink_name={sink}").stdout.strip()
    old_source = os.environ.get("PULSE_SOURCE")
    os.environ["PULSE_SOURCE"] = f"{sink}.monitor"  # what PortAudio's "pulse" device records
    env = dict(os.environ)

    def play(path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["paplay", f"--device={sink}", str(path)], env=env)

    play.sink = sink  # type: ignore[attr-defined]
    play.state = {"started": started}  # type: ignore[attr-defined]  # a test that restarts the server sets it
    try:
        yield play
    finally:
        if old_source is None:
            os.environ.pop("PULSE_SOURCE", None)
        else:
            os.environ["PULSE_SOURCE"] = old_source
        if mod.isdigit():
            _pactl("unload-module", mod, check=False)
        if play.state["started"]:  # type: ignore[attr-defined]
            subprocess.run(["pulseaudio", "--kill"], capture_output=True, timeout=30)
