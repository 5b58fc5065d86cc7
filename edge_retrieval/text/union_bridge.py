"""Union label bridge (labels space): one text -> sparse weights over SEVERAL experts' labels.

The labels of all experts (BirdNET's 6,522 species and event classes + 6 groups, YAMNet's 521
AudioSet classes) form one vocabulary with one set of kinds (bird, frog, insect, mammal, human,
vehicle, tool, explosion, alarm, weather, noise, music, animal, domestic, mechanism, object,
generic). Each label has a **role**: ``species`` (BirdNET's bird/frog/insect/mammal species),
``class`` (a sound class: YAMNet's AudioSet classes) or ``partner`` (BirdNET's 11 event classes
and 6 group outputs, which name sounds the classes already name). Weights, as a product:

    p(label | q) = p(kind | q) * p(level | kind, q) * p(label | level, kind, q)

- p(kind): softmax over kinds at ``kind_temperature`` (a kind's similarity is the best of its
  prototypes and of its labels, partners without counterparts left out), as in the
  single-expert bridge;
- p(level): within a kind, species against classes by their best cosines (softmax of the two
  maxima at ``temperature``; a listed partner's cosine counts for the class level, since it
  names a generic sound): a species name ("American robin", "robin song") goes to the species; a
  generic sound ("bird singing", "crickets chirping", "an owl hooting") to the classes. Maxima,
  not sums, so 6,400 species with "a bird call or song" in their texts cannot outvote one class;
- p(label | level): softmax over that level's labels of the kind, at ``temperature`` for species
  and at ``class_temperature`` for classes (defaults to ``temperature``): a species name must pick
  its species out of 6,400, while a generic sound ("a power tool", "a siren") is better served by
  its class and the sibling classes that name it too (Drill, Hammer; Ambulance, Police car).

**Overlap rule** (on purpose, not by which text happens to match best). Species -> BirdNET
(a species also matches by its bare common name, so "barred owl" is not out-scored by
AudioSet's "owl"). Everyday sounds (dog, engine, siren, gunshot, power tools, speech...) ->
YAMNet: AudioSet's classes are finer (Chainsaw, Drill and Lawn mower, where BirdNET has one
"Power tools" bin that fired on a drill for "chainsaw sound") and BirdNET's event classes were
trained as its non-bird rejects, so partners without an entry in ``partners`` get no mass and
no say in the kind. Generic animal groups are shared: a listed partner (BirdNET's "Any bird",
"Any frog or toad", "Any insect") and its YAMNet counterparts are one concept, whose mass is
split ``share`` to the partner and the rest to the counterparts (by their cosines): "bird
singing" -> half on "Any bird" (the max over every bird species, strong on field recordings),
half on YAMNet's Bird / Bird vocalization / Chirp, tweet / Squawk; "katydids" -> half on "Any
insect", half on Insect / Cricket. A YAMNet bird *type* (Owl, Crow) is no counterpart, so "owl
hooting" does not become "any bird". Shares are manifest parameters, chosen on the dev half.

**Children** (``child_share``, from the ontology's hierarchy, shipped in the index): AudioSet
is a hierarchy, and YAMNet often scores a sound on its specific class more than on the parent a
text names ("a power tool" on a drill: Drill high, Power tool low). So each class hands
``child_share`` of its weight to its direct children among the expert's labels, equally ("a
power tool" -> Power tool 0.5, Drill 0.5; "a siren" -> Siren, and Police car / Ambulance / Fire
engine / Civil defense siren), after the partner moves; one level, from the weights before the
move, so mass is kept. Chosen on the dev half (export/union_bridge.py CHILD_SHARE).

Per expert, the query carries the ``max_labels`` largest weights of its own labels, renormalised
(sum 1), and a **gate**: the union mass on its labels (an expert under ``min_expert_weight``
gets 0), read by ``QueryBuilder.expert_weights`` from ``Resolution.extra["gate"]``.

Warnings: an expert with weight whose best cosine is under its own ``fit_floor`` (95th
percentile of off-topic texts against its labels) says so; "the query may never fire" only
when no expert fits; a surface-word match (closest label of another kind than where the weight
went) as in the single bridge.

Manifest: one ``TextSpec`` per expert, each ``kind: "union_bridge"`` with the same ``params``;
the shared index is loaded once per bundle and each text resolved once for all experts.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, TextSpec
from ..errors import BundleError
from ..protocol import encode_sparse
from . import Resolution, TextSide, register_text_side
from .label_bridge import MAX_LABELS, LabelIndex
from .sentence import SentenceEncoder

ROLES = ("class", "species", "partner")
CLASS, SPECIES, PARTNER = 0, 1, 2


@dataclass(frozen=True)
class Partner:
    """A label that takes ``share`` of its counterparts' mass (see the module doc)."""

    label: str
    expert: str
    counterparts: dict[str, list[str]]  # expert -> label names
    share: float


@dataclass(frozen=True)
class UnionParams:
    """TextSpec.params of a union bridge (file names relative to the bundle root)."""

    encoder: str
    tokenizer: str
    index: str
    experts: list[str]
    temperature: float
    kind_temperature: float
    fit_floor: dict[str, float]
    partners: list[Partner] = field(default_factory=list)
    min_expert_weight: float = 0.01
    max_labels: int = MAX_LABELS
    max_tokens: int = 256
    temperature_basis: str = ""
    class_temperature: float | None = None  # None: ``temperature``
    child_share: float = 0.0  # of a class's weight handed to its children (the index's hierarchy)
    child_share_basis: str = ""
    fit_floor_basis: str = ""
    rule: str = ""
    model: str = ""
    dim: int | None = None
    parity_cosine_min: float | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> UnionParams:
        try:
            raw = dict(params)
            raw["partners"] = [Partner(**p) for p in raw.get("partners", [])]
            p = cls(**raw)
        except TypeError as exc:
            raise BundleError(f"union_bridge params: {exc}") from exc
        for name in ("temperature", "kind_temperature", "class_temperature"):
            t = getattr(p, name)
            if name == "class_temperature" and t is None:
                continue
            if not isinstance(t, int | float) or not 0 < t <= 1:
                raise BundleError(f"union_bridge {name} {t!r} must be in (0, 1]")
        if not isinstance(p.child_share, int | float) or not 0 <= p.child_share < 1:
            raise BundleError(f"union_bridge child_share {p.child_share!r} must be in [0, 1)")
        if not 1 <= p.max_labels <= MAX_LABELS:
            raise BundleError(f"union_bridge max_labels {p.max_labels!r} must be in 1..{MAX_LABELS}")
        if len(p.experts) < 2 or len(set(p.experts)) != len(p.experts):
            raise BundleError(f"union_bridge experts {p.experts!r}: need two or more distinct experts")
        if set(p.fit_floor) != set(p.experts):
            raise BundleError(f"union_bridge fit_floor names {sorted(p.fit_floor)}, expected one per expert {p.experts}")
        if not 0 <= p.min_expert_weight < 1 / len(p.experts):
            raise BundleError(f"union_bridge min_expert_weight {p.min_expert_weight!r} must be in [0, 1/{len(p.experts)})")
        for q in p.partners:
            if not 0 <= q.share <= 1 or q.expert not in p.experts or not set(q.counterparts) <= set(p.experts):
                raise BundleError(f"union_bridge partner {q!r}: share must be in [0, 1] and experts among {p.experts}")
        return p


@dataclass(frozen=True)
class UnionIndex:
    """A LabelIndex over the union of the experts' labels, with each label's expert and role."""

    labels: LabelIndex
    label_expert: np.ndarray  # [U] index into expert_names
    label_role: np.ndarray  # [U] CLASS, SPECIES or PARTNER
    label_names: list[str]  # [U] as in each expert's labels file
    expert_names: list[str]
    # the hierarchy, CSR: the children of label u are child_idx[child_ptr[u]:child_ptr[u + 1]]
    # (None: an index without one, as written before the hierarchy was shipped)
    child_ptr: np.ndarray | None = None  # [U + 1]
    child_idx: np.ndarray | None = None

    def save(self, path: Path) -> None:
        li = self.labels
        tree = {} if self.child_ptr is None else {"child_ptr": self.child_ptr.astype(np.int32),
                                                  "child_idx": np.asarray(self.child_idx, np.int32)}
        np.savez(
            path,
            alt_vectors=li.alt_vectors.astype(np.float32), alt_label=li.alt_label.astype(np.int32),
            label_kind=li.label_kind.astype(np.int16), kind_names=np.asarray(li.kind_names),
            proto_vectors=li.proto_vectors.astype(np.float32), proto_kind=li.proto_kind.astype(np.int16),
            label_expert=self.label_expert.astype(np.int16), label_role=self.label_role.astype(np.int8),
            label_names=np.asarray(self.label_names), expert_names=np.asarray(self.expert_names), **tree,
        )

    @classmethod
    def load(cls, path: Path) -> UnionIndex:
        li = LabelIndex.load(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                tree = ((z["child_ptr"].astype(np.int64), z["child_idx"].astype(np.int64))
                        if "child_ptr" in z.files else (None, None))
                idx = cls(li, z["label_expert"].astype(np.int64), z["label_role"].astype(np.int64),
                          [str(x) for x in z["label_names"]], [str(x) for x in z["expert_names"]], *tree)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"union index {str(path)!r} is unreadable: {exc}") from exc
        n = li.n_labels
        if not len(idx.label_expert) == len(idx.label_role) == len(idx.label_names) == n:
            raise BundleError(f"union index {str(path)!r}: per-label arrays differ in length from {n} labels")
        if idx.child_ptr is not None:
            ptr, ch = idx.child_ptr, idx.child_idx
            assert ch is not None
            if (ptr.shape != (n + 1,) or ptr[0] != 0 or ptr[-1] != ch.size or np.any(np.diff(ptr) < 0)
                    or (ch.size and (ch.min() < 0 or ch.max() >= n))):
                raise BundleError(f"union index {str(path)!r}: child_ptr/child_idx do not describe children of its {n} labels")
        return idx

    def expert_slice(self, e: int) -> np.ndarray:
        return np.flatnonzero(self.label_expert == e)


def level_weights(sim: np.ndarray, kind_sim: np.ndarray, label_kind: np.ndarray, label_role: np.ndarray,
                  kind_temperature: float, temperature: float, carriers: np.ndarray | None = None,
                  class_temperature: float | None = None) -> np.ndarray:
    """[U] p(kind) * p(level | kind) * p(label | level, kind) (pure numpy).

    ``sim`` [U] label cosines, ``kind_sim`` [K] kind similarities, ``label_kind`` [U],
    ``label_role`` [U] (CLASS / SPECIES / PARTNER), ``carriers`` [U] bool: the partners that
    take part in their kind's class level (those with counterparts); other partners get 0.
    A carrier's cosine also counts as evidence for the class level of its kind (it names a
    generic sound). Kinds without competing labels get no mass.
    """
    n_kinds = kind_sim.shape[0]
    sim = sim.astype(np.float64)
    carriers = np.zeros(sim.shape[0], bool) if carriers is None else carriers
    members = [(label_role == CLASS) | (carriers & (label_role == PARTNER)), label_role == SPECIES]
    best = np.full((2, n_kinds), -np.inf)  # per level (CLASS, SPECIES): best cosine of its members
    for role in (CLASS, SPECIES):
        np.maximum.at(best[role], label_kind[members[role]], sim[members[role]])
    has = np.isfinite(best).any(axis=0)
    ks = np.where(has, kind_sim, -np.inf).astype(np.float64)
    pk = np.exp((ks - ks[has].max()) / kind_temperature)
    pk /= pk.sum()
    partner = np.full(n_kinds, -np.inf)
    m = carriers & (label_role == PARTNER)
    np.maximum.at(partner, label_kind[m], sim[m])
    level = best.copy()
    level[CLASS] = np.where(np.isfinite(best[CLASS]), np.maximum(best[CLASS], partner), -np.inf)
    top = level.max(axis=0)
    e_level = np.exp((level - np.where(np.isfinite(top), top, 0.0)) / temperature)  # -inf (no label) -> 0
    p_level = e_level / np.maximum(e_level.sum(axis=0), 1e-300)  # [2, K]
    w = np.zeros(sim.shape[0], np.float64)
    for role in (CLASS, SPECIES):
        idx = np.flatnonzero(members[role])
        if idx.size == 0:
            continue
        k = label_kind[idx]
        t = class_temperature if role == CLASS and class_temperature is not None else temperature
        e = np.exp((sim[idx] - best[role][k]) / t)
        z = np.bincount(k, weights=e, minlength=n_kinds)
        w[idx] = pk[k] * p_level[role][k] * e / z[k]
    return w


def apply_partners(w: np.ndarray, sim: np.ndarray, moves: list[tuple[int, np.ndarray, float]],
                   temperature: float) -> np.ndarray:
    """A partner and its counterparts are one concept: its mass M (theirs and the partner's own)
    is split ``share * M`` to the partner and the rest to the counterparts, as a softmax of their
    cosines at ``temperature``. Total mass is kept."""
    w = w.copy()
    for label, cps, share in moves:
        total = w[label] + w[cps].sum()
        e = np.exp((sim[cps] - sim[cps].max()) / temperature)
        w[cps] = (1.0 - share) * total * e / e.sum()
        w[label] = share * total
    return w


def spread_to_children(w: np.ndarray, child_ptr: np.ndarray, child_idx: np.ndarray, share: float) -> np.ndarray:
    """Each label with children hands ``share`` of its weight to them, equally (one level: from the
    weights before the move). Total mass is kept."""
    n_children = np.diff(child_ptr)
    moved = np.where(n_children > 0, share * w, 0.0)
    out = w - moved
    parents = np.repeat(np.arange(w.size), n_children)
    np.add.at(out, child_idx, moved[parents] / n_children[parents])
    return out


def top_sparse(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights) of the ``k`` largest of ``w`` (> 0), renormalised; empty if none."""
    k = min(k, int((w > 0).sum()))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    top = np.argpartition(-w, k - 1)[:k]
    top = top[np.argsort(-w[top], kind="stable")]
    return top, w[top] / w[top].sum()


@dataclass(frozen=True)
class UnionResult:
    """Everything one text resolved to, for all experts at once."""

    weights: np.ndarray  # [U] union weights after the partner moves
    sim: np.ndarray  # [U]
    gates: dict[str, float]
    mass: dict[str, float]
    kind_mass: dict[str, float]


class UnionCore:
    """The shared part: encoder + union index; ``resolve_all(text)`` -> one Resolution per expert."""

    def __init__(self, encoder: SentenceEncoder, index: UnionIndex, params: UnionParams) -> None:
        if index.expert_names != params.experts:
            raise BundleError(f"union index experts {index.expert_names} differ from params experts {params.experts}")
        if params.child_share > 0 and index.child_ptr is None:
            raise BundleError(f"union_bridge child_share {params.child_share} needs the class hierarchy, and this "
                              "union index has none (re-export the bundle)")
        self.encoder, self.index, self.params = encoder, index, params
        self.slices = [index.expert_slice(e) for e in range(len(params.experts))]
        self.moves = self._moves(params.partners)
        self.carriers = np.zeros(index.labels.n_labels, bool)
        self.carriers[[m[0] for m in self.moves]] = True
        # partners with no counterparts take no part at all: no mass, and no say in the kind
        # ("hammering" matches BirdNET's "Human non-vocal" text; it must not pull the query to human)
        self.silent = (index.label_role == PARTNER) & ~self.carriers
        self._cache: OrderedDict[str, dict[str, Resolution]] = OrderedDict()
        self._lock = threading.Lock()

    def _find(self, expert: str, name: str) -> int:
        e = self.params.experts.index(expert)
        hits = [int(i) for i in self.slices[e] if self.index.label_names[i] == name]
        if len(hits) != 1:
            raise BundleError(f"union_bridge partners: expert {expert!r} has {len(hits)} labels named {name!r}, expected 1")
        return hits[0]

    def _moves(self, partners: list[Partner]) -> list[tuple[int, np.ndarray, float]]:
        out = []
        for p in partners:
            label = self._find(p.expert, p.label)
            if self.index.label_role[label] != PARTNER:
                raise BundleError(f"union_bridge partner {p.label!r} is a {ROLES[self.index.label_role[label]]}, not a partner label")
            cps = np.asarray([self._find(e, n) for e, names in p.counterparts.items() for n in names], np.int64)
            if np.any(self.index.label_role[cps] == PARTNER):
                raise BundleError(f"union_bridge partner {p.label!r}: a counterpart is itself a partner label")
            out.append((label, cps, float(p.share)))
        return out

    def weights(self, q: np.ndarray) -> UnionResult:
        """Union weights, per-expert gates and masses of one unit query vector."""
        p, li = self.params, self.index.labels
        sim = li.label_similarity(q)
        ksim = li.kind_similarity(q, np.where(self.silent, -np.inf, sim))
        ct = p.class_temperature if p.class_temperature is not None else p.temperature
        w = level_weights(sim, ksim, li.label_kind, self.index.label_role, p.kind_temperature, p.temperature,
                          self.carriers, class_temperature=ct)
        w = apply_partners(w, sim.astype(np.float64), self.moves, ct)
        if p.child_share > 0:
            assert self.index.child_ptr is not None and self.index.child_idx is not None
            w = spread_to_children(w, self.index.child_ptr, self.index.child_idx, p.child_share)
        mass = {name: float(w[s].sum()) for name, s in zip(p.experts, self.slices, strict=True)}
        gate = {k: (v if v >= p.min_expert_weight else 0.0) for k, v in mass.items()}
        total = sum(gate.values())
        gates = {k: v / total for k, v in gate.items()}
        kinds = li.kind_names
        km = np.bincount(li.label_kind, weights=w, minlength=len(kinds))
        return UnionResult(w, sim, gates, mass, {k: round(float(km[i]), 4) for i, k in enumerate(kinds) if km[i] > 1e-4})

    def resolve_all(self, text: str) -> dict[str, Resolution]:
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        out = self._resolve(text)
        with self._lock:
            self._cache[text] = out
            while len(self._cache) > 256:  # bounded: the last 256 texts
                self._cache.popitem(last=False)
        return out

    def _resolve(self, text: str) -> dict[str, Resolution]:
        p, idx = self.params, self.index
        li = idx.labels
        q = self.encoder.encode([text])[0]
        r = self.weights(q)
        kinds = li.kind_names
        fits = {name: float(r.sim[s].max()) for name, s in zip(p.experts, self.slices, strict=True)}
        fitting = [e for e in p.experts if fits[e] >= p.fit_floor[e]]
        top = int(np.argmax(r.weights))
        nearest = int(np.argmax(np.where(self.silent, -np.inf, r.sim)))
        top_kind, near_kind = kinds[int(li.label_kind[top])], kinds[int(li.label_kind[nearest])]
        out: dict[str, Resolution] = {}
        for e, (name, s) in enumerate(zip(p.experts, self.slices, strict=True)):
            ids, ws = top_sparse(r.weights[s], p.max_labels)
            unused = r.gates[name] == 0.0 or ids.size == 0
            if ids.size == 0:  # no mass at all: any valid vector will do, its weight is 0
                ids, ws = top_sparse(np.exp((r.sim[s] - r.sim[s].max()) / p.temperature), p.max_labels)
            warning = None
            nearest_e = int(s[int(np.argmax(r.sim[s]))])
            if not fitting:
                floors = ", ".join(f"{x} {fits[x]:.2f} < {p.fit_floor[x]:.2f}" for x in p.experts)
                warning = (f"{text!r} matches no label of any expert well (best cosine: {floors}; nearest here "
                           f"{idx.label_names[nearest_e]!r}); the query may never fire")
            elif name not in fitting and not unused:
                warning = (f"{text!r} matches no {name} label well (best cosine {fits[name]:.2f} < floor "
                           f"{p.fit_floor[name]:.2f}) but {name} carries weight {r.gates[name]:.2f}")
            elif int(idx.label_expert[top]) == e and near_kind != top_kind:
                warning = (f"{text!r} reads like {_a(top_kind)} sound: weights go to {idx.label_names[top]!r}; the "
                           f"label with the closest name, {idx.label_names[nearest]!r} ({near_kind}, cosine "
                           f"{float(r.sim[nearest]):.2f}), matches a word only")
            gi = s[ids]
            out[name] = Resolution(
                expert=name,
                vector=encode_sparse(name, ids, ws),
                top=[(_display(idx.label_names[int(i)]), float(x)) for i, x in zip(gi[:10], ws[:10], strict=True)],
                fit=fits[name],
                warning=warning,
                extra={
                    "gate": r.gates[name],
                    "mass": round(r.mass[name], 6),
                    "unused": unused,
                    "top_kind": top_kind,
                    "kind_mass": r.kind_mass,
                    "labels": [idx.label_names[int(i)] for i in gi[:10]],
                },
            )
        return out


def _display(label: str) -> str:
    """BirdNET's ``Scientific_Common`` -> the common name; other labels as they are."""
    return label.partition("_")[2] or label


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


_CORES: dict[tuple[str, str], UnionCore] = {}
_CORES_LOCK = threading.Lock()


def union_core(bundle: Bundle, spec: TextSpec) -> UnionCore:
    """The bundle's shared union core (built once for all its union_bridge text sides)."""
    params = UnionParams.from_dict(spec.params)
    server = bundle.require_server()
    sides = {t.expert: t for t in server.text if t.kind == "union_bridge"}
    if sorted(sides) != sorted(params.experts) or any(t.params != spec.params for t in sides.values()):
        raise BundleError(
            f"union_bridge: every expert of {params.experts} needs a text side of kind 'union_bridge' with the same "
            f"params; the bundle has {sorted(sides)}"
        )
    key = (str(bundle.root), json.dumps(spec.params, sort_keys=True, default=str))
    with _CORES_LOCK:
        if key in _CORES:
            return _CORES[key]
    index = UnionIndex.load(bundle.path(params.index))
    for e, name in enumerate(params.experts):
        spec_e = bundle.manifest.expert(name)
        names = [index.label_names[i] for i in index.expert_slice(e)]
        if len(names) != spec_e.dim:
            raise BundleError(f"union_bridge: the index has {len(names)} labels for {name!r}, the expert outputs {spec_e.dim}")
        if spec_e.labels_file and bundle.labels(name) != names:
            raise BundleError(f"union_bridge: the index's labels for {name!r} differ from {spec_e.labels_file!r} (order or names)")
    encoder = SentenceEncoder(bundle.path(params.encoder), bundle.path(params.tokenizer), max_tokens=params.max_tokens)
    core = UnionCore(encoder, index, params)
    with _CORES_LOCK:
        return _CORES.setdefault(key, core)


class UnionSide(TextSide):
    """One expert's view of the union bridge."""

    def __init__(self, core: UnionCore, expert: str) -> None:
        self.core = core
        self.expert = expert

    def resolve(self, text: str) -> Resolution:
        return self.core.resolve_all(text)[self.expert]


@register_text_side("union_bridge")
def make_union_bridge(bundle: Bundle, spec: TextSpec) -> TextSide:
    return UnionSide(union_core(bundle, spec), spec.expert)
