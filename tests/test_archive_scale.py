"""Archive shards at scale: exact labels search equals the version-1 scan (after migration), the
IVF-PQ re-rank keeps recall, and indexing in processes or on a real Dask cluster finds the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.cli import main as cli
from edge_retrieval.errors import StoreError
from edge_retrieval.offline import shards as shards_mod
from edge_retrieval.offline.archive import ArchiveIndex, index_folder
from edge_retrieval.offline.archive_v1 import V1Index, _pack
from edge_retrieval.offline.retrieval import QueryVectors
from edge_retrieval.offline.shards import Shard, ShardBuilder, ShardFile
from tests.retrieval_bundle import band_query, make_bundle
from tests.test_archive import make_archive

SPACE = "s" * 64
DIM = 500


def _v1_archive(path: Path, rng: np.random.Generator, files: int = 120) -> None:
    """A version-1 index of random labels windows (skewed label popularity), dated, on two sites."""
    v1 = V1Index(path)
    with v1.db:
        for k, v in {"space_id": SPACE, "bundle_name": "random", "hop_s": "1.0",
                     "experts": json.dumps({"lab": {"kind": "top", "dim": DIM, "window_s": 3.0}})}.items():
            v1.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
    pop = 1.0 / np.arange(1, DIM + 1)
    pop /= pop.sum()
    for i in range(files):
        n = int(rng.integers(5, 40))
        v = np.zeros((n, DIM), np.float32)
        for r in range(n):
            cols = rng.choice(DIM, size=80, replace=False, p=pop)
            v[r, cols] = rng.random(80)
        start = 1.7e9 + i * 3600.0 if i % 5 else None
        v1.add_packed(f"/rec/{'ab'[i % 2]}/{i:04d}.wav", float(n), start, "ab"[i % 2],
                      np.arange(n, dtype=np.float64), {"lab": _pack(v, labels=True)})
    v1.close()


def _query(rng: np.random.Generator, nnz: int = 64) -> QueryVectors:
    q = np.zeros(DIM, np.float32)
    cols = rng.choice(DIM, size=nnz, replace=False)
    q[cols] = rng.dirichlet(np.ones(nnz))
    return QueryVectors("q", SPACE, ("lab",), (1.0,), (q,))


def test_v1_index_is_refused_then_migrated_and_search_equals_the_v1_scan(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    idx = tmp_path / "idx"
    idx.mkdir()
    _v1_archive(idx / "index.sqlite", rng)
    with pytest.raises(StoreError, match="version-1 index.*--migrate"):
        ArchiveIndex(idx)
    with ArchiveIndex(idx, migrate=True) as index:
        assert index.stats()["shards"] == 1 and index.stats()["files"] == 120
    old = V1Index(idx / "index.v1.sqlite")
    with ArchiveIndex(idx) as index:
        for j in range(12):
            q = _query(rng, nnz=64 if j % 2 else 7)
            filt = [{}, {"site": "b"}, {"since": 1.7e9 + 20 * 3600 + 3, "until": 1.7e9 + 70 * 3600}][j % 3]
            want = old.search(q, top=15, **filt)
            got = index.search(q, top=15, cosine=False, **filt)  # the v1 index ranked by the dot
            assert [(h.path, h.offset_s) for h in got] == [(p, o) for _, p, o, _, _ in want]
            assert np.allclose([h.score for h in got], [s for s, *_ in want], atol=1e-5)
            assert all(h.site == "b" for h in got) or "site" not in filt
    old.close()


def test_posting_lists_hold_each_windows_top_k_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    v = rng.random((30, 200)).astype(np.float32)
    b = ShardBuilder({"lab": {"kind": "top", "dim": 200, "k": 64}})
    b.add(ShardFile("/x.wav", 1, 1, 30.0, 8000, None, None, None, 30), np.arange(30.0), {"lab": v})
    s = Shard(tmp_path / b.write(tmp_path))
    for r in range(30):
        q = np.zeros(200, np.float32)
        top = np.argsort(-v[r])[:64]
        q[top[0]] = 1.0
        # a one-label query scores each window by its stored probability of that label (0 outside its top 64)
        got = s.labels_scores("lab", q)
        want = np.where((np.argsort(-v, axis=1)[:, :64] == top[0]).any(axis=1), v[:, top[0]], 0.0)
        assert np.allclose(got, want, atol=1e-3)


def test_ivfpq_candidates_reranked_exactly_keep_recall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    n, d = 60_000, 64
    centres = rng.normal(size=(200, d))
    v = centres[rng.integers(0, 200, n)] + 0.4 * rng.normal(size=(n, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    b = ShardBuilder({"emb": {"kind": "dense", "dim": d, "k": d}})
    b.add_windows(ShardFile("/x.wav", 1, 1, float(n), 8000, None, None, None, n), np.arange(float(n)),
                  top={}, dense={"emb": v.astype(np.float16)})
    s = Shard(tmp_path / b.write(tmp_path))
    assert s.has_ann("emb")
    exact_all = v.astype(np.float16).astype(np.float32)
    recalls = []
    for _ in range(20):
        q = (v[rng.integers(n)] + 0.2 * rng.normal(size=d)).astype(np.float32)
        q /= np.linalg.norm(q)
        want = set(np.argsort(-(exact_all @ q))[:10])
        got = shards_mod.search_shards([s], [None], ("emb",), (q,), (1.0,), 10)
        recalls.append(len(want & {c.row for c in got}) / 10)
        # scores are exact inner products of the stored float16 rows, not PQ estimates
        assert np.allclose([c.score for c in got], exact_all[[c.row for c in got]] @ q, atol=1e-5)
        mask = np.zeros(n, bool)
        mask[::3] = True
        assert all(c.row % 3 == 0 for c in shards_mod.search_shards([s], [mask], ("emb",), (q,), (1.0,), 10))
    assert np.mean(recalls) >= 0.9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(make_bundle(tmp_path_factory.mktemp("b") / "labels", "labels"))


def _hits(idx: Path, bundle: Bundle) -> list[tuple[str, float, float]]:
    with ArchiveIndex(idx) as index:
        return [(h.path, h.offset_s, round(h.score, 6)) for k in (2, 6, 10, 13)
                for h in index.search(band_query(bundle.manifest, k), top=5)]


def test_workers_and_a_dask_cluster_index_the_same_as_one_process(tmp_path: Path, bundle: Bundle) -> None:
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    root = tmp_path / "archive"
    make_archive(root)
    make_archive(root / "more")
    with ArchiveIndex(tmp_path / "one", create=True) as index:
        r1 = index_folder(root, bundle, index)
    assert cli(["index", str(root), "--bundle", str(bundle.root), "--out", str(tmp_path / "procs"),
                "--workers", "2", "--quiet"]) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with ArchiveIndex(tmp_path / "dask", create=True) as index:
            r3 = index_folder(root, bundle, index, cluster=cluster.scheduler_address)
    assert (r1.added, r1.windows) == (r3.added, r3.windows) == (8, 24)
    one = _hits(tmp_path / "one", bundle)
    assert one == _hits(tmp_path / "procs", bundle) == _hits(tmp_path / "dask", bundle)
    with ArchiveIndex(tmp_path / "dask") as index:
        assert index.stats()["shards"] >= 2 and not list(index.incoming.glob("*"))


def test_threshold_algorithm_equals_a_full_scan_over_several_shards(tmp_path: Path) -> None:
    """Skewed label popularity (as BirdNET's top-64), lists read only in part: same rows, same scores."""
    rng = np.random.default_rng(4)
    pop = 1.0 / np.arange(1, DIM + 1) ** 1.2
    pop /= pop.sum()
    shards = []
    for s in range(3):
        n = 20_000
        idx = np.stack([rng.choice(DIM, 64, replace=False, p=pop) for _ in range(n)]).astype(np.uint16)
        p = rng.beta(0.5, 3.0, (n, 64)).astype(np.float16)
        b = ShardBuilder({"lab": {"kind": "top", "dim": DIM, "k": 64}})
        b.add_windows(ShardFile(f"/{s}.wav", 1, 1, float(n), 8000, None, None, None, n), np.arange(float(n)),
                      top={"lab": (idx, p)}, dense={})
        shards.append(Shard(tmp_path / b.write(tmp_path)))
    for j in range(20):
        q = _query(rng, nnz=64 if j % 2 else 5).vectors[0]
        masks = [None] * 3 if j % 10 < 5 else [rng.random(20_000) < 0.3 for _ in range(3)]
        cosine = j >= 10  # search's default ranking: the cosine's own bound
        got = shards_mod.search_shards(shards, masks, ("lab",), (q,), (1.0,), 10, cosine=cosine)[:10]
        full = []
        for si, (sh, m) in enumerate(zip(shards, masks, strict=True)):
            sc = sh.labels_scores("lab", q)
            if cosine:
                sc = sc / (sh.row_norms("lab") * np.linalg.norm(q))
            full.extend((float(sc[r]), si, int(r)) for r in range(sh.n) if m is None or m[r])
        full.sort(key=lambda t: (-t[0], t[1], t[2]))
        assert [(c.shard, c.row) for c in got] == [(si, r) for _, si, r in full[:10]]
        assert np.allclose([c.score for c in got], [sc for sc, _, _ in full[:10]], atol=1e-5)


def test_a_window_listing_a_label_twice_is_refused(tmp_path: Path) -> None:
    """The threshold algorithm's bound counts each label once per window; a top-k never repeats one."""
    idx = np.tile(np.arange(64, dtype=np.uint16), (3, 1))
    idx[1, 5] = idx[1, 9]
    b = ShardBuilder({"lab": {"kind": "top", "dim": DIM, "k": 64}})
    with pytest.raises(StoreError, match="twice"):
        b.add_windows(ShardFile("/x.wav", 1, 1, 3.0, 8000, None, None, None, 3), np.arange(3.0),
                      top={"lab": (idx, np.full((3, 64), 0.5, np.float16))}, dense={})


def test_window_scores_and_cosine_search_over_shards_equal_a_numpy_reference(tmp_path: Path) -> None:
    """Temporal search and search by example read every window of the selected files from the
    shards: same files, window order, date mask and scores as numpy over each window's top-64."""
    rng = np.random.default_rng(7)
    idx = tmp_path / "idx"
    idx.mkdir()
    v1 = V1Index(idx / "index.sqlite")
    with v1.db:
        for k, v in {"space_id": SPACE, "bundle_name": "random", "hop_s": "1.0",
                     "experts": json.dumps({"lab": {"kind": "top", "dim": DIM, "window_s": 3.0}})}.items():
            v1.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
    ref: dict[str, tuple[np.ndarray, float | None, str]] = {}
    for i in range(30):
        n = int(rng.integers(3, 20))
        v = np.zeros((n, DIM), np.float32)
        for r in range(n):
            v[r, rng.choice(DIM, size=80, replace=False)] = rng.random(80)
        top = np.argsort(-v, axis=1, kind="stable")[:, :64]
        kept = np.zeros_like(v)
        np.put_along_axis(kept, top, np.take_along_axis(v, top, axis=1).astype(np.float16).astype(np.float32), axis=1)
        path, start, site = f"/rec/{i:03d}.wav", (1.7e9 + i * 60.0 if i % 4 else None), "ab"[i % 2]
        ref[path] = (kept, start, site)
        v1.add_packed(path, float(n), start, site, np.arange(n, dtype=np.float64), {"lab": _pack(v, labels=True)})
    v1.close()
    queries = [_query(rng), _query(rng, nnz=5)]
    since, until = 1.7e9 + 5 * 60.0 + 2, 1.7e9 + 20 * 60.0
    with ArchiveIndex(idx, migrate=True) as index:
        for cosine in (False, True):
            for filt in ({}, {"site": "b"}, {"since": since, "until": until}):
                got = list(index.window_scores(queries, cosine=cosine, **filt))
                want = [p for p, (_, start, site) in ref.items()
                        if filt.get("site", site) == site and ("since" not in filt or (
                            start is not None and start + 20 >= since and start < until))]
                assert sorted(fs.path for fs in got) == sorted(want)
                for fs in got:
                    kept, start, _ = ref[fs.path]
                    assert np.array_equal(fs.offsets, np.arange(kept.shape[0], dtype=np.float64))
                    for j, q in enumerate(queries):
                        s = kept @ q.vectors[0]
                        if cosine:
                            s = s / (np.linalg.norm(kept, axis=1) * np.linalg.norm(q.vectors[0]))
                        assert np.allclose(fs.scores[:, j], s, atol=1e-4)
                    if "since" in filt:
                        t = start + fs.offsets
                        assert np.array_equal(fs.keep, (t >= since) & (t < until))
            hits = index.search(queries[0], top=5, cosine=True)
            every = sorted(((float(fs.scores[i, 0]), fs.path, float(fs.offsets[i]))
                            for fs in index.window_scores(queries[:1], cosine=True) for i in range(fs.offsets.size)),
                           key=lambda t: (-t[0], t[1], t[2]))
            assert [(h.path, h.offset_s) for h in hits] == [(p, o) for _, p, o in every[:5]]


def test_cosine_ranks_the_window_most_about_the_query_first(tmp_path: Path) -> None:
    """Text search ranks by cosine (issue 11's archive queries, chosen on the dev archive): a window
    loud on the query's label *and* on everything else (a chainsaw for "engine") loses to one that
    holds mostly the query's label; the dot product (detection's score) ranks them the other way.
    Both rankings equal numpy over each window's stored top-64."""
    rng = np.random.default_rng(3)
    n = 200
    idx = np.stack([rng.choice(np.arange(1, DIM), 64, replace=False) for _ in range(n)]).astype(np.uint16)
    p = (0.05 * rng.random((n, 64))).astype(np.float16)
    idx[0, 0], p[0, 0], p[0, 1:] = 0, 0.9, 0.8   # loud on label 0 and on 63 others
    idx[1, 0], p[1, 0] = 0, 0.5                  # mostly label 0
    b = ShardBuilder({"lab": {"kind": "top", "dim": DIM, "k": 64}})
    b.add_windows(ShardFile("/a.wav", 1, 1, float(n), 8000, None, None, None, n), np.arange(float(n)),
                  top={"lab": (idx, p)}, dense={})
    shard = Shard(tmp_path / b.write(tmp_path))
    q = np.zeros(DIM, np.float32)
    q[[0, int(idx[5, 3])]] = [0.9, 0.1]
    dense = np.zeros((n, DIM), np.float32)
    np.put_along_axis(dense, idx.astype(np.int64), p.astype(np.float32), axis=1)
    dot = dense @ q
    cos = dot / (np.linalg.norm(dense, axis=1) * np.linalg.norm(q))
    for cosine, ref in ((False, dot), (True, cos)):
        got = shards_mod.search_shards([shard], [None], ("lab",), (q,), (1.0,), 5, cosine=cosine)[:5]
        assert [c.row for c in got] == list(np.argsort(-ref, kind="stable")[:5])
        assert np.allclose([c.score for c in got], np.sort(ref)[::-1][:5], atol=1e-3)
    assert np.argmax(dot) == 0 and np.argmax(cos) == 1
