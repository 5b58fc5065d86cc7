"""Indexing across processes and machines: batches of files are embedded by workers, each writing
its own shard, which the one index writer then registers.

Local processes use ``concurrent.futures.ProcessPoolExecutor``; a cluster uses Dask distributed's
executor (``Client(address).get_executor()``), the same submit/as_completed interface. Workers
write shards straight into the index's ``shards/.incoming`` folder, so on several machines that
folder must be on a filesystem every worker sees at the same path (NFS, a cluster volume); the
bundle path must be readable by every worker too. Only file paths and small results travel.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, EdgeRetrievalError

if TYPE_CHECKING:
    from ..bundle import Bundle
    from .archive import ArchiveIndex, IndexReport

TASKS_PER_WORKER = 4  # batches per worker: balances uneven file lengths without tiny shards


@dataclass
class BatchResult:
    """What one worker task did: the shards it wrote and the files it could not read."""

    shards: list[str] = field(default_factory=list)
    windows: int = 0
    failed: list[tuple[str, int, int, str]] = field(default_factory=list)  # path, size, mtime_ns, message


def embed_batch(bundle_dir: str, items: Sequence[tuple[str, int, int]], root: str, site: str | None,
                incoming: str, experts: dict[str, dict[str, object]], threads: int = 1) -> BatchResult:
    """Worker task: embed ``items`` (path, size, mtime_ns) and write them as shard(s) under ``incoming``."""
    from ..bundle import load_bundle
    from .archive import recording_meta, shard_file
    from .retrieval import FileEmbedder
    from .shards import SHARD_WINDOWS, ShardBuilder

    bundle = load_bundle(bundle_dir, part="device")
    embedder = FileEmbedder(bundle, threads=threads)
    out = BatchResult()
    Path(incoming).mkdir(parents=True, exist_ok=True)
    builder = ShardBuilder(experts)
    for path, size, mtime in items:
        try:
            fv = embedder.embed_file(path)
        except EdgeRetrievalError as exc:
            out.failed.append((path, size, mtime, str(exc)))
            continue
        builder.add(shard_file(path, size, mtime, recording_meta(path, root, site), fv), fv.offsets_s, fv.vectors)
        out.windows += fv.n_windows
        if builder.n_windows >= SHARD_WINDOWS:
            out.shards.append(builder.write(incoming))
            builder = ShardBuilder(experts)
    if builder.files:
        out.shards.append(builder.write(incoming))
    return out


def batches(todo: Sequence[tuple[Path, int, int]], n: int) -> list[list[tuple[str, int, int]]]:
    """``todo`` in at most ``n`` batches of about equal bytes, each in path order."""
    n = max(1, min(n, len(todo)))
    bins: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    load = [0] * n
    for p, size, mtime in sorted(todo, key=lambda t: -t[1]):
        i = load.index(min(load))
        bins[i].append((str(p.resolve()), size, mtime))
        load[i] += size
    return [sorted(b) for b in bins if b]


def _executor(workers: int, cluster: str | None) -> tuple[cf.Executor, Callable[[], None]]:
    if cluster is None:
        ex = cf.ProcessPoolExecutor(max_workers=workers)
        return ex, ex.shutdown
    try:
        from distributed import Client
    except ImportError as exc:
        raise ImportError("--cluster needs Dask distributed: pip install 'edge-retrieval[scale]'") from exc
    try:
        client = Client(cluster, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--cluster {cluster!r}: no Dask scheduler answers there ({exc}); "
                          "expected tcp://HOST:PORT of a running scheduler") from exc
    ex = client.get_executor()

    def close() -> None:
        client.close()

    return ex, close


def index_in_parallel(todo: Sequence[tuple[Path, int, int]], root: Path, bundle: Bundle, index: ArchiveIndex,
                      report: IndexReport, threads: int = 1, site: str | None = None, workers: int = 2,
                      cluster: str | None = None, on_error: Callable[[str, str], None] | None = None) -> None:
    """Fan ``todo`` out to workers; register each shard as its task finishes (the index stays the
    one writer of its catalog). Fills ``report``."""
    from .archive import storage_of

    existed = {str(p.resolve()) for p, _, _ in todo if index.known(str(p.resolve()))}
    experts = storage_of(index.experts())
    ex, close = _executor(workers, cluster)
    n_tasks = (workers if cluster is None else max(workers, 2)) * TASKS_PER_WORKER
    try:
        futures = [ex.submit(embed_batch, str(bundle.root), b, str(root), site, str(index.incoming), experts, threads)
                   for b in batches(todo, n_tasks)]
        for fut in cf.as_completed(futures):
            res: BatchResult = fut.result()
            for name in res.shards:
                index.register(name)
            report.windows += res.windows
            for path, size, mtime, msg in res.failed:
                index.add_failure(path, size, mtime, msg)
                report.failed.append((path, msg))
                if on_error:
                    on_error(path, msg)
    finally:
        close()
    done = {p for p, _ in report.failed}
    for p, _, _ in todo:
        ap = str(p.resolve())
        if ap in done:
            continue
        if ap in existed:
            report.updated += 1
        else:
            report.added += 1
