"""Tasks as strategies: which task a config trains, and what each scores (against hand computations)."""

import pytest

from jaxfound.config import load_config
from jaxfound.errors import JaxfoundError
from jaxfound.tasks import TASKS, get_task, resolve_task, whitespace_words


@pytest.mark.parametrize("overrides,name,metric", [
    (["train.task=ner"], "ner", "f1"),
    (["train.task=ner", "data.tag_column=1"], "pos", "accuracy"),  # CoNLL-2003 column 1: POS
    (["train.task=ner", "data.tag_column=2"], "chunk", "f1"),
    (["train.task=pos"], "pos", "accuracy"),
    (["train.task=cls"], "cls", "accuracy"),
])
def test_resolve_task_names_conll_columns_and_headline_metric(overrides, name, metric):
    task = resolve_task(load_config(None, overrides))
    assert (task.name, task.metric) == (name, metric)


def test_pos_is_scored_by_token_accuracy_not_entity_f1():
    gold = [["NNP", "VBZ", "JJ"], ["DT", "NN"]]
    pred = [["NNP", "VBZ", "NN"], ["DT", "NN"]]
    report = TASKS["pos"].score(gold, pred)
    assert report["accuracy"] == pytest.approx(4 / 5) and "f1" not in report
    assert "token accuracy 0.8000" in TASKS["pos"].render(report)


def test_prediction_rows_give_entities_for_iob_tasks_and_tags_for_pos():
    from types import SimpleNamespace

    split = SimpleNamespace(words=[whitespace_words("Ada visits Lyon")])
    ner = TASKS["ner"].rows(["Ada visits Lyon"], split, [["B-PER", "O", "B-LOC"]])
    assert ner[0]["entities"] == [{"type": "PER", "start": 0, "end": 3, "text": "Ada"},
                                  {"type": "LOC", "start": 11, "end": 15, "text": "Lyon"}]
    assert TASKS["pos"].rows(["Ada visits Lyon"], split, [["NNP", "VBZ", "NNP"]]) == [
        {"text": "Ada visits Lyon", "tags": ["NNP", "VBZ", "NNP"]}]


def test_ner_score_is_seqeval_entity_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O"]]
    report = TASKS["ner"].score(gold, pred)
    # 1 of 1 predicted entities right, 1 of 2 gold found: P 1, R 0.5, F1 2/3
    assert (report["precision"], report["recall"]) == (1.0, 0.5) and report["f1"] == pytest.approx(2 / 3)


def test_cls_score_and_prediction_rows():
    report = TASKS["cls"].score(["a", "b", "a"], ["a", "a", "a"])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert TASKS["cls"].rows(["x", "y"], None, ["a", "b"]) == [{"text": "x", "label": "a"},
                                                                {"text": "y", "label": "b"}]


def test_pretraining_task_needs_its_architecture():
    assert get_task("mlm", "bert").head == "mlm"
    with pytest.raises(JaxfoundError, match="train.task=clm needs model.arch gpt or llama"):
        get_task("clm", "bert")
    with pytest.raises(JaxfoundError, match="unknown task 'xyz'"):
        get_task("xyz")


def test_whitespace_words_keep_offsets():
    text = "  EU  rejects\tGerman call "
    assert [(w, text[a:b]) for w, a, b in whitespace_words(text)] == [
        ("EU", "EU"), ("rejects", "rejects"), ("German", "German"), ("call", "call")]
