"""NER as generation (jaxfound.data.ner_generative): gold tags -> answer text -> tags is the identity (hand-made
sentences and the real CoNLL-2003 splits), seqeval agrees, and any text parses to valid IOB2 over the words."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxfound.data.conll import iob1_to_iob2, read_conll
from jaxfound.data.ner_generative import SYSTEM, ParseResult, parse_answer, render_answer, to_chat, write_chat_jsonl
from jaxfound.metrics import entity_report

CONLL = Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003"

# (words, IOB1 tags as CoNLL-2003 ships them, the answer)
HAND = [
    ("EU rejects German call to boycott British lamb .".split(),
     ["I-ORG", "O", "I-MISC", "O", "O", "O", "I-MISC", "O", "O"],
     "ORG: EU\nMISC: German\nMISC: British"),
    ("Peter Blackburn".split(), ["I-PER", "I-PER"], "PER: Peter Blackburn"),
    ("The cat sat .".split(), ["O", "O", "O", "O"], "none"),
    # adjacent entities of one type: IOB1 marks the second with B-
    ("he gave Jordan Smith the ball".split(), ["O", "O", "I-PER", "B-PER", "O", "O"], "PER: Jordan\nPER: Smith"),
    ("Paris beat Lyon in Paris .".split(), ["I-ORG", "O", "I-ORG", "O", "I-LOC", "O"],
     "ORG: Paris\nORG: Lyon\nLOC: Paris"),
    ("New York Times reporter in New York".split(), ["I-ORG", "I-ORG", "I-ORG", "O", "O", "I-LOC", "I-LOC"],
     "ORG: New York Times\nLOC: New York"),
]


def iob2(tags) -> list[str]:
    return iob1_to_iob2(list(tags))


@pytest.mark.parametrize("words,tags,answer", HAND)
def test_render_writes_one_type_line_per_entity_in_sentence_order(words, tags, answer):
    assert render_answer(words, tags) == answer
    assert render_answer(words, iob2(tags)) == answer  # IOB2 input renders the same


@pytest.mark.parametrize("words,tags,answer", HAND)
def test_parse_of_the_rendered_answer_gives_the_gold_iob2_tags(words, tags, answer):
    result = parse_answer(answer, words)
    assert result.tags == iob2(tags) and result.num_bad_lines == 0


def test_adjacent_entities_of_one_type_stay_two_entities():
    words = "he gave Jordan Smith the ball".split()
    assert parse_answer("PER: Jordan\nPER: Smith", words).tags == ["O", "O", "B-PER", "B-PER", "O", "O"]
    assert parse_answer("PER: Jordan Smith", words).tags == ["O", "O", "B-PER", "I-PER", "O", "O"]


def test_repeated_mentions_map_in_order_and_a_third_line_is_bad():
    words = "Smith said Smith".split()
    assert parse_answer("PER: Smith", words).tags == ["B-PER", "O", "O"]
    assert parse_answer("PER: Smith\nPER: Smith", words).tags == ["B-PER", "O", "B-PER"]
    result = parse_answer("PER: Smith\nPER: Smith\nPER: Smith", words)
    assert result.tags == ["B-PER", "O", "B-PER"] and result.bad_lines == ("PER: Smith",)


def test_a_span_is_looked_for_after_the_previous_entity_first():
    words = "In May Smith met May".split()  # the month is not an entity, the last May is
    assert parse_answer("PER: Smith\nPER: May", words).tags == ["O", "O", "B-PER", "O", "B-PER"]
    assert parse_answer("PER: May\nPER: Smith", words).tags == ["O", "B-PER", "B-PER", "O", "O"]  # out of order


def test_bad_lines_tag_nothing_and_are_counted():
    words = "EU rejects German call".split()
    text = "ORG: EU\nMISC German\nPERSON: call\nLOC: Berlin\nper: EU\n- MISC: German\nMISC: German call extra\n"
    result = parse_answer(text, words)
    assert result.tags == ["B-ORG", "O", "O", "O"] and result.num_entities == 1
    assert result.bad_lines == ("MISC German", "PERSON: call", "LOC: Berlin", "per: EU", "- MISC: German",
                                "MISC: German call extra")


@pytest.mark.parametrize("text,bad", [("", 1), ("   \n\n", 1), ("none", 0), (" None \n", 0), ("nothing here", 1),
                                      ("ORG:", 1), ("ORG: European Commi", 1), ("none\nORG: EU", 1)])
def test_empty_partial_and_malformed_answers_score_as_what_they_state(text, bad):
    words = "EU rejects European Commission".split()
    result = parse_answer(text, words)
    expected = ["B-ORG", "O", "O", "O"] if "ORG: EU" in text else ["O"] * 4
    assert result.tags == expected and result.num_bad_lines == bad


def test_a_cut_off_answer_keeps_its_complete_lines():
    words = "EU rejects German call to boycott British lamb .".split()
    result = parse_answer("ORG: EU\nMISC: German\nMISC: Briti", words)
    assert result.tags == iob2(["I-ORG", "O", "I-MISC", "O", "O", "O", "O", "O", "O"])
    assert result.num_bad_lines == 1


def test_scores_with_seqeval_count_missed_and_wrong_entities():
    """Two sentences, 4 gold entities; the answers find 2 of them and add 1 wrong: P 2/3, R 2/4."""
    gold, pred = [], []
    for (words, tags, _), answer in zip(HAND[:2], ["ORG: EU\nMISC: boycott\ngarbage", "PER: Peter Blackburn"]):
        gold.append(iob2(tags))
        pred.append(parse_answer(answer, words).tags)
    report = entity_report(gold, pred)
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == pytest.approx(2 / 4)


def test_chat_lines_hold_system_sentence_and_answer(tmp_path):
    src = tmp_path / "x.conll"
    src.write_text("-DOCSTART- -X- O O\n\n" + "\n\n".join(
        "\n".join(f"{w} NN O {t}" for w, t in zip(words, tags)) for words, tags, _ in HAND) + "\n")
    assert write_chat_jsonl(src, tmp_path / "out" / "x.jsonl", limit=4) == 4
    rows = [json.loads(line) for line in (tmp_path / "out" / "x.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row, (words, tags, answer) in zip(rows, HAND):
        assert row == to_chat(words, tags)
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM
        assert row["messages"][1]["content"] == " ".join(words) and row["messages"][2]["content"] == answer


@pytest.mark.parametrize("split", ["valid", "test"])
def test_round_trip_is_exact_on_conll2003(split):
    if not (CONLL / f"{split}.txt").is_file():
        pytest.skip(f"{CONLL / f'{split}.txt'} absent (CoNLL-2003 is read from shared/data, never shipped)")
    sentences = read_conll(CONLL / f"{split}.txt")
    results = [parse_answer(render_answer(s.words, s.tags), s.words) for s in sentences]
    assert [r.tags for r in results] == [list(s.tags) for s in sentences]
    assert sum(r.num_bad_lines for r in results) == 0
    assert entity_report([list(s.tags) for s in sentences], [r.tags for r in results])["f1"] == 1.0


WORDS = st.lists(st.sampled_from(["EU", "German", "call", "Smith", "New", "York", ":", "none", "PER", "a b", ""]),
                 min_size=0, max_size=12)
TEXT = st.one_of(st.text(max_size=80), st.lists(st.tuples(
    st.sampled_from(["PER", "ORG", "LOC", "MISC", "per", "X", ""]), st.sampled_from([":", " : ", "", "::"]),
    st.lists(st.sampled_from(["EU", "German", "Smith", "New", "York", "zz", ":", " "]), max_size=4)),
    max_size=6).map(lambda lines: "\n".join(f"{t}{c}{' '.join(ws)}" for t, c, ws in lines)))


@settings(max_examples=300, deadline=None)
@given(TEXT, WORDS)
def test_any_text_parses_to_valid_iob2_over_the_words(text, words):
    result = parse_answer(text, words)
    assert isinstance(result, ParseResult) and len(result.tags) == len(words)
    prev = "O"
    for tag in result.tags:
        assert tag == "O" or tag[:2] in ("B-", "I-") and tag[2:] in ("PER", "ORG", "LOC", "MISC")
        assert not tag.startswith("I-") or prev[2:] == tag[2:]  # I-X only continues an X (valid IOB2)
        prev = tag
    assert result.num_entities == sum(t.startswith("B-") for t in result.tags)
    assert result.num_entities + result.num_bad_lines >= (1 if not text.strip() else 0)
