"""Training data: the paper's linearisations (appendix A.1) checked by hand, the four formats,
and low-data draws that never split a table."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from prefixkit.training.data import DataError, draw, linearise_e2e, load_examples, tables


def test_e2e_meaning_representation_is_linearised_as_in_the_paper():
    # The example of ../shared/data/README.md, plus the renamed fields of appendix A.1.
    assert linearise_e2e("name[The Eagle], eatType[coffee shop]") == "name : The Eagle | Type : coffee shop"
    assert linearise_e2e(
        "name[Alimentum], priceRange[£20-25], customer rating[high], familyFriendly[no], near[Yippee Noodle Bar]"
    ) == "name : Alimentum | price : £20-25 | customer rating : high | family friendly : no | near : Yippee Noodle Bar"
    with pytest.raises(ValueError):
        linearise_e2e("just some words")


def test_e2e_csv_keeps_every_reference_of_a_table_under_one_table():
    examples = load_examples(DATA / "e2e_sample.csv")
    assert len(examples) == 240 and len(tables(examples)) == 25
    first = examples[0]
    assert first.input == "name : Alimentum | area : city centre | family friendly : no"
    assert first.output == "There is a place in the city centre, Alimentum, that is not family-friendly."


def test_webnlg_xml_triples_become_subject_relation_object_with_category():
    examples = load_examples(DATA / "webnlg_sample.xml")
    assert len(examples) == 15 and len(tables(examples)) == 5
    assert examples[0].input == "Aarhus Airport : cityServed : Aarhus, Denmark"
    assert examples[0].output == "The Aarhus is the airport of Aarhus, Denmark."
    assert examples[0].category == "Airport"
    two = [e for e in examples if e.category == "Astronaut"][0]
    assert two.input == "Alan Bean : birthDate : 1932-03-15 | Alan Bean : almaMater : UT Austin, B.S. 1955"


def test_dart_json_triples_are_linearised_and_every_annotation_is_a_reference():
    examples = load_examples(DATA / "dart_sample.json")
    records = json.loads((DATA / "dart_sample.json").read_text())
    assert len(examples) == sum(len(r["annotations"]) for r in records)
    assert examples[0].input == "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, North Carolina"
    assert examples[0].output == "A school from Mars Hill, North Carolina, joined in 1973."


def test_jsonl_lines_with_the_same_input_are_references_of_one_table(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"input": "a", "output": "x"}\n{"input": "a", "output": "y"}\n\n{"input": "b", "output": ["z", "w"]}\n')
    examples = load_examples(path)
    assert [(e.input, e.output) for e in examples] == [("a", "x"), ("a", "y"), ("b", "z"), ("b", "w")]
    assert len(tables(examples)) == 2
    path.write_text('{"input": "a"}\n')
    with pytest.raises(DataError, match="line 1"):
        load_examples(path)


@pytest.mark.parametrize("limit", [50, 13])
def test_low_data_draw_has_exactly_limit_examples_and_shares_no_table_with_dev(limit):
    examples = load_examples(DATA / "e2e_sample.csv")
    train, dev = draw(examples, limit=limit, dev_fraction=0.3, seed=1)
    assert len(train) == limit and len(dev) == round(0.3 * limit)
    assert not set(tables(train)) & set(tables(dev))
    assert draw(examples, limit=limit, dev_fraction=0.3, seed=1) == (train, dev)
    assert draw(examples, limit=limit, dev_fraction=0.3, seed=2)[0] != train


def test_dev_fraction_without_limit_holds_out_whole_tables():
    examples = load_examples(DATA / "e2e_sample.csv")
    train, dev = draw(examples, dev_fraction=0.2, seed=0)
    assert len(tables(dev)) == 5 and len(train) + len(dev) == len(examples)
    assert not set(tables(train)) & set(tables(dev))
    with pytest.raises(ValueError, match="only"):
        draw(examples, limit=1000)


def test_e2e_split_keeps_every_table_whole_on_one_side_and_is_seeded(tmp_path):
    from prefixkit.training.data import split_e2e_csv

    source = DATA / "e2e_sample.csv"
    rest = split_e2e_csv(source, 2, 7, tmp_path / "test.csv", tmp_path / "rest.csv")
    test_tables = tables(load_examples(tmp_path / "test.csv"))
    rest_tables = tables(load_examples(tmp_path / "rest.csv"))
    everything = tables(load_examples(source))
    assert len(test_tables) == 2 and len(rest_tables) == rest == len(everything) - 2
    assert not set(test_tables) & set(rest_tables)
    for table, refs in everything.items():  # every reference of a table lands on the same side
        assert (test_tables.get(table) or rest_tables[table]) == refs
    again = split_e2e_csv(source, 2, 7, tmp_path / "t2.csv", tmp_path / "r2.csv")
    assert again == rest and (tmp_path / "t2.csv").read_bytes() == (tmp_path / "test.csv").read_bytes()


def test_webnlg_entries_written_together_read_back_as_separate_tables(tmp_path):
    from prefixkit.training.data import webnlg_entries, write_webnlg_entries

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.xml").write_bytes((DATA / "webnlg_sample.xml").read_bytes())
    (folder / "b.xml").write_bytes((DATA / "webnlg_sample.xml").read_bytes())  # the same ids again
    entries = webnlg_entries(folder)
    original = load_examples(DATA / "webnlg_sample.xml")
    write_webnlg_entries(entries, tmp_path / "all.xml")
    merged = load_examples(tmp_path / "all.xml")
    assert len(merged) == 2 * len(original)
    assert len(tables(merged)) == 2 * len(tables(original))  # renumbered: no two entries share an id
    assert [(e.input, e.output, e.category) for e in merged] == [(e.input, e.output, e.category)
                                                                  for e in original + original]
