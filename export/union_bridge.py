"""Build the union label bridge (``edge_retrieval.text.union_bridge``) into a bundle.

One index over BirdNET's labels (species, event classes, groups; ``birdnet_labels``) and
YAMNet's 521 AudioSet classes (``audioset_labels``), with one set of kinds and a role per label;
one ``union_bridge`` TextSpec per expert, all with the same params. Call it from an export that
already wrote both experts and the sentence encoder::

    texts = add_union_bridge(w, senc, enc_info, {"birdnet": birdnet_labels, "yamnet": yamnet_labels})
    manifest["server"] = {"text": texts}

The overlap rule (``PARTNERS``) and why it is so are in the runtime module's docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_retrieval.bundle import BundleWriter
from edge_retrieval.errors import ExportError
from edge_retrieval.text.label_bridge import LabelIndex
from edge_retrieval.text.union_bridge import CLASS, PARTNER, SPECIES, UnionIndex

from . import audioset_labels, birdnet_labels

INDEX_FILE = "union/label_index.npz"
AUDIOSET_TEXTS_FILE = "union/audioset_label_texts.csv"
AUDIOSET_NOTICE_FILE = "union/AUDIOSET_ONTOLOGY.md"
# Label temperatures, checked on the fixture DEV half (scripts/tune_defaults.py --union-temperatures,
# 5-patch default, calibrated; detection F1 by 2-fold CV within dev, dev archive top-1 of 12):
# - one temperature for every softmax, 0.03 / 0.05 / 0.08 / 0.12 / 0.16 / 0.2 / 0.3: CV F1 0.588 /
#   0.607 / 0.643 / 0.672 / 0.641 / 0.652 / 0.602, archive 8 / 8 / 7 / 7 / 8 / 8 / 6; the kind
#   temperature (0.03 / 0.06 / 0.1) moved the CV F1 by <= 0.004. A flat softmax over 6,400 species
#   spreads "barred owl" over every owl, so species must stay at 0.03;
# - the classes alone (CLASS_TEMPERATURE), 0.08 / 0.12 / 0.16: CV F1 0.621 / 0.636 / 0.608, archive
#   7 / 7 / 8; it also moves "bird singing" off its 50/50 split (chosen on dev) and gives "an owl
#   hooting" 8 % "Any bird". The four CV folds' F1 range over 0.27-0.77, so +0.05 is noise; kept 0.03.
TEMPERATURE = 0.03  # species within their level, and the species-vs-class level
CLASS_TEMPERATURE = 0.03  # AudioSet classes within their level, and a partner's counterparts
KIND_TEMPERATURE = 0.03
TEMPERATURE_BASIS = ("the BirdNET bridge's values (tuned there on the dev half); for the union, class and "
                     "shared temperatures 0.03-0.3 were swept on dev (scripts/tune_defaults.py "
                     "--union-temperatures) and none beat 0.03 beyond the CV noise")
MIN_EXPERT_WEIGHT = 0.05  # under 5 % of the mass an expert cannot lift a score to any tuned threshold (>= 0.1)
# Fixture DEV half, 6 bird/frog/insect queries, calibrated scores (window AP, positives = the query's
# category): mean AP 0.767 with share 0 (YAMNet alone), 0.822 / 0.852 / 0.843 with 0.25 / 0.5 / 0.75,
# 0.728 with 1 (BirdNET alone); mean ROC AUC best at 0.5 too (0.972): the mix beats either expert.
BIRD_SHARE = 0.5
# A class hands this share of its query weight to its direct children in the AudioSet ontology
# (runtime doc). Fixture DEV half, a grid fixed beforehand (share 0 / 0.25 / 0.5, to the direct
# children or to every descendant; scripts/tune_defaults.py's measures, each grid point's queries
# scored in one pass): detection F1 by 2-fold CV within dev 0.588 / children 0.595, 0.611 /
# descendants 0.595, 0.607; dev archive top-1 (cosine, 12 fixed queries) 10 / 10, 11 / 10, 11;
# captions dev split (cosine) R@10 0.336 -> 0.343, mAP@10 0.115 -> 0.117 with children at 0.5.
CHILD_SHARE = 0.5
CHILD_SHARE_BASIS = ("fixture dev half: CV F1 0.588 -> 0.611, dev archive top-1 10 -> 11 of 12, captions dev "
                     "mAP@10 0.115 -> 0.117 (grid 0 / 0.25 / 0.5, children or all descendants; export/union_bridge.py)")

# Generic animal groups: BirdNET's group output takes ``share`` of its YAMNet counterparts' mass.
# Counterparts are the GENERIC AudioSet classes of the group only: a bird type (Owl, Crow, Pigeon)
# or a single insect (Mosquito, Fly) stays YAMNet's. "Any mammal" has no generic counterpart
# (AudioSet's mammals are pets and livestock, not BirdNET's wild canids, deer and squirrels).
PARTNERS: tuple[dict[str, Any], ...] = (
    {"label": "Group bird_Any bird", "expert": "birdnet", "share": BIRD_SHARE,
     "counterparts": {"yamnet": ["Bird", "Bird vocalization, bird call, bird song", "Chirp, tweet", "Squawk"]}},
    {"label": "Group frog_Any frog or toad", "expert": "birdnet", "share": BIRD_SHARE,
     "counterparts": {"yamnet": ["Frog", "Croak"]}},
    {"label": "Group insect_Any insect", "expert": "birdnet", "share": BIRD_SHARE,
     "counterparts": {"yamnet": ["Insect", "Cricket"]}},
)

RULE = (
    "species -> birdnet; everyday sound classes -> yamnet (birdnet's 11 event classes and its human/explosion/mammal "
    f"groups get no weight); generic bird/frog/insect sounds -> {BIRD_SHARE:.0%} of the yamnet counterparts' mass "
    "moved to birdnet's group output (partners); see edge_retrieval/text/union_bridge.py"
)


def kind_texts() -> dict[str, str]:
    """Prototypes of every union kind: BirdNET's, extended and completed from the ontology's branches."""
    out = dict(birdnet_labels.KIND_TEXTS)
    for k, t in audioset_labels.EXTRA_KIND_TEXTS.items():
        out[k] = f"{out[k]}; {t}" if k in out else t
    missing = set(audioset_labels.KINDS) - set(out)
    if missing:
        raise ExportError(f"union kinds without prototypes: {sorted(missing)}")
    return out


def birdnet_roles(labels: Sequence[str]) -> list[int]:
    """PARTNER for event classes and groups, SPECIES for every other label."""
    groups = {g[0] for g in birdnet_labels.GROUPS}
    return [PARTNER if (lab in groups or birdnet_labels.is_event(lab)) else SPECIES for lab in labels]


def expert_tables(labels: Mapping[str, Sequence[str]], birdnet_csv: Path | None = None,
                  audioset_csv: Path | None = None) -> dict[str, tuple[list[str], list[str], list[int]]]:
    """expert -> (kinds, texts, roles), from the reviewed CSVs, checked against the label files."""
    out: dict[str, tuple[list[str], list[str], list[int]]] = {}
    for name, labs in labels.items():
        if name == "birdnet":
            kinds, texts = birdnet_labels.read_label_texts(birdnet_csv or birdnet_labels.DATA_CSV, labs)
            out[name] = (kinds, texts, birdnet_roles(labs))
        elif name == "yamnet":
            rows = audioset_labels.read_label_texts(audioset_csv or audioset_labels.DATA_CSV, len(labs))
            bad = [(i, r[1], lab) for i, (r, lab) in enumerate(zip(rows, labs, strict=True)) if r[1] != lab]
            if bad:
                raise ExportError(f"AudioSet label texts row {bad[0][0] + 2}: label {bad[0][1]!r} differs from the "
                                  f"model's {bad[0][2]!r}")
            out[name] = ([r[2] for r in rows], [r[3] for r in rows], [CLASS] * len(rows))
        else:
            raise ExportError(f"union bridge: no label texts for expert {name!r} (known: birdnet, yamnet)")
    return out


def _encode(encoder: Any, texts: list[str], progress: bool) -> np.ndarray:
    order = np.argsort([len(a) for a in texts], kind="stable")  # similar lengths batch with little padding
    chunks = [[texts[i] for i in order[s : s + 512]] for s in range(0, len(texts), 512)]
    it: Iterator[list[str]] = iter(chunks)
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="encoding label texts", unit="x512", leave=False)
    parts = [encoder.encode(c) for c in it]
    vecs = np.empty((len(texts), parts[0].shape[1]), np.float32)
    vecs[order] = np.concatenate(parts)
    return vecs


def build_union_index(encoder: Any, labels: Mapping[str, Sequence[str]],
                      tables: Mapping[str, tuple[list[str], list[str], list[int]]],
                      reuse: Mapping[str, LabelIndex] | None = None, progress: bool = True) -> UnionIndex:
    """Encode every expert's label alternatives (or reuse an expert's own index: same encoder,
    same texts) and the union kinds' prototypes."""
    kinds_all = list(audioset_labels.KINDS)
    vec_parts, owner_parts, kinds, roles, names, experts = [], [], [], [], [], []
    offset = 0
    for e, (name, labs) in enumerate(labels.items()):
        k, texts, r = tables[name]
        alts = [(i, a) for i, t in enumerate(texts) for a in birdnet_labels.split_alternatives(t)]
        old = (reuse or {}).get(name)
        if old is not None and old.alt_vectors.shape[0] == len(alts) and np.array_equal(old.alt_label, [i for i, _ in alts]):
            vec_parts.append(old.alt_vectors.astype(np.float32))
        else:
            vec_parts.append(_encode(encoder, [a for _, a in alts], progress))
        # a species' bare common name as one more alternative: "barred owl" must meet "Barred Owl"
        # itself, not "Barred Owl, an owl, a bird call or song" (where AudioSet's "owl" scores as high)
        names_alt = [(i, birdnet_labels.split_label(lab)[1]) for i, (lab, role) in enumerate(zip(labs, r, strict=True))
                     if role == SPECIES]
        if names_alt:
            vec_parts.append(_encode(encoder, [a for _, a in names_alt], progress))
            alts += names_alt
        owner_parts.append(np.asarray([i + offset for i, _ in alts], np.int64))
        kinds += [kinds_all.index(x) for x in k]
        roles += r
        names += list(labs)
        experts += [e] * len(labs)
        offset += len(labs)
    protos = [(kinds_all.index(k), a) for k, t in kind_texts().items() for a in birdnet_labels.split_alternatives(t)]
    li = LabelIndex(
        alt_vectors=np.concatenate(vec_parts), alt_label=np.concatenate(owner_parts),
        label_kind=np.asarray(kinds, np.int64), kind_names=kinds_all,
        proto_vectors=encoder.encode([a for _, a in protos]), proto_kind=np.asarray([k for k, _ in protos], np.int64),
    )
    ptr, ch = class_children(labels)
    return UnionIndex(li, np.asarray(experts, np.int64), np.asarray(roles, np.int64), names, list(labels), ptr, ch)


def class_children(labels: Mapping[str, Sequence[str]], audioset_csv: Path | None = None,
                   ontology: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The union's hierarchy as CSR (child_ptr [U + 1], child_idx): each YAMNet class's direct
    children in the AudioSet ontology that are YAMNet classes too; BirdNET's labels have none."""
    children: list[list[int]] = []
    offset = 0
    for name, labs in labels.items():
        if name != "yamnet":
            children += [[] for _ in labs]
            offset += len(labs)
            continue
        rows = audioset_labels.read_label_texts(audioset_csv or audioset_labels.DATA_CSV, len(labs))
        nodes = audioset_labels.read_ontology(ontology or audioset_labels.ONTOLOGY_JSON)
        pos = {r[0]: offset + i for i, r in enumerate(rows)}
        for mid, *_ in rows:
            node = nodes.get(mid)
            children.append(sorted({pos[c] for c in (node.child_ids if node else ()) if c in pos}))
        offset += len(labs)
    ptr = np.zeros(len(children) + 1, np.int64)
    ptr[1:] = np.cumsum([len(c) for c in children])
    idx = np.asarray([c for cs in children for c in cs], np.int64)
    return ptr, idx


def fit_floors(encoder: Any, index: UnionIndex, quantile: float = 0.95) -> tuple[dict[str, float], str]:
    """Per expert: the ``quantile`` of the best cosine that off-topic texts reach on its labels."""
    q = encoder.encode(list(audioset_labels.OFF_TOPIC_TEXTS))
    sims = np.stack([index.labels.label_similarity(v) for v in q])  # [T, U]
    floors = {}
    for e, name in enumerate(index.expert_names):
        best = sims[:, index.expert_slice(e)].max(axis=1)
        floors[name] = round(float(np.quantile(best, quantile)), 4)
    basis = (f"{quantile:.0%} quantile, per expert, of the best cosine of {len(q)} off-topic texts "
             "(export/audioset_labels.py OFF_TOPIC_TEXTS)")
    return floors, basis


def union_params(index_file: str, index: UnionIndex, floors: dict[str, float], floor_basis: str,
                 enc_info: Mapping[str, Any], text_onnx: str, tokenizer: str,
                 partners: Sequence[Mapping[str, Any]] = PARTNERS) -> dict[str, Any]:
    return {
        "encoder": text_onnx, "tokenizer": tokenizer, "index": index_file, "experts": list(index.expert_names),
        "temperature": TEMPERATURE, "kind_temperature": KIND_TEMPERATURE,
        "class_temperature": CLASS_TEMPERATURE, "temperature_basis": TEMPERATURE_BASIS,
        "child_share": CHILD_SHARE if index.child_ptr is not None and index.child_idx is not None
        and index.child_idx.size else 0.0, "child_share_basis": CHILD_SHARE_BASIS,
        "fit_floor": floors, "fit_floor_basis": floor_basis,
        "partners": [dict(p) for p in partners if p["expert"] in index.expert_names
                     and set(p["counterparts"]) <= set(index.expert_names)],
        "min_expert_weight": MIN_EXPERT_WEIGHT, "max_labels": 64, "rule": RULE,
        "max_tokens": enc_info["max_tokens"], "model": enc_info["model"], "dim": enc_info["dim"],
        "parity_cosine_min": enc_info.get("parity_cosine_min"),
    }


def add_union_bridge(w: BundleWriter, encoder: Any, enc_info: Mapping[str, Any], labels: Mapping[str, Sequence[str]],
                     *, text_onnx: str = "text/all-MiniLM-L6-v2.onnx", tokenizer: str = "text/tokenizer.json",
                     reuse: Mapping[str, LabelIndex] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Write the union index (+ the AudioSet texts and their licence note) into ``w``; return the
    ``server.text`` entries, one ``union_bridge`` TextSpec per expert of ``labels`` (in order)."""
    tables = expert_tables(labels)
    index = build_union_index(encoder, labels, tables, reuse=reuse, progress=progress)
    index.save(w.dest(INDEX_FILE))
    w.register(INDEX_FILE, "server")
    if "yamnet" in labels:
        w.add_file(audioset_labels.DATA_CSV, AUDIOSET_TEXTS_FILE, "server")
        w.add_file(audioset_labels.DATA / "AUDIOSET_ONTOLOGY.md", AUDIOSET_NOTICE_FILE, "server")
    floors, basis = fit_floors(encoder, index)
    params = union_params(INDEX_FILE, index, floors, basis, enc_info, text_onnx, tokenizer)
    return [{"expert": name, "kind": "union_bridge", "params": params} for name in labels]


def with_union_bridge(src: str | Path, out: str | Path, *, threads: int = 2, progress: bool = True) -> Any:
    """Copy a labels bundle with BirdNET and YAMNet experts to ``out``, its text side replaced by
    the union bridge (the experts' own label indexes are kept as files but no longer named)."""
    from edge_retrieval.bundle import load_bundle
    from edge_retrieval.text.sentence import SentenceEncoder

    b = load_bundle(src, part="all")
    server = b.require_server()
    first = server.text[0].params
    for key in ("encoder", "tokenizer", "max_tokens", "model", "dim"):
        if key not in first:
            raise ExportError(f"bundle {str(src)!r}: its first text side has no {key!r} (expected a label_bridge)")
    labels = {e: b.labels(e) for e in b.manifest.expert_names}
    reuse = {t.expert: LabelIndex.load(b.path(t.params["index"])) for t in server.text if t.kind == "label_bridge"}
    m = b.manifest.model_dump(mode="json", exclude={"files"})
    with BundleWriter(out) as w:
        for rel, entry in b.manifest.files.items():
            w.add_file(b.path(rel), rel, entry.part)
        senc = SentenceEncoder(b.path(first["encoder"]), b.path(first["tokenizer"]), threads=threads)
        m["server"]["text"] = add_union_bridge(w, senc, first, labels, text_onnx=first["encoder"],
                                               tokenizer=first["tokenizer"], reuse=reuse, progress=progress)
        return w.commit(m)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_retrieval.export.union_bridge --bundle SRC --out DIR``."""
    import argparse

    p = argparse.ArgumentParser(description="Replace a BirdNET + YAMNet bundle's text side by the union bridge.")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    b = with_union_bridge(a.bundle, a.out, threads=a.threads)
    print(f"wrote {b.root}: text sides {[(t.expert, t.kind) for t in b.manifest.server.text]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
