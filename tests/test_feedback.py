"""Feedback examples on the query message: wire form, signing, and the suppression rule in the
matcher, against a plain per-query reference (tiny ensemble bundle: a labels and an embedding expert)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_retrieval.errors import QueryRejected
from edge_retrieval.pipeline.feedback import MARGIN, MIN_NEGATIVE_SIMILARITY, TOP_LABELS, window_example
from edge_retrieval.pipeline.matcher import Matcher, compile_query
from edge_retrieval.protocol import (
    SCHEMA,
    Example,
    QueryMessage,
    encode_dense,
    encode_sparse,
    parse_query_message,
)


def _msg(bundle, qid: str, rng: np.random.Generator, negatives=(), positives=(), version: int = 1) -> QueryMessage:  # noqa: ANN001
    k = int(rng.integers(1, 4))
    return QueryMessage.model_validate({
        "schema": SCHEMA, "query_id": qid, "version": version, "text": qid, "space_id": bundle.manifest.space.id,
        "vectors": [encode_sparse("tones", rng.choice(4, k, replace=False), rng.random(k) + 0.1).model_dump(exclude_none=True),
                    encode_dense("bands", rng.standard_normal(4), "f32").model_dump(exclude_none=True)],
        "weights": [float(rng.random() + 0.1), float(rng.random() + 0.1)], "threshold": 0.3,
        "negatives": [e.model_dump(exclude_none=True) for e in negatives],
        "positives": [e.model_dump(exclude_none=True) for e in positives],
    })


def _window(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"tones": rng.random(4).astype(np.float32), "bands": rng.standard_normal(4).astype(np.float32)}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_suppression_equals_the_rule_per_query(tiny_ensemble) -> None:  # noqa: ANN001
    man = tiny_ensemble.manifest
    rng = np.random.default_rng(3)
    m = Matcher(man)
    examples: dict[str, tuple[list, list, object]] = {}
    for i in range(12):
        negs = [window_example(man, _window(rng), f"e{i}n{j}") for j in range(int(rng.integers(0, 4)))]
        poss = [window_example(man, _window(rng)) for _ in range(int(rng.integers(0, 3)))]
        q = compile_query(_msg(tiny_ensemble, f"q{i}", rng, negs, poss), man)
        m.add(q)
        examples[q.query_id] = (negs, poss, q)
    batch = [_window(rng) for _ in range(40)]
    vectors = {e: np.stack([w[e] for w in batch]) for e in ("tones", "bands")}
    snap = m.snapshot
    mask = snap.suppressed(vectors)
    assert mask is not None and mask.shape == (40, 12)
    for j, q in enumerate(snap.queries):
        negs, poss, _ = examples[q.query_id]
        for b, w in enumerate(batch):
            def sim(vecs: dict[str, np.ndarray], w: dict[str, np.ndarray] = w, q=q) -> float:  # noqa: ANN001
                return sum(q.weights[e] * _cos(w[e], vecs[e]) for e in ("tones", "bands"))

            dec = [{v.expert: v.dense(4) for v in ex.vectors} for ex in negs]
            pos = [{v.expert: v.dense(4) for v in ex.vectors} for ex in poss]
            anchor = {"tones": np.zeros(4, np.float32), "bands": q.dense["bands"]}
            anchor["tones"][q.sparse["tones"][0]] = q.sparse["tones"][1]
            want = bool(dec) and max(map(sim, dec)) >= snap.feedback.floor and \
                max(map(sim, dec)) > max(map(sim, [anchor, *pos])) + MARGIN
            assert mask[b, j] == want, (q.query_id, b)
    assert 0 < mask.sum() < mask.size  # the random draw exercised both outcomes


def test_the_same_window_is_suppressed_and_no_negatives_cost_nothing(tiny_ensemble) -> None:  # noqa: ANN001
    man = tiny_ensemble.manifest
    rng = np.random.default_rng(0)
    plain = compile_query(_msg(tiny_ensemble, "q", rng), man)
    m = Matcher(man)
    m.add(plain)
    w = _window(rng)
    vec = {e: v[None, :] for e, v in w.items()}
    assert m.snapshot.suppressed(vec) is None and not plain.anchor  # nothing built without negatives
    msg = _msg(tiny_ensemble, "q", np.random.default_rng(0), [window_example(man, w, "ev1")], version=2)
    assert m.add(compile_query(msg, man))
    assert m.snapshot.suppressed(vec)[0, 0]  # the marked window itself, heard again


def test_the_floor_is_the_bundles_tuned_one(tiny_ensemble, monkeypatch) -> None:  # noqa: ANN001
    """A space with a tuned ``feedback_floor`` (scripts/feedback_cv.py) suppresses from that cosine
    on; a space without one uses the built-in floor; a malformed value is one line naming it."""
    from edge_retrieval import defaults
    from edge_retrieval.errors import ConfigError

    man = tiny_ensemble.manifest
    rng = np.random.default_rng(5)
    neg_w = _window(rng)
    # windows moving away from the negative, towards one unlike it in both experts
    far = {"tones": np.eye(4, dtype=np.float32)[int(np.argmin(neg_w["tones"]))], "bands": -neg_w["bands"]}
    windows = [{e: (1 - t) * neg_w[e] + t * far[e] for e in far} for t in np.linspace(0, 1, 61)]
    vec = {e: np.stack([w[e] for w in windows]) for e in ("tones", "bands")}

    def suppressed(table: dict) -> tuple[float, np.ndarray]:
        monkeypatch.setattr(defaults, "tuned_table", lambda: table)
        m = Matcher(man)
        msg = _msg(tiny_ensemble, "q", np.random.default_rng(0), [window_example(man, neg_w, "ev1")])
        m.add(compile_query(msg, man))
        mask = m.snapshot.suppressed(vec)
        assert mask is not None
        return m.feedback_floor, mask[:, 0]

    floor, builtin = suppressed({})
    assert floor == MIN_NEGATIVE_SIMILARITY
    tuned_floor, tuned = suppressed({man.space.id: {"feedback_floor": 0.5}})
    assert tuned_floor == 0.5
    assert builtin[0] and tuned[0]  # the marked window itself either way
    assert tuned.sum() > builtin.sum() and not (builtin & ~tuned).any()  # a lower floor reaches further
    assert suppressed({"another space": {"feedback_floor": 0.5}})[0] == MIN_NEGATIVE_SIMILARITY
    for bad in (0, 1.5, "0.7", True):
        with pytest.raises(ConfigError, match="feedback_floor"):
            suppressed({man.space.id: {"feedback_floor": bad}})


def test_shipped_floors_were_chosen_on_dev() -> None:
    """Every tuned floor in the package data is in (0, 1] and carries the dev numbers it came from."""
    from edge_retrieval.defaults import feedback_floor, tuned_table

    floors = {sid: e for sid, e in tuned_table().items() if "feedback_floor" in e}
    assert floors, "no tuned feedback floor shipped"
    for sid, e in floors.items():
        assert feedback_floor(sid, MIN_NEGATIVE_SIMILARITY) == e["feedback_floor"]
        cv = e["feedback_cv"]
        assert cv["true_events"][1] >= cv["true_events"][0]  # the rule: no true event lost on dev
        assert cv["false_events"][1] <= cv["false_events"][0]


def test_wire_form_and_signatures(tiny_ensemble) -> None:  # noqa: ANN001
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_retrieval.protocol import sign_message, verify_signature

    man = tiny_ensemble.manifest
    rng = np.random.default_rng(1)
    plain = _msg(tiny_ensemble, "q", rng)
    assert b"negatives" not in plain.to_json() and b"negatives" not in plain.signing_bytes()
    ex = window_example(man, _window(rng), "ev1")
    tones = next(v for v in ex.vectors if v.expert == "tones")
    assert tones.encoding == "sparse" and len(tones.indices or []) <= TOP_LABELS
    assert next(v for v in ex.vectors if v.expert == "bands").encoding == "f16"
    key = Ed25519PrivateKey.generate()
    fb = sign_message(plain.model_copy(update={"negatives": [ex], "version": 2, "signature": None}), key)
    back = parse_query_message(fb.to_json())
    verify_signature(back, key.public_key())
    assert back.negatives[0].event_id == "ev1"
    tampered = back.model_copy(update={"negatives": []})
    with pytest.raises(QueryRejected, match="bad signature"):
        verify_signature(tampered, key.public_key())


def test_bad_examples_are_refused(tiny_ensemble) -> None:  # noqa: ANN001
    man = tiny_ensemble.manifest
    rng = np.random.default_rng(2)
    only_one = Example(vectors=[encode_dense("bands", rng.standard_normal(4), "f16")])
    with pytest.raises(QueryRejected, match="negative 0"):
        compile_query(_msg(tiny_ensemble, "q", rng, [only_one]), man)
    wrong_kind = Example(vectors=[encode_dense("tones", rng.random(4), "f16"), encode_dense("bands", rng.random(4), "f16")])
    with pytest.raises(QueryRejected, match="sparse"):
        compile_query(_msg(tiny_ensemble, "q", rng, [wrong_kind]), man)
