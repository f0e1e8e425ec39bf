"""Metrics against seqeval and a hand computation."""

import math

import numpy as np
import pytest
from seqeval.metrics import f1_score

from jaxfound import metrics

GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O", "B-LOC"]]
PRED = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O", "O", "B-LOC"]]


def test_entity_report_is_seqeval():
    rep = metrics.entity_report(GOLD, PRED)
    assert rep["f1"] == pytest.approx(f1_score(GOLD, PRED))
    # hand: gold PER, LOC, ORG, LOC; pred PER, ORG(wrong span), ORG(truncated), LOC -> 2 of 4 right
    assert rep["precision"] == pytest.approx(0.5) and rep["recall"] == pytest.approx(0.5)
    assert rep["LOC"]["support"] == 2 and rep["LOC"]["recall"] == pytest.approx(0.5)


def test_token_report_by_hand():
    rep = metrics.token_report(GOLD, PRED)
    assert list(rep) == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O", "micro avg", "macro avg", "weighted avg"]
    # B-LOC: gold 2, predicted 1, right 1 -> p 1, r .5 ; B-ORG: gold 1, predicted 2, right 1 -> p .5, r 1
    assert rep["B-LOC"] == {"precision": 1.0, "recall": 0.5, "f1-score": pytest.approx(2 / 3), "support": 2}
    assert rep["B-ORG"]["precision"] == 0.5 and rep["B-ORG"]["recall"] == 1.0
    assert rep["I-ORG"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    # O: gold 3, predicted 4, right 3
    assert rep["O"]["precision"] == pytest.approx(0.75) and rep["O"]["recall"] == 1.0
    # micro: 7 of 9 words right
    assert rep["micro avg"]["f1-score"] == pytest.approx(7 / 9) and rep["micro avg"]["support"] == 9
    f1s = [2 / 3, 2 / 3, 1.0, 0.0, 1.0, 6 / 7]
    assert rep["macro avg"]["f1-score"] == pytest.approx(np.mean(f1s))
    assert rep["weighted avg"]["f1-score"] == pytest.approx(np.dot(f1s, [2, 1, 1, 1, 1, 3]) / 9)


def test_token_report_matches_sklearn_formulas_on_random_tags():
    rng = np.random.default_rng(0)
    tags = ["B-LOC", "I-LOC", "B-PER", "O"]
    gold = [list(rng.choice(tags, 30)) for _ in range(5)]
    pred = [list(rng.choice(tags, 30)) for _ in range(5)]
    rep = metrics.token_report(gold, pred)
    g, p = np.concatenate(gold), np.concatenate(pred)
    for t in tags:
        tp = np.sum((g == t) & (p == t))
        assert rep[t]["precision"] == pytest.approx(tp / np.sum(p == t))
        assert rep[t]["recall"] == pytest.approx(tp / np.sum(g == t))
    assert rep["micro avg"]["precision"] == pytest.approx(np.mean(g == p))


def test_format_report_has_the_classic_layout():
    text = metrics.format_report(metrics.token_report(GOLD, PRED))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["B-LOC", "1.000", "0.500", "0.667", "2"]
    assert lines[7].split()[0] == "O" and lines[8] == ""
    assert lines[-1].split() == ["weighted", "avg"] + lines[-1].split()[2:]
    assert len(lines[2]) == len(lines[-1])


def test_accuracy_and_perplexity():
    assert metrics.accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(metrics.perplexity(1e9))
