"""Label bridge on the default bundle: text -> sparse weights over BirdNET's 6,522 labels + groups."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle
from edge_retrieval.text import QueryBuilder, Resolution
from edge_retrieval.text.label_bridge import hierarchical_weights, softmax_weights
from tests.fixtures_bundles import blocker_prelude

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def qb(birdnet_bundle: Bundle) -> QueryBuilder:
    return QueryBuilder(birdnet_bundle)


def _res(qb: QueryBuilder, text: str) -> Resolution:
    (r,) = qb.resolve(text)
    return r


def _weights(r: Resolution) -> dict[str, float]:
    names = [n for n, _ in r.top]
    return dict(zip(names, [w for _, w in r.top], strict=True))


@pytest.fixture(scope="module")
def kind_of(birdnet_bundle: Bundle) -> dict[str, str]:
    """Display name -> kind, from the bundle's label texts."""
    path = birdnet_bundle.path(birdnet_bundle.manifest.server.text[0].params["label_texts"])
    with open(path, newline="", encoding="utf-8") as f:
        return {(r["label"].partition("_")[2] or r["label"]): r["kind"] for r in csv.DictReader(f)}


def test_generic_bird_query_goes_to_the_bird_group(qb: QueryBuilder) -> None:
    for text in ("bird singing", "birds chirping"):
        r = _res(qb, text)
        assert r.top[0][0] == "Any bird" and r.top[0][1] > 0.5, (text, r.top[:5])
        assert r.extra["kind_mass"]["bird"] > 0.99 and r.warning is None


def test_car_horn_goes_to_a_vehicle_not_to_hornbills(qb: QueryBuilder, kind_of: dict[str, str]) -> None:
    r = _res(qb, "car horn")
    # the 64-slot vector fills its tail from the next kinds (hornbills at ~1e-5 each): what counts
    # is that no bird carries weight
    assert not any(kind_of[name] == "bird" and w >= 1e-3 for name, w in r.top[:5]), r.top[:5]
    assert r.extra["kind_mass"].get("bird", 0.0) < 1e-3
    assert r.extra["top_kind"] == "vehicle" and r.top[0][0] == "Engine"
    # the closest name is a hornbill: the warning says it was set aside as a word match
    assert r.warning is not None and "Hornbill" in r.warning and "word" in r.warning


def test_scream_goes_to_human_vocal(qb: QueryBuilder) -> None:
    for text in ("scream", "a person screaming"):
        r = _res(qb, text)
        assert r.top[0][0] == "Human vocal" and r.top[0][1] > 0.5, (text, r.top[:5])
        assert sum(w for n, w in r.top if "Screamer" in n) < 0.02, r.top[:5]


@pytest.mark.parametrize(
    ("text", "label"),
    [("chainsaw sound", "Power tools"), ("gunshot", "Gun"), ("dog barking", "Dog"), ("a dog barking", "Dog"),
     ("siren", "Siren"), ("fireworks", "Fireworks"), ("people talking", "Human vocal"), ("car engine", "Engine")],
)
def test_event_queries_land_on_their_class(qb: QueryBuilder, text: str, label: str) -> None:
    r = _res(qb, text)
    assert r.top[0][0] == label, r.top[:5]
    assert r.top[0][1] > 0.5 and r.warning is None


def test_dog_outranks_barking_owl_and_treefrog(qb: QueryBuilder) -> None:
    w = _weights(_res(qb, "a dog barking"))
    assert w["Dog"] > 10 * max(w.get("Barking Owl", 0.0), w.get("Barking Treefrog", 0.0))


def test_species_queries_still_reach_species(qb: QueryBuilder) -> None:
    for text, label in [("American robin", "American Robin"), ("spring peeper", "Spring Peeper"),
                        ("barred owl", "Barred Owl"), ("coyote", "Coyote")]:
        r = _res(qb, text)
        assert r.top[0][0] == label and r.warning is None, (text, r.top[:3], r.warning)


def test_vector_is_sparse_normalised_and_decodes(qb: QueryBuilder, birdnet_bundle: Bundle) -> None:
    n = birdnet_bundle.manifest.expert("birdnet").dim
    assert n > 6522  # the model's labels, then the group outputs
    for text in ("chainsaw sound", "crickets chirping at night", "robin song", "bird singing", "car horn"):
        v = _res(qb, text).vector
        assert v.encoding == "sparse" and 1 <= len(v.indices) <= 64 and max(v.indices) < n
        assert abs(sum(v.weights) - 1.0) < 1e-6 and all(w >= 0 for w in v.weights)
        dense = v.dense(n)
        assert dense.shape == (n,) and abs(dense.sum() - 1) < 1e-5
    msg, _ = qb.build("chainsaw sound", "chainsaw", threshold=0.3)
    assert msg.space_id == birdnet_bundle.manifest.space.id
    labels = birdnet_bundle.labels("birdnet")
    assert labels[msg.vectors[0].indices[0]] == "Power tools_Power tools"


def test_rain_never_silently_becomes_rain_quail(qb: QueryBuilder) -> None:
    r = _res(qb, "rain")
    if r.top[0][0] == "Rain Quail":
        assert r.warning is not None
    else:
        assert r.top[0][0] == "Environmental"
        assert _weights(r).get("Rain Quail", 0.0) < 0.05


def test_surface_word_match_warns(qb: QueryBuilder) -> None:
    r = _res(qb, "cicada")  # no cicada label; "Common Cicadabird" matches the word only
    if r.extra["top_kind"] == "bird":
        assert r.warning is not None and "insect" in r.warning
    else:  # the insect group ("cicadas" is one of its texts) takes it: no word match left to warn about
        assert r.top[0][0] == "Any insect" and r.extra["kind_mass"].get("bird", 0.0) < 1e-3, r.top[:3]
    for text in ("hammering", "wind"):
        r = _res(qb, text)
        assert r.extra["top_kind"] not in ("bird", "frog", "insect") or r.warning is not None, (text, r.top[:3])


def test_off_topic_text_warns_with_the_recorded_floor(qb: QueryBuilder, birdnet_bundle: Bundle) -> None:
    params = birdnet_bundle.manifest.server.text[0].params
    assert 0 < params["fit_floor"] < 1 and "off-topic" in params["fit_floor_basis"]
    assert 0.02 <= params["temperature"] <= 0.05 and 0 < params["kind_temperature"] <= 0.1
    assert "dev" in params["temperature_basis"]
    r = _res(qb, "spreadsheet formula for a quarterly budget")
    assert r.fit < params["fit_floor"] and r.warning is not None and "floor" in r.warning


def test_softmax_weights_keep_the_largest() -> None:
    sim = np.linspace(0, 1, 500).astype(np.float32)
    idx, w = softmax_weights(sim, 0.03, 64)
    assert len(idx) == 64 and idx[0] == 499 and np.all(np.diff(w) <= 0) and abs(w.sum() - 1) < 1e-12
    assert set(idx) == set(range(436, 500))
    idx, w = softmax_weights(sim[:10], 0.5, 64)
    assert len(idx) == 10


def test_hierarchical_weights_split_by_kind_then_label() -> None:
    # kind 0: one strong label and 200 weak ones; kind 1: one label; kind 2: no labels at all
    sim = np.concatenate([[0.9], np.full(200, 0.5), [0.6]]).astype(np.float32)
    kind = np.concatenate([np.zeros(201, np.int64), [1]])
    ksim = np.array([0.9, 0.9, 5.0], np.float32)  # equal kinds; the empty kind must get nothing
    idx, w = hierarchical_weights(sim, ksim, kind, 0.05, 0.03, 64)
    assert len(idx) == 64 and abs(w.sum() - 1) < 1e-12 and np.all(np.diff(w) <= 0)
    got = dict(zip(idx.tolist(), w.tolist(), strict=True))
    # p(kind) = 1/2 each; the lone label of kind 1 keeps its half although its cosine is lower
    assert abs(got[201] - 0.5) < 1e-3 and abs(got[0] - 0.5) < 1e-3
    ksim = np.array([0.9, 0.6, -1.0], np.float32)
    idx, w = hierarchical_weights(sim, ksim, kind, 0.05, 0.03, 3)
    assert idx[0] == 0 and len(idx) == 3 and abs(w.sum() - 1) < 1e-12
    assert w[0] > 0.99  # exp(-0.3 / 0.05) of the mass leaves kind 0


def test_sentence_encoder_is_batch_invariant(birdnet_bundle: Bundle) -> None:
    from edge_retrieval.text.sentence import SentenceEncoder

    p = birdnet_bundle.manifest.server.text[0].params
    enc = SentenceEncoder(birdnet_bundle.path(p["encoder"]), birdnet_bundle.path(p["tokenizer"]))
    texts = ["rain", "a very long sentence about a dog barking behind the old barn at night", "siren"]
    batch = enc.encode(texts)
    single = np.stack([enc.encode([t])[0] for t in texts])
    assert np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    assert np.abs(batch - single).max() < 1e-4


def test_resolve_needs_no_torch_transformers_or_tensorflow(birdnet_bundle: Bundle) -> None:
    code = blocker_prelude("torch", "transformers", "tensorflow", "tf2onnx", "sentence_transformers") + (
        "import json\n"
        "from edge_retrieval.bundle import load_bundle\n"
        "from edge_retrieval.text import QueryBuilder\n"
        f"qb = QueryBuilder(load_bundle({str(birdnet_bundle.root)!r}, part='all'))\n"
        "r = qb.resolve('chainsaw sound')[0]\n"
        "import sys\n"
        "heavy = [m for m in ('torch', 'transformers', 'tensorflow') if m in sys.modules]\n"
        "print(json.dumps({'top': r.top[0][0], 'n': len(r.vector.indices), 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {"top": "Power tools", "n": 64, "heavy": []}
