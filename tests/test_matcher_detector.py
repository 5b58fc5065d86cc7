"""Matcher and detector, pure numpy: scoring paths, query checks, N of M, hysteresis, cooldown,
merging, background adaptation and policy precedence."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest

from edge_retrieval.errors import QueryRejected
from edge_retrieval.pipeline.detector import WARMUP, ActiveEvent, Detector, Transition
from edge_retrieval.pipeline.matcher import CompiledQuery, Matcher, compile_query
from edge_retrieval.policy import DetectionPolicy, PolicyOverlay, resolve
from edge_retrieval.protocol import SCHEMA, QueryMessage, encode_dense, encode_sparse, new_event_id


def cq(qid: str = "q", thr: float = 0.5, policy: PolicyOverlay | None = None, version: int = 1) -> CompiledQuery:
    return CompiledQuery(qid, version, qid, thr, policy, {"e": 1.0}, {}, {"e": (np.array([0]), np.array([1.0], np.float32))})


def run(det: Detector, queries: list[CompiledQuery], scores: list[float | None], step: float = 1.0):
    """Feed one query's score stream; return (onsets, finals) as lists of ActiveEvent."""
    onsets, finals = [], []
    for k, s in enumerate(scores):
        row = None if s is None else np.array([s] * len(queries), np.float32)
        for tr in det.step(queries, k * step, k * step + step, row):
            (finals if tr.final else onsets).append(tr.event)
    for tr in det.flush():
        finals.append(tr.event)
    return onsets, finals


NOADAPT = PolicyOverlay(adapt=False, cooldown_s=0, hysteresis=0)


def test_single_hits_merge_into_one_event_with_start_end_and_peak() -> None:
    det = Detector(NOADAPT)
    onsets, finals = run(det, [cq()], [0.1, 0.6, 0.9, 0.7, 0.2, 0.1])
    assert len(onsets) == 1 and len(finals) == 1
    ev = finals[0]
    assert (ev.start_s, ev.end_s) == (1.0, 4.0)
    assert ev.peak == pytest.approx(0.9)
    assert onsets[0].event_id == ev.event_id


def test_n_of_m_needs_enough_hits_and_starts_at_the_first() -> None:
    pol = PolicyOverlay(adapt=False, cooldown_s=0, hysteresis=0, min_hits=2, of_windows=3)
    # isolated hits (further apart than 3 windows) never fire
    _, finals = run(Detector(pol), [cq()], [0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1])
    assert finals == []
    # two hits within three windows fire, starting at the first hit
    onsets, finals = run(Detector(pol), [cq()], [0.1, 0.9, 0.1, 0.9, 0.1, 0.1])
    assert len(onsets) == 1 and onsets[0].start_s == 1.0
    assert finals[0].end_s == 4.0


def test_hysteresis_keeps_an_event_on_below_threshold() -> None:
    scores = [0.6, 0.45, 0.41, 0.3, 0.1]
    _, tight = run(Detector(NOADAPT), [cq()], scores)
    assert [(e.start_s, e.end_s) for e in tight] == [(0.0, 1.0)]
    loose = PolicyOverlay(adapt=False, cooldown_s=0, hysteresis=0.1)
    _, finals = run(Detector(loose), [cq()], scores)
    assert [(e.start_s, e.end_s) for e in finals] == [(0.0, 3.0)]


def test_cooldown_suppresses_a_quick_repeat() -> None:
    scores = [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1]
    _, finals = run(Detector(NOADAPT), [cq()], scores)
    assert len(finals) == 3
    cool = PolicyOverlay(adapt=False, hysteresis=0, cooldown_s=4)
    _, finals = run(Detector(cool), [cq()], scores)
    # event 1 ends at 1 s: windows starting before 5 s cannot start another
    assert [e.start_s for e in finals] == [0.0, 8.0]


def test_gated_window_ends_an_event_and_does_not_count() -> None:
    _, finals = run(Detector(NOADAPT), [cq()], [0.9, 0.9, None, 0.9])
    assert [(e.start_s, e.end_s) for e in finals] == [(0.0, 2.0), (3.0, 4.0)]


def test_max_event_splits_a_long_event() -> None:
    pol = PolicyOverlay(adapt=False, cooldown_s=0, hysteresis=0, max_event_s=3)
    _, finals = run(Detector(pol), [cq()], [0.9] * 7)
    assert len(finals) >= 2
    assert all(e.end_s - e.start_s <= 4.0 for e in finals)
    assert finals[0].start_s == 0.0 and finals[-1].end_s == 7.0


def test_adaptation_suppresses_constant_noise_while_a_rise_fires() -> None:
    rng = np.random.default_rng(1)
    noise = list(0.5 + 0.02 * rng.standard_normal(60))  # BirdNET-like: woodpecker 0.5 on plain noise
    rise = [0.9, 0.92, 0.9]
    scores = noise + rise + noise[:20]
    # without adaptation the noise is one never-ending detection
    _, plain = run(Detector(PolicyOverlay(adapt=False, cooldown_s=0)), [cq(thr=0.3)], scores)
    assert len(plain) >= 1 and plain[0].start_s == 0.0 and plain[0].end_s > 50
    # with adaptation: at most one short event while the baseline is learnt, then only the rise
    det = Detector(PolicyOverlay(adapt=True, cooldown_s=0, adapt_margin=0.15))
    _, finals = run(det, [cq(thr=0.3)], scores)
    late = [e for e in finals if e.start_s >= WARMUP]
    early = [e for e in finals if e.start_s < WARMUP]
    assert len(early) <= 1 and all(e.end_s <= WARMUP + 3 for e in early)
    assert [(e.start_s, e.end_s) for e in late] == [(60.0, 63.0)]
    assert 0.45 < det.baseline("q") < 0.6


def test_a_first_short_sound_does_not_poison_the_baseline() -> None:
    det = Detector(PolicyOverlay(adapt=True, cooldown_s=0, hysteresis=0.05))
    _, finals = run(det, [cq(thr=0.5)], [None] * 4 + [0.95, 0.95, 0.95] + [None] * 3 + [0.1] * 10)
    assert [(e.start_s, e.end_s) for e in finals] == [(4.0, 7.0)]


def test_adaptation_baseline_ignores_the_detections() -> None:
    det = Detector(PolicyOverlay(adapt=True, cooldown_s=0, adapt_margin=0.1, adapt_quantile=0.9))
    scores = [0.1] * 20 + [0.9] * 30 + [0.1] * 5 + [0.9] * 3
    _, finals = run(det, [cq(thr=0.5)], scores)
    # the long detection does not raise the baseline, so the second burst still fires
    assert [(e.start_s, e.end_s) for e in finals] == [(20.0, 50.0), (55.0, 58.0)]


def test_policy_precedence_query_over_default_over_builtin() -> None:
    det = Detector(PolicyOverlay(cooldown_s=7, min_hits=2, of_windows=4))
    own = cq(policy=PolicyOverlay(min_hits=3))
    p = det.policy_for(own)
    assert p.min_hits == 3  # the query's own
    assert p.of_windows == 4 and p.cooldown_s == 7  # the device default
    assert p.adapt_quantile == 0.95  # built-in
    assert det.policy_for(cq()).min_hits == 2


def test_removed_query_closes_its_event() -> None:
    det = Detector(NOADAPT)
    q = cq()
    det.step([q], 0, 1, np.array([0.9], np.float32))
    out = det.step([], 1, 2, np.zeros(0, np.float32))
    assert len(out) == 1 and out[0].final and out[0].event.end_s == 1.0


# --------------------------------------------------------------------------- matcher


def _msg(bundle, vectors, weights=None, threshold=0.5, qid="q", version=1, **kw) -> QueryMessage:
    return QueryMessage.model_validate(
        {
            "schema": SCHEMA,
            "query_id": qid,
            "version": version,
            "text": "test",
            "space_id": kw.pop("space_id", bundle.manifest.space.id),
            "vectors": [v.model_dump(exclude_none=True) for v in vectors],
            "weights": weights or [1.0 / len(vectors)] * len(vectors),
            "threshold": threshold,
            **kw,
        }
    )


def test_sparse_gather_equals_dense_product(tiny_bundle) -> None:
    rng = np.random.default_rng(0)
    m = Matcher(tiny_bundle.manifest)
    dense_q = []
    for i in range(5):
        idx = rng.choice(4, size=rng.integers(1, 5), replace=False)
        w = rng.random(idx.size) + 0.1
        m.add(compile_query(_msg(tiny_bundle, [encode_sparse("tones", idx, w)], qid=f"q{i}"), tiny_bundle.manifest))
        d = np.zeros(4)
        d[idx] = w / w.sum()
        dense_q.append(d)
    p = rng.random((7, 4)).astype(np.float32)
    snap, s = m.score({"tones": p})
    assert s.shape == (7, 5)
    np.testing.assert_allclose(s, p @ np.stack(dense_q, axis=1), rtol=1e-5)
    assert snap.experts["tones"].index is not None and snap.experts["tones"].index.size <= 4


def test_ensemble_scores_are_the_weighted_sum(tiny_ensemble) -> None:
    man = tiny_ensemble.manifest
    emb = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    msg = _msg(
        tiny_ensemble,
        [encode_sparse("tones", np.array([1]), np.array([1.0])), encode_dense("bands", emb, "f16")],
        weights=[3.0, 1.0],
    )
    m = Matcher(man)
    m.add(compile_query(msg, man))
    p = np.array([[0.2, 0.8, 0.0, 0.0]], np.float32)
    e = np.array([[0.6, 0.8, 0.0, 0.0]], np.float32)
    _, s = m.score({"tones": p, "bands": e})
    assert s[0, 0] == pytest.approx(0.75 * 0.8 + 0.25 * 0.8, rel=1e-3)


def test_versions_replays_and_removal(tiny_bundle) -> None:
    man = tiny_bundle.manifest
    m = Matcher(man)
    v = [encode_sparse("tones", np.array([0]), np.array([1.0]))]
    assert m.add(compile_query(_msg(tiny_bundle, v, version=2), man))
    assert not m.add(compile_query(_msg(tiny_bundle, v, version=1, threshold=0.1), man))
    assert m.get("q").threshold == 0.5
    assert m.remove("q", version=3)
    assert not m.add(compile_query(_msg(tiny_bundle, v, version=2), man))  # replay of an old version
    assert m.add(compile_query(_msg(tiny_bundle, v, version=4), man))


def test_scoring_while_queries_change_is_consistent(tiny_bundle) -> None:
    man = tiny_bundle.manifest
    m = Matcher(man)
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            q = compile_query(_msg(tiny_bundle, [encode_sparse("tones", np.array([i % 4]), np.array([1.0]))],
                                   qid=f"q{i % 7}", version=i), man)
            m.add(q)
            if i % 3 == 0:
                m.remove(f"q{(i + 2) % 7}")

    t = threading.Thread(target=churn)
    t.start()
    try:
        p = np.random.default_rng(0).random((4, 4)).astype(np.float32)
        for _ in range(300):
            snap, s = m.score({"tones": p})
            assert s.shape == (4, len(snap.queries))
    except BaseException as exc:  # pragma: no cover - reported below
        errors.append(exc)
    finally:
        stop.set()
        t.join()
    assert not errors


@pytest.mark.parametrize(
    "case, expect",
    [
        ("space", "space id"),
        ("unknown_expert", "unknown expert"),
        ("dense_for_labels", "needs a 'sparse' vector"),
        ("index_range", "out of range"),
        ("threshold", "threshold"),
        ("deleted", "deletion"),
    ],
)
def test_compile_query_rejections(tiny_bundle, case: str, expect: str) -> None:
    man = tiny_bundle.manifest
    good = encode_sparse("tones", np.array([1]), np.array([1.0]))
    kw: dict = {}
    vecs = [good]
    if case == "space":
        kw["space_id"] = "0" * 64
    elif case == "unknown_expert":
        vecs = [encode_sparse("nope", np.array([1]), np.array([1.0]))]
    elif case == "dense_for_labels":
        vecs = [encode_dense("tones", np.ones(4, np.float32))]
    elif case == "index_range":
        vecs = [encode_sparse("tones", np.array([9]), np.array([1.0]))]
    elif case == "threshold":
        kw["threshold"] = -0.5  # labels scores are in [0, 1]
    if case == "deleted":
        msg = QueryMessage.model_validate({"schema": SCHEMA, "query_id": "q", "version": 2, "deleted": True})
    else:
        msg = _msg(tiny_bundle, vecs, **kw)
    with pytest.raises(QueryRejected, match=expect):
        compile_query(msg, man)


def test_compile_query_rejects_dimension_and_missing_expert(tiny_ensemble) -> None:
    man = tiny_ensemble.manifest
    sp = encode_sparse("tones", np.array([1]), np.array([1.0]))
    with pytest.raises(QueryRejected, match="no vector for expert"):
        compile_query(_msg(tiny_ensemble, [sp]), man)
    with pytest.raises(QueryRejected, match="bytes, expected|dimension"):
        compile_query(_msg(tiny_ensemble, [sp, encode_dense("bands", np.ones(7, np.float32))]), man)
    with pytest.raises(QueryRejected, match="needs an 'f16' or 'f32'"):
        compile_query(_msg(tiny_ensemble, [sp, encode_sparse("bands", np.array([0]), np.array([1.0]))]), man)


# --------------------------------------------------------------------------- vectorised = reference


class _RefDetector:
    """The straightforward per-query detector (the implementation before vectorisation): the
    reference the vectorised one must match transition for transition."""

    @dataclass
    class _State:
        query: CompiledQuery
        policy: DetectionPolicy
        recent: deque  # (hit, start_s, end_s, raw), last of_windows
        history: deque  # non-detection scores, last adapt_windows
        active: ActiveEvent | None = None
        cooldown_until: float = float("-inf")
        baseline: float = 0.0

    def __init__(self, default_policy: PolicyOverlay | None = None) -> None:
        self.default_policy = default_policy
        self._states: dict[str, _RefDetector._State] = {}

    def _state(self, q: CompiledQuery, out: list[Transition]) -> _RefDetector._State:
        st = self._states.get(q.query_id)
        if st is not None and st.query is q:
            return st
        if st is not None and st.active is not None:
            out.append(self._close(st))
        p = resolve(q.policy, self.default_policy)
        new = self._State(q, p, deque(maxlen=p.of_windows), deque(maxlen=p.adapt_windows))
        if st is not None and st.query.text == q.text and st.policy == p:
            new.history.extend(st.history)
        self._states[q.query_id] = new
        return new

    def step(self, queries, start_s: float, end_s: float, scores) -> list[Transition]:
        keep = {q.query_id for q in queries}
        out: list[Transition] = []
        for qid in [k for k in self._states if k not in keep]:
            st = self._states.pop(qid)
            if st.active is not None:
                out.append(self._close(st))
        for i, q in enumerate(queries):
            st = self._state(q, out)
            self._one(st, start_s, end_s, None if scores is None else float(scores[i]), out)
        return out

    def _one(self, st, start_s: float, end_s: float, raw: float | None, out: list[Transition]) -> None:
        p, thr = st.policy, st.query.threshold
        base = float(np.quantile(st.history, p.adapt_quantile)) if p.adapt and st.history else 0.0
        st.baseline = base
        hit = stay = False
        if raw is not None:
            adapted = raw - base
            hit = raw >= thr and (not p.adapt or adapted >= p.adapt_margin)
            stay = raw >= thr - p.hysteresis and (not p.adapt or adapted >= max(0.0, p.adapt_margin - p.hysteresis))
        ev = st.active
        if ev is not None:
            if stay and raw is not None:
                if end_s - ev.start_s > p.max_event_s:
                    out.append(self._close(st))
                    self._open(st, start_s, end_s, raw, out)
                else:
                    ev.end_s, ev.peak = end_s, max(ev.peak, raw)
                    ev.windows += 1
            else:
                out.append(self._close(st))
        else:
            counted = hit and start_s >= st.cooldown_until
            st.recent.append((counted, start_s, end_s, raw if raw is not None else 0.0))
            hits = [r for r in st.recent if r[0]]
            if len(hits) >= p.min_hits:
                self._open(st, hits[0][1], end_s, max(r[3] for r in hits), out)
        if raw is not None and raw == raw:  # a NaN (suppressed window) leaves the baseline alone
            ev = st.active
            if (not hit and ev is None) or (ev is not None and len(st.history) < WARMUP and ev.windows > WARMUP):
                st.history.append(raw)

    def _open(self, st, start_s: float, end_s: float, peak: float, out: list[Transition]) -> None:
        st.active = ActiveEvent(new_event_id(), st.query.query_id, st.query.text, start_s, end_s, peak)
        st.recent.clear()
        out.append(Transition(st.active, final=False))

    def _close(self, st) -> Transition:
        ev = st.active
        ev.final = True
        st.active = None
        st.recent.clear()
        st.cooldown_until = ev.end_s + st.policy.cooldown_s
        return Transition(ev, final=True)

    def flush(self) -> list[Transition]:
        return [self._close(st) for st in self._states.values() if st.active is not None]

    def baseline(self, query_id: str) -> float:
        st = self._states.get(query_id)
        return st.baseline if st else 0.0

    def active_count(self) -> int:
        return sum(1 for st in self._states.values() if st.active is not None)


def _random_overlay(rng: np.random.Generator) -> PolicyOverlay | None:
    """A partial policy with a random subset of fields set (None: no policy of its own)."""
    if rng.random() < 0.3:
        return None
    m = int(rng.integers(1, 5))
    fields = {
        "min_hits": int(rng.integers(1, m + 1)), "of_windows": m,
        "hysteresis": float(rng.choice([0.0, 0.03, 0.1])), "cooldown_s": float(rng.choice([0.0, 1.0, 3.0])),
        "max_event_s": float(rng.choice([2.0, 5.0, 300.0])), "adapt": bool(rng.random() < 0.7),
        "adapt_quantile": float(rng.choice([0.5, 0.9, 0.95])), "adapt_windows": int(rng.choice([4, 5, 9, 30])),
        "adapt_margin": float(rng.choice([0.0, 0.05, 0.15])),
    }
    keys = [k for k in fields if rng.random() < 0.6]
    if ("min_hits" in keys) != ("of_windows" in keys):  # keep N <= M whatever the other layer says
        keys = [k for k in keys if k not in ("min_hits", "of_windows")]
    return PolicyOverlay(**{k: fields[k] for k in keys})


def _snap(trs: list[Transition], ids: dict[str, int]) -> list[tuple]:
    """Transitions as comparable tuples, taken at once (open events change later); event ids
    become the order of their first appearance (they are random)."""
    return [(ids.setdefault(t.event.event_id, len(ids)), t.final, t.event.query_id, t.event.query,
             float(t.event.start_s), float(t.event.end_s), float(t.event.peak), t.event.windows) for t in trs]


@pytest.mark.parametrize("seed, mixed", [(s, True) for s in range(5)] + [(5, False)])
def test_vectorised_detector_equals_the_per_query_reference(seed: int, mixed: bool) -> None:
    """Mixed policies (one ring length per query), or one policy for all (one 2-D ring block)."""
    rng = np.random.default_rng(seed)
    default = _random_overlay(rng) if mixed else PolicyOverlay(adapt_windows=6, hysteresis=0.05, cooldown_s=1)
    if default is not None and default.of_windows is None:  # query overlays set N and M together
        default = default.model_copy(update={"min_hits": None})
    det, ref = Detector(default), _RefDetector(default)
    live: dict[str, CompiledQuery] = {}
    level: dict[str, float] = {}
    n_new = 0

    def add(qid: str, text: str | None = None) -> None:
        old = live.get(qid)
        pol = old.policy if old is not None and rng.random() < 0.5 else _random_overlay(rng) if mixed else None
        live[qid] = CompiledQuery(qid, (old.version + 1) if old else 1, text or qid, float(rng.uniform(0.3, 0.7)),
                                  pol, {"e": 1.0}, {}, {})
        level[qid] = float(rng.uniform(0.1, 0.6))

    for _ in range(25):
        add(f"q{n_new}")
        n_new += 1
    ids_a: dict[str, int] = {}
    ids_b: dict[str, int] = {}
    hits = 0
    for k in range(400):
        r = rng.random()
        if r < 0.03:  # a new query
            add(f"q{n_new}")
            n_new += 1
        elif r < 0.06 and live:  # removed
            live.pop(str(rng.choice(sorted(live))))
        elif r < 0.09 and live:  # replaced: same text (keeps its history if the policy matches) or new text
            qid = str(rng.choice(sorted(live)))
            add(qid, qid if rng.random() < 0.7 else qid + "!")
        qs = list(live.values())
        if k % 2:
            qs = tuple(qs)  # the daemon passes the snapshot tuple; scenes a list
        if rng.random() < 0.05:
            row = None
        else:
            lv = np.array([level[q.query_id] for q in qs])
            row = lv + 0.08 * rng.standard_normal(len(qs))
            burst = rng.random(len(qs)) < 0.06
            row[burst] += rng.uniform(0.2, 0.6, int(burst.sum()))
            if rng.random() < 0.02 and len(qs):
                row[rng.integers(len(qs))] = np.nan  # suppressed by feedback: a miss, baseline untouched
            row = row.astype(np.float32)
        start = k * 1.0
        a, b = _snap(det.step(qs, start, start + 3.0, row), ids_a), _snap(ref.step(qs, start, start + 3.0, row), ids_b)
        assert a == b, f"window {k}"
        hits += len(a)
        assert det.active_count() == ref.active_count()
        for q in qs:
            x, y = det.baseline(q.query_id), ref.baseline(q.query_id)
            assert x == y or (np.isnan(x) and np.isnan(y)), (k, q.query_id)
    assert _snap(det.flush(), ids_a) == _snap(ref.flush(), ids_b)
    assert hits > 20  # the streams did exercise onsets, merges and ends
