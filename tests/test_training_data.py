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
