"""``edge-retrieval index DIR --bundle B``: embed a folder of recordings for text search.

Incremental: files already indexed at the same size and mtime are skipped, so a re-run only embeds
new or changed recordings (as a new shard). ``--workers N`` embeds in local processes,
``--cluster ADDRESS`` on a Dask cluster. A file that cannot be read is reported on one line and skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bundle import load_bundle
from ...errors import ConfigError
from ...offline.archive import DEFAULT_INDEX_DIR, ArchiveIndex, index_folder
from .bundle_arg import find_bundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="folder of recordings (searched recursively)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="model bundle directory (default $EDGE_RETRIEVAL_BUNDLE, else the demo's default bundle)")
    p.add_argument("--out", type=Path, default=None, help=f"index directory (default DIR/{DEFAULT_INDEX_DIR})")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    p.add_argument("--site", default=None, help="site name for every file (default: GUANO Site, else first sub-folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=1, help="embed in N local processes, one shard each (default 1)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="embed on a running Dask cluster (tcp://HOST:PORT); the index folder and the bundle "
                        "must be at the same path on every worker")
    p.add_argument("--migrate", action="store_true", help="convert a version-1 index (SQLite rows) to shards first")


def main(args: argparse.Namespace) -> int:
    # checked before the index is opened: opening creates DIR/.edge-retrieval-index
    if not args.dir.exists():
        raise ConfigError(f"archive folder {str(args.dir)!r} does not exist (expected a folder of recordings)")
    if not args.dir.is_dir():
        raise ConfigError(f"{str(args.dir)!r} is a file; index takes a folder of recordings "
                          "(put the file in a folder and index that)")
    out = args.out or (args.dir / DEFAULT_INDEX_DIR)
    bundle = load_bundle(find_bundle(args.bundle), part="device")

    def progress(items, total):  # noqa: ANN001, ANN202
        if args.quiet or total == 0:
            return items
        from tqdm import tqdm

        return tqdm(items, total=total, unit="file", desc="indexing", file=sys.stderr)

    def on_error(path: str, msg: str) -> None:
        print(f"edge-retrieval index: skipped {path}: {msg}", file=sys.stderr)

    with ArchiveIndex(out, create=True, migrate=args.migrate) as index:
        report = index_folder(args.dir, bundle, index, threads=args.threads, site=args.site,
                              progress=progress, on_error=on_error, workers=args.workers, cluster=args.cluster)
        stats = index.stats()
    print(
        f"index {out}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.pruned} removed, {len(report.failed)} failed; {report.windows} new windows; "
        f"total {stats['files']} files, {stats['windows']} windows"
    )
    return 1 if report.failed and not (report.added or report.updated or report.unchanged) else 0
