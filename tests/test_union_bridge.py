"""Union label bridge: one text -> a sparse vector per expert (BirdNET + YAMNet) and their weights.

Runs on the real MiniLM encoder and the real label texts (BirdNET's CSV and the AudioSet CSV);
the index is built from them here. The QueryBuilder test also needs a YAMNet bundle (the real
export) and is skipped without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle
from edge_retrieval.text import Resolution
from edge_retrieval.text.label_bridge import LabelIndex
from edge_retrieval.text.union_bridge import (
    CLASS,
    PARTNER,
    SPECIES,
    UnionCore,
    UnionIndex,
    UnionParams,
    apply_partners,
    level_weights,
    spread_to_children,
)
from tests.fixtures_bundles import blocker_prelude

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def union_files(birdnet_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The union index (BirdNET's labels + YAMNet's 521) and its params, written to a temp dir."""
    from edge_retrieval.export import audioset_labels, union_bridge

    from edge_retrieval.text.sentence import SentenceEncoder

    p = birdnet_bundle.manifest.server.text[0].params
    enc = SentenceEncoder(birdnet_bundle.path(p["encoder"]), birdnet_bundle.path(p["tokenizer"]))
    labels = {"birdnet": birdnet_bundle.labels("birdnet"),
              "yamnet": [r[1] for r in audioset_labels.read_label_texts()]}
    tables = union_bridge.expert_tables(labels)
    reuse = {"birdnet": LabelIndex.load(birdnet_bundle.path(p["index"]))}
    index = union_bridge.build_union_index(enc, labels, tables, reuse=reuse, progress=False)
    out = tmp_path_factory.mktemp("union")
    index.save(out / "index.npz")
    floors, basis = union_bridge.fit_floors(enc, index)
    params = union_bridge.union_params("index.npz", index, floors, basis,
                                       {"max_tokens": p["max_tokens"], "model": p["model"], "dim": p["dim"]},
                                       str(birdnet_bundle.path(p["encoder"])), str(birdnet_bundle.path(p["tokenizer"])))
    (out / "params.json").write_text(json.dumps(params))
    return {"index": str(out / "index.npz"), "params": str(out / "params.json")}


@pytest.fixture(scope="module")
def core(union_files: dict[str, str]) -> UnionCore:
    from edge_retrieval.text.sentence import SentenceEncoder

    params = UnionParams.from_dict(json.loads(Path(union_files["params"]).read_text()))
    enc = SentenceEncoder(params.encoder, params.tokenizer)
    return UnionCore(enc, UnionIndex.load(Path(union_files["index"])), params)


def _res(core: UnionCore, text: str) -> dict[str, Resolution]:
    return core.resolve_all(text)


def _w(r: Resolution) -> dict[str, float]:
    """Full label name -> weight within this expert's vector (top 10)."""
    return dict(zip(r.extra["labels"], [w for _, w in r.top], strict=True))


def _top(r: Resolution) -> str:
    return r.extra["labels"][0]


def test_chainsaw_goes_to_yamnet_chainsaw(core: UnionCore) -> None:
    r = _res(core, "chainsaw sound")
    assert r["yamnet"].extra["gate"] > 0.9 and _top(r["yamnet"]) == "Chainsaw", r["yamnet"].top[:3]
    assert r["yamnet"].top[0][1] > 0.5 and r["yamnet"].warning is None


@pytest.mark.parametrize("text", ["a power drill", "a power tool"])
def test_power_tools_go_to_yamnet_power_tool_or_drill(core: UnionCore, text: str) -> None:
    r = _res(core, text)
    y = _w(r["yamnet"])
    assert r["yamnet"].extra["gate"] > 0.9, {e: x.extra["gate"] for e, x in r.items()}
    # Drill's one child in the ontology, the dental drill, takes half of Drill's weight (child_share)
    drills = ("Power tool", "Drill", "Dental drill, dentist's drill")
    assert _top(r["yamnet"]) in drills and sum(y.get(n, 0) for n in drills) > 0.9 and y["Drill"] > 0.4, y
    assert r["birdnet"].extra["mass"] < 0.01  # BirdNET's coarse "Power tools" bin is not used


def test_a_class_shares_its_weight_with_its_ontology_children(core: UnionCore) -> None:
    # "a power tool" names Power tool; YAMNet often scores a drill on Drill (its only child) instead
    share = core.params.child_share
    assert share == 0.5 and core.index.child_ptr is not None
    y = _w(_res(core, "a power tool")["yamnet"])
    assert abs(y["Power tool"] - y["Drill"]) < 0.02 and y["Power tool"] + y["Drill"] > 0.95, y
    # Siren's four children (Police car, Ambulance, Fire engine, Civil defense siren) share half of its weight
    y = _w(_res(core, "a siren")["yamnet"])
    kids = ("Police car (siren)", "Ambulance (siren)", "Fire engine, fire truck (siren)", "Civil defense siren")
    assert all(y.get(k, 0) > 0.05 for k in kids) and y["Siren"] < 0.6, y
    # a leaf keeps its weight: Chainsaw has no children
    assert _w(_res(core, "chainsaw sound")["yamnet"])["Chainsaw"] > 0.9


def test_children_take_their_share_and_keep_the_mass() -> None:
    # labels 0..4: 0 -> (1, 2), 1 -> (3); 4 has none
    ptr = np.array([0, 2, 3, 3, 3, 3])
    idx = np.array([1, 2, 3])
    w = np.array([0.6, 0.2, 0.0, 0.0, 0.2])
    out = spread_to_children(w, ptr, idx, 0.5)
    np.testing.assert_allclose(out, [0.3, 0.1 + 0.15, 0.15, 0.1, 0.2])  # one level, from the weights before
    assert abs(out.sum() - 1) < 1e-12
    np.testing.assert_allclose(spread_to_children(w, ptr, idx, 0.0), w)


def test_an_index_without_the_hierarchy_refuses_a_child_share(union_files: dict[str, str], tmp_path: Path) -> None:
    from edge_retrieval.errors import BundleError
    from edge_retrieval.text.sentence import SentenceEncoder

    index = UnionIndex.load(Path(union_files["index"]))
    assert index.child_ptr is not None and int(np.diff(index.child_ptr).sum()) == index.child_idx.size > 300
    old = UnionIndex(index.labels, index.label_expert, index.label_role, index.label_names, index.expert_names)
    old.save(tmp_path / "old.npz")
    back = UnionIndex.load(tmp_path / "old.npz")
    assert back.child_ptr is None
    params = UnionParams.from_dict(json.loads(Path(union_files["params"]).read_text()))
    enc = SentenceEncoder(params.encoder, params.tokenizer)
    with pytest.raises(BundleError, match="hierarchy"):
        UnionCore(enc, back, params)
    bad = UnionIndex(index.labels, index.label_expert, index.label_role, index.label_names, index.expert_names,
                     index.child_ptr, index.child_idx + index.labels.n_labels)
    bad.save(tmp_path / "bad.npz")
    with pytest.raises(BundleError, match="child_ptr"):
        UnionIndex.load(tmp_path / "bad.npz")


def test_cow_goes_to_cattle_not_to_any_mammal_or_dog(core: UnionCore) -> None:
    r = _res(core, "a cow mooing")
    y = _w(r["yamnet"])
    assert _top(r["yamnet"]) in ("Moo", "Cattle, bovinae") and y.get("Moo", 0) + y.get("Cattle, bovinae", 0) > 0.7, y
    assert r["birdnet"].extra["gate"] == 0.0 and r["birdnet"].extra["mass"] < core.params.min_expert_weight
    assert sum(y.get(n, 0) for n in ("Dog", "Bark", "Bow-wow")) < 0.01


def test_train_goes_to_train_not_engine(core: UnionCore) -> None:
    r = _res(core, "a train passing")
    y = _w(r["yamnet"])
    assert _top(r["yamnet"]) in ("Train", "Rail transport"), y
    assert y.get("Engine", 0) < 0.01 and r["birdnet"].extra["gate"] == 0.0


def test_dog_barking_goes_to_bark(core: UnionCore) -> None:
    for text in ("dog barking", "a dog barking"):
        r = _res(core, text)
        y = _w(r["yamnet"])
        assert _top(r["yamnet"]) in ("Bark", "Dog") and r["yamnet"].extra["gate"] > 0.99, (text, y)
        assert y.get("Bark", 0) + y.get("Dog", 0) > 0.5


@pytest.mark.parametrize("text", ["robin song", "American robin", "barred owl", "spring peeper"])
def test_species_names_go_to_birdnet_species(core: UnionCore, text: str) -> None:
    r = _res(core, text)
    b = r["birdnet"]
    idx = core.index
    top = idx.label_names.index(_top(b))
    assert b.extra["gate"] > 0.9 and idx.label_role[top] == SPECIES, (text, b.top[:3], b.extra["gate"])
    assert b.warning is None


def test_bird_singing_is_split_between_both_experts_bird_labels(core: UnionCore) -> None:
    share = next(p.share for p in core.params.partners if p.label == "Group bird_Any bird")
    counterparts = next(p.counterparts["yamnet"] for p in core.params.partners if p.label == "Group bird_Any bird")
    for text in ("bird singing", "birds chirping"):
        r = _res(core, text)
        b, y = r["birdnet"], r["yamnet"]
        assert abs(b.extra["gate"] - share) < 0.05 and abs(y.extra["gate"] - (1 - share)) < 0.05, (text, b.extra, y.extra)
        assert _top(b) == "Group bird_Any bird" and b.top[0][1] > 0.9
        assert sum(w for n, w in _w(y).items() if n in counterparts) > 0.9, y.top[:5]


def test_a_bird_type_is_not_any_bird(core: UnionCore) -> None:
    r = _res(core, "owl hooting")
    assert _top(r["yamnet"]) in ("Owl", "Hoot") and r["yamnet"].extra["gate"] > 0.9
    assert _w(r["birdnet"]).get("Group bird_Any bird", 0.0) * r["birdnet"].extra["gate"] < 0.01


def test_vectors_are_sparse_normalised_and_gates_sum_to_one(core: UnionCore) -> None:
    dims = {e: int((core.index.label_expert == i).sum()) for i, e in enumerate(core.params.experts)}
    for text in ("chainsaw sound", "bird singing", "robin song", "crickets chirping", "car horn", "rain",
                 "a quiet evening in the garden", "spreadsheet formula"):
        res = _res(core, text)
        assert abs(sum(r.extra["gate"] for r in res.values()) - 1) < 1e-9
        for e, r in res.items():
            v = r.vector
            assert v.encoding == "sparse" and 1 <= len(v.indices) <= 64 and max(v.indices) < dims[e]
            assert abs(sum(v.weights) - 1) < 1e-6 and all(w >= 0 for w in v.weights)
            assert list(v.weights) == sorted(v.weights, reverse=True)


def test_warnings_per_expert_and_never_fire_only_when_none_fits(core: UnionCore) -> None:
    res = _res(core, "spreadsheet formula for a quarterly budget")
    for e, r in res.items():
        assert r.fit < core.params.fit_floor[e] and r.warning is not None and "never fire" in r.warning
    res = _res(core, "chainsaw sound")
    assert all(r.warning is None or "never fire" not in r.warning for r in res.values())
    assert res["yamnet"].warning is None


def test_level_weights_maxima_not_sums() -> None:
    # one kind: 6,400 species at cosine 0.70 and one class at 0.80: the class level wins
    sim = np.concatenate([np.full(6400, 0.70), [0.80]]).astype(np.float32)
    role = np.concatenate([np.full(6400, SPECIES), [CLASS]])
    kind = np.zeros(6401, np.int64)
    w = level_weights(sim, np.array([0.8]), kind, role, 0.03, 0.03)
    assert abs(w.sum() - 1) < 1e-9 and w[-1] > 0.96
    # the best species is named (0.85 > 0.80): the species level wins, spread by cosine
    sim[0] = 0.85
    w = level_weights(sim, np.array([0.85]), kind, role, 0.03, 0.03)
    assert abs(w[:6400].sum() - 1 / (1 + np.exp(-0.05 / 0.03))) < 1e-6 and w[0] == w[:6400].max()


def test_class_temperature_flattens_classes_only() -> None:
    # kind 0: three species and three classes; the species level wins (0.9 > 0.8)
    sim = np.array([0.90, 0.80, 0.70, 0.80, 0.75, 0.70], np.float64)
    role = np.array([SPECIES, SPECIES, SPECIES, CLASS, CLASS, CLASS])
    kind = np.zeros(6, np.int64)
    same = level_weights(sim, np.array([0.9]), kind, role, 0.03, 0.03)
    flat = level_weights(sim, np.array([0.9]), kind, role, 0.03, 0.03, class_temperature=0.3)
    np.testing.assert_allclose(flat[:3], same[:3])  # species and the level split are untouched
    assert abs(flat[3:].sum() - same[3:].sum()) < 1e-12  # the class level keeps its mass...
    assert flat[3] / flat[5] < same[3] / same[5] and abs(flat[3] / flat[5] - np.exp(0.1 / 0.3)) < 1e-9  # ...spread


def test_partners_take_their_share_and_keep_the_mass() -> None:
    # kind 0: two classes (counterparts), one partner that matches best, one unlisted partner
    sim = np.array([0.60, 0.50, 0.90, 0.95], np.float64)
    role = np.array([CLASS, CLASS, PARTNER, PARTNER])
    kind = np.zeros(4, np.int64)
    carriers = np.array([False, False, True, False])
    w = level_weights(sim, np.array([0.95]), kind, role, 0.03, 0.03, carriers)
    assert w[3] == 0.0 and abs(w.sum() - 1) < 1e-9 and w[2] > w[0] > w[1]  # unlisted partner gets nothing
    out = apply_partners(w, sim, [(2, np.array([0, 1]), 0.25)], 0.03)
    assert abs(out.sum() - 1) < 1e-9 and abs(out[2] - 0.25) < 1e-9
    assert abs(out[0] / out[1] - np.exp(0.1 / 0.03)) < 1e-6  # counterparts by their cosines


def test_params_are_checked(union_files: dict[str, str]) -> None:
    from edge_retrieval.errors import BundleError

    params = json.loads(Path(union_files["params"]).read_text())
    for bad in ({"temperature": 0}, {"class_temperature": 1.5}, {"class_temperature": "warm"}, {"experts": ["birdnet"]}, {"fit_floor": {"birdnet": 0.5}},
                {"partners": [{**params["partners"][0], "share": 1.5}]}, {"surprise": 1},
                {"child_share": 1.0}, {"child_share": -0.1}, {"child_share": "half"}):
        with pytest.raises(BundleError):
            UnionParams.from_dict({**params, **bad})


def test_resolve_needs_no_torch_transformers_or_tensorflow(union_files: dict[str, str]) -> None:
    code = blocker_prelude("torch", "transformers", "tensorflow", "tf2onnx", "sentence_transformers") + (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edge_retrieval.text.sentence import SentenceEncoder\n"
        "from edge_retrieval.text.union_bridge import UnionCore, UnionIndex, UnionParams\n"
        f"p = UnionParams.from_dict(json.loads(Path({union_files['params']!r}).read_text()))\n"
        f"core = UnionCore(SentenceEncoder(p.encoder, p.tokenizer), UnionIndex.load(Path({union_files['index']!r})), p)\n"
        "r = core.resolve_all('chainsaw sound')\n"
        "heavy = [m for m in ('torch', 'transformers', 'tensorflow') if m in sys.modules]\n"
        "print(json.dumps({'top': r['yamnet'].top[0][0], 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"top": "Chainsaw", "heavy": []}


def test_query_builder_weights_are_the_union_gates(default_bundle) -> None:  # noqa: ANN001
    """The packaged default (export default: union bridge over BirdNET + YAMNet) through QueryBuilder."""
    from edge_retrieval.text import QueryBuilder

    b = default_bundle
    assert [t.kind for t in b.manifest.server.text] == ["union_bridge", "union_bridge"]
    qb = QueryBuilder(b)
    assert qb.sides[0].core is qb.sides[1].core  # one index, one encoder
    for text, heavy in (("bird singing", None), ("chainsaw sound", "yamnet"), ("American robin", "birdnet")):
        msg, res = qb.build(text, "q1", threshold=0.3)
        gates = [r.extra["gate"] for r in res]
        assert msg.weights == pytest.approx(gates) and abs(sum(msg.weights) - 1) < 1e-9
        assert [v.expert for v in msg.vectors] == b.manifest.expert_names
        if heavy:
            assert dict(zip(b.manifest.expert_names, msg.weights, strict=True))[heavy] > 0.9, (text, gates)
        else:
            assert min(msg.weights) > 0.4, (text, gates)
    from edge_retrieval.pipeline.matcher import compile_query

    cq = compile_query(msg, b.manifest)
    assert set(cq.sparse) == {"birdnet", "yamnet"}
