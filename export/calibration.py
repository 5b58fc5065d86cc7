"""Per-label logit calibration: make the labels (and experts) of a labels bundle comparable.

The device scores a query as ``sum_e w_e sum_l w_l sigmoid(z_l)``. Raw logits are not on one
scale: a BirdNET species sits near -12 on background while YAMNet's "Speech" or "Vehicle" sits
near 0, so the same score means different things per label and per expert. We shift each
label's logit, ``z' = scale * z + offset``, so that

    **every label's 98th percentile on background windows maps to the same probability**
    (``TARGET`` = 0.1): on recordings where its sound is absent, any label reaches 0.1 on two
    windows in a hundred (about once per 50 s at the 1 s hop), and a query's threshold above
    0.1 means "rarer than the background tail" whichever labels and experts it mixes.

- q = 0.98 (``QUANTILE``): the tail is what makes false alarms, the median says nothing about
  it. Chosen on the fixture DEV half: 15 queries scored with ONE threshold (their windows
  pooled, the way a default threshold works): AP 0.566 uncalibrated, 0.584 / 0.635 / 0.630
  with q = 0.95 / 0.98 / 0.99 (pooled ROC AUC 0.941 -> 0.950 / 0.951 / 0.946). With the ~1,900
  background windows (fixture dev + captions train), q = 0.98 rests on ~38 tail windows per label;
- background: the clips played back to back as one stream (``window_logits``), windows of
  digital silence left out (no microphone delivers it; YAMNet's "Silence" logit is 50 there); a label's
  background excludes the windows overlapping a clip whose own description is of the label's
  kind (a dog clip is not background for dog labels): ``kind_exclusions``;
- shrinkage: the quantile of a label with few background windows is noisy (it rests on
  ``t = n (1 - q)`` tail windows), so its offset is pulled toward its expert's median offset:
  ``offset = m + t / (t + K0) * (raw - m)``, K0 = 5 tail windows;
- ``scale`` stays 1 (``fit_calibration`` can fit it from a second quantile, not used): a slope
  per label needs positives, which background windows do not have.

The offsets are folded into the expert's ONNX graph (an ``Add`` after its logits output,
``fold_into_onnx``), so the device runtime does not change; the numbers go to the manifest's
``notes.calibration`` (``calibration_record``). Fit on the DEV half of the fixture and the
captions TRAIN split only (``background_clips``), never on test or validation audio.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.errors import ExportError

QUANTILE = 0.98
TARGET = 0.1
K0 = 5.0
CALIBRATION_DIR = Path(__file__).resolve().parent / "data" / "calibration"  # committed fits
OFFSET_NAME = "calibration_offset"
SCALE_NAME = "calibration_scale"


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


@dataclass(frozen=True)
class Calibration:
    """Per-label ``z' = scale * z + offset`` and what it was fitted on."""

    offset: np.ndarray  # [L] float32
    scale: np.ndarray  # [L] float32
    background_quantile: np.ndarray  # [L] raw logit quantile on each label's background windows
    n_background: np.ndarray  # [L] background windows per label
    quantile: float
    target: float
    k0: float

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The calibrated logits (numpy reference of the folded graph)."""
        return (logits * self.scale + self.offset).astype(np.float32)


def fit_calibration(logits: np.ndarray, exclude: np.ndarray | None = None, quantile: float = QUANTILE,
                    target: float = TARGET, k0: float = K0) -> Calibration:
    """Offsets from a ``[N, L]`` matrix of background logits (see the module doc).

    ``exclude`` [N, L] bool: windows that are NOT background for a label (its own sound). A
    label left with no background window gets its expert's median offset.
    """
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ExportError(f"calibration needs a [windows, labels] logit matrix with >= 2 windows, got {z.shape}")
    if not 0.5 <= quantile < 1 or not 0 < target < 1 or k0 < 0:
        raise ExportError(f"calibration: quantile {quantile!r} must be in [0.5, 1), target {target!r} in (0, 1), k0 >= 0")
    if exclude is not None and exclude.shape != z.shape:
        raise ExportError(f"calibration: exclude has shape {exclude.shape}, logits {z.shape}")
    masked = np.where(exclude, np.nan, z) if exclude is not None else z
    n = np.sum(~np.isnan(masked), axis=0)
    with np.errstate(all="ignore"):
        q = np.nanquantile(masked, quantile, axis=0) if exclude is not None else np.quantile(z, quantile, axis=0)
    raw = _logit(target) - q
    m = float(np.nanmedian(raw))
    t = n * (1.0 - quantile)
    shrink = np.where(n > 0, t / (t + k0) if k0 > 0 else 1.0, 0.0)
    offset = np.where(n > 0, m + shrink * (np.nan_to_num(raw) - m), m)
    return Calibration(offset.astype(np.float32), np.ones(z.shape[1], np.float32), q.astype(np.float32),
                       n.astype(np.int64), quantile, target, k0)


def fold_into_onnx(src: str | Path, dst: str | Path, output_name: str, cal: Calibration) -> None:
    """Write ``src`` with ``output = scale * output + offset`` after ``output_name`` to ``dst``.

    The producing node's output is renamed ``<name>_uncalibrated`` and a Mul (only if a scale is
    not 1) and an Add restore ``<name>``: the graph's interface is unchanged. Refuses a graph that
    is already calibrated.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:
        raise ImportError("onnx is needed to fold a calibration: pip install 'edge-retrieval[export]'") from exc
    model = onnx.load(str(src))
    g = model.graph
    if any(i.name == OFFSET_NAME for i in g.initializer):
        raise ExportError(f"{str(src)!r} is already calibrated (has {OFFSET_NAME!r})")
    outs = [o for o in g.output if o.name == output_name]
    if not outs:
        raise ExportError(f"{str(src)!r} has no output {output_name!r}; outputs: {[o.name for o in g.output]}")
    dims = outs[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != cal.offset.shape[0]:
        raise ExportError(f"{str(src)!r}: output {output_name!r} has {dims[-1].dim_value} labels, calibration {cal.offset.shape[0]}")
    raw = f"{output_name}_uncalibrated"
    for node in g.node:
        node.output[:] = [raw if o == output_name else o for o in node.output]
        node.input[:] = [raw if i == output_name else i for i in node.input]
    x = raw
    if not np.all(cal.scale == 1.0):
        g.initializer.append(numpy_helper.from_array(cal.scale.astype(np.float32), SCALE_NAME))
        g.node.append(helper.make_node("Mul", [x, SCALE_NAME], [f"{output_name}_scaled"], name="calibration_mul"))
        x = f"{output_name}_scaled"
    g.initializer.append(numpy_helper.from_array(cal.offset.astype(np.float32), OFFSET_NAME))
    g.node.append(helper.make_node("Add", [x, OFFSET_NAME], [output_name], name="calibration_add"))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def calibration_record(cal: Calibration, sources: str, file: str | None = None) -> dict[str, Any]:
    """What the manifest keeps (``notes.calibration.<expert>``): rule, numbers, where from."""
    return {
        "rule": (f"per label, offset = logit({cal.target}) - (q{cal.quantile:g} of its logit on background windows), "
                 f"shrunk toward the expert's median offset by t/(t+{cal.k0:g}), t = windows x (1-q); "
                 "folded into the ONNX graph (Add after the logits output); export/calibration.py"),
        "quantile": cal.quantile,
        "target_probability": cal.target,
        "k0": cal.k0,
        "sources": sources,
        "windows_max": int(cal.n_background.max()),
        "windows_min": int(cal.n_background.min()),
        "offset": {"min": round(float(cal.offset.min()), 3), "median": round(float(np.median(cal.offset)), 3),
                   "max": round(float(cal.offset.max()), 3)},
        **({"file": file} if file else {}),
    }


def save_calibration(cal: Calibration, path: str | Path) -> None:
    np.savez(path, offset=cal.offset, scale=cal.scale, background_quantile=cal.background_quantile,
             n_background=cal.n_background, quantile=cal.quantile, target=cal.target, k0=cal.k0)


def load_calibration(path: str | Path) -> Calibration:
    """A calibration written by ``save_calibration``; ExportError names a missing or broken file."""
    try:
        z = np.load(path)
        return Calibration(z["offset"].astype(np.float32), z["scale"].astype(np.float32),
                           z["background_quantile"].astype(np.float32), z["n_background"].astype(np.int64),
                           float(z["quantile"]), float(z["target"]), float(z["k0"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ExportError(f"calibration file {str(path)!r} is missing or broken ({exc}); "
                          "regenerate it with python -m edge_retrieval.export.calibration") from exc


# --------------------------------------------------------------------------- background audio


@dataclass(frozen=True)
class BackgroundClip:
    path: Path
    text: str  # what the clip is of (fixture category or caption): its own kinds are excluded
    source: str  # "fixture-dev" | "captions-train"


def background_clips(repo: Path, sounds: Path | None, captions_root: Path | None, seed: int = 0) -> list[BackgroundClip]:
    """The fixture's DEV half and the captions' TRAIN split (by package, as ``edge-retrieval
    train`` splits it with ``seed``); never the fixture test half or the captions validation/dev."""
    from .train import read_captions, resolve_audio, split_packages

    out: list[BackgroundClip] = []
    if sounds is not None:
        with open(repo / "data" / "fixture.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["split"] != "dev":
                    continue
                p = sounds / row["category"] / f"{row['clip_id']}.wav"
                if p.is_file():
                    text = row["category"].removeprefix("distractor_").replace("_", " ")
                    out.append(BackgroundClip(p, text, "fixture-dev"))
    if captions_root is not None:
        csv_path = repo / "data" / "captions.csv"
        clips = read_captions(csv_path)
        split = split_packages(clips, seed)
        for c in clips:
            if split[c.package] != "train":
                continue
            try:
                p = resolve_audio(c, captions_root, csv_path.parent)
            except Exception:  # noqa: BLE001  (SourceError: not fetched; the clip is skipped, counted by the caller)
                continue
            out.append(BackgroundClip(p, c.caption, "captions-train"))
    return out


STREAM_RATE = 48000  # the clips are resampled to one rate and played back to back


SILENT_FRACTION = 0.25  # a window with this share of digital zeros (|x| < 1e-6) is no background


def window_logits(bundle: Any, paths: Sequence[Path], threads: int = 2, batch: int = 32,
                  progress: bool = True) -> tuple[dict[str, np.ndarray], list[list[int]], np.ndarray]:
    """Raw logits of every labels expert on the windows of ONE stream: the files played back to
    back at the device's hop, as the daemon would hear them (most clips are shorter than a window:
    scored one by one, each would be padded with digital silence, which no microphone delivers and
    on which YAMNet's "Silence" reaches a logit of 50). Game-sound files carry digital silence of
    their own, so windows with ``SILENT_FRACTION`` of it are flagged. Returns ({expert: [N, L]},
    for each window the indices of the files it overlaps, [N] digitally silent)."""
    from edge_retrieval.device.sources import FileSource
    from edge_retrieval.pipeline.core import Pipeline

    # the device's windows (Pipeline.push); raw logits below, before the device's sigmoid
    pipe = Pipeline(bundle, gate_dbfs=None, threads=threads, sample_rate=STREAM_RATE)
    experts = [e for e in pipe.experts if e.spec.output_kind == "logits"]
    if not experts:
        raise ExportError(f"bundle {bundle.manifest.name!r} has no logits expert to calibrate")
    outs: dict[str, list[np.ndarray]] = {e.name: [] for e in experts}
    spans: list[tuple[float, float]] = []  # stream seconds of each file
    pending: list[Any] = []
    silent: list[bool] = []

    def drain() -> None:
        for e in experts:
            x = np.stack([t.windows[e.name] for t in pending])
            outs[e.name].append(e.encode(e.features(x))[0].astype(np.float32))
        silent.extend(any(float(np.mean(np.abs(t.windows[e.name]) < 1e-6)) >= SILENT_FRACTION for e in experts)
                      for t in pending)
        pending.clear()

    ticks: list[tuple[float, float]] = []
    it: Iterable[Path] = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(list(paths), desc="background stream", unit="clip", leave=False)
    t0 = 0.0
    for path in it:
        src = FileSource(path, target_rate=STREAM_RATE)
        n = 0
        for block in src.blocks():
            n += block.size
            for tick in pipe.push(block):
                pending.append(tick)
                ticks.append((tick.start_s, tick.end_s))
        spans.append((t0, t0 + n / STREAM_RATE))
        t0 += n / STREAM_RATE
        if len(pending) >= batch:
            drain()
    for tick in pipe.flush():
        pending.append(tick)
        ticks.append((tick.start_s, tick.end_s))
    if pending:
        drain()
    starts = np.asarray([s for s, _ in spans])
    ends = np.asarray([e for _, e in spans])
    overlaps = [np.flatnonzero((starts < te) & (ends > ts)).tolist() for ts, te in ticks]
    return {k: np.concatenate(v) for k, v in outs.items()}, overlaps, np.asarray(silent, bool)


def kind_exclusions(texts: Sequence[str], overlaps: Sequence[Sequence[int]], label_kinds: Mapping[str, np.ndarray],
                    kinds_of_text: Callable[[str], set[int]]) -> dict[str, np.ndarray]:
    """Per expert, ``[N, L]`` True where a file that window n overlaps is described as label l's kind."""
    clip_kinds = [kinds_of_text(t) for t in texts]
    win_kinds = [set().union(*(clip_kinds[i] for i in ov)) if ov else set() for ov in overlaps]
    return {name: np.stack([np.isin(lk, list(ks)) for ks in win_kinds]) for name, lk in label_kinds.items()}


# --------------------------------------------------------------------------- a calibrated bundle


def union_kinds_of_text(bundle: Any, min_mass: float = 0.1) -> tuple[Callable[[str], set[int]], dict[str, np.ndarray]]:
    """(text -> kinds it is about, expert -> [L] kind of each label) from the bundle's union bridge."""
    from edge_retrieval.text import make_text_side
    from edge_retrieval.text.union_bridge import UnionSide

    spec = next((t for t in bundle.require_server().text if t.kind == "union_bridge"), None)
    if spec is None:
        raise ExportError(f"bundle {bundle.manifest.name!r} has no union_bridge text side: background windows "
                          "cannot be told from their clips' own sounds")
    side = make_text_side(bundle, spec)
    assert isinstance(side, UnionSide)
    core = side.core
    names = core.index.labels.kind_names

    def kinds_of_text(text: str) -> set[int]:
        r = core.resolve_all(text)[spec.expert]
        return {names.index(k) for k, m in r.extra["kind_mass"].items() if m >= min_mass}

    label_kinds = {e: core.index.labels.label_kind[core.index.expert_slice(i)] for i, e in enumerate(core.params.experts)}
    return kinds_of_text, label_kinds


def fit_bundle(src: str | Path, clips: Sequence[BackgroundClip], *, threads: int = 2, quantile: float = QUANTILE,
               target: float = TARGET, k0: float = K0, progress: bool = True) -> tuple[dict[str, Calibration], str]:
    """Fit every logits expert of the uncalibrated union-bridge bundle at ``src`` on ``clips``:
    ({expert: Calibration}, a line saying what the background was). ``export default`` folds the
    saved fits (``CALIBRATION_DIR``) into the experts' graphs."""
    from edge_retrieval.bundle import load_bundle

    if not clips:
        raise ExportError("no background clips: fetch the fixture (scripts/fetch_sounds.py) and the captions set")
    b = load_bundle(src, part="all")
    if "calibration" in (b.manifest.notes or {}):
        raise ExportError(f"bundle {str(src)!r} is already calibrated: fit on an uncalibrated one "
                          "(edge-retrieval export default --no-calibration)")
    if any(str(c.path).startswith(str(Path(src).resolve())) for c in clips):
        raise ExportError("background clips must not come from inside the bundle")
    kinds_of_text, label_kinds = union_kinds_of_text(b)
    logits, overlaps, silent = window_logits(b, [c.path for c in clips], threads=threads, progress=progress)
    exclude = kind_exclusions([c.text for c in clips], overlaps, {e: label_kinds[e] for e in logits}, kinds_of_text)
    exclude = {e: x | silent[:, None] for e, x in exclude.items()}
    sources = (f"{len(clips)} clips played back to back, {len(overlaps)} windows at hop {b.manifest.device.hop_s} s "
               f"({int(silent.sum())} digitally silent left out): "
               + ", ".join(f"{s} {sum(c.source == s for c in clips)}" for s in sorted({c.source for c in clips})))
    return {e: fit_calibration(z, exclude[e], quantile, target, k0) for e, z in logits.items()}, sources


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_retrieval.export.calibration --bundle RAW [--save export/data/calibration]``."""
    import argparse
    import json

    from .train import default_audio_root

    p = argparse.ArgumentParser(description="Fit per-label calibrations of every logits expert of an uncalibrated "
                                            "bundle on background windows; export default folds the saved ones.")
    p.add_argument("--bundle", type=Path, required=True,
                   help="uncalibrated bundle with a union_bridge text side (export default --no-calibration)")
    p.add_argument("--save", type=Path, default=CALIBRATION_DIR, help=f"folder for EXPERT.npz (default {CALIBRATION_DIR})")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="repository root with data/fixture.csv and data/captions.csv")
    p.add_argument("--sounds", type=Path, default=default_audio_root(), help="fixture clips (scripts/fetch_sounds.py)")
    p.add_argument("--captions-root", type=Path, default=None, help="captions audio root (package/path.wav)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    for name in ("sounds", "captions_root"):
        v = getattr(a, name)
        if v is not None and not v.is_dir():
            raise ExportError(f"--{name.replace('_', '-')} {str(v)!r} is not a directory")
    clips = background_clips(a.repo, a.sounds, a.captions_root)
    cals, sources = fit_bundle(a.bundle, clips, threads=a.threads)
    a.save.mkdir(parents=True, exist_ok=True)
    records = {}
    for e, cal in cals.items():
        save_calibration(cal, a.save / f"{e}.npz")
        records[e] = calibration_record(cal, sources)
        print(f"{e}: {len(cal.offset)} labels, median offset {float(np.median(cal.offset)):.2f} -> {a.save / (e + '.npz')}")
    (a.save / "recipe.json").write_text(json.dumps({
        "command": "python -m edge_retrieval.export.calibration --bundle RAW --captions-root CAPTIONS "
                   "(RAW = edge-retrieval export default --no-calibration)",
        "background": sources, "records": records}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
