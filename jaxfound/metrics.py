"""Evaluation metrics: seqeval entity-level report, the classic token-level per-tag table, accuracy, perplexity."""

from __future__ import annotations

import math

import numpy as np
from seqeval.metrics import classification_report

AVERAGES = ("micro avg", "macro avg", "weighted avg")


def entity_report(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """seqeval (default mode) precision / recall / F1 / support per entity type and averaged.

    Returns {type: {...}, 'micro avg': {...}, ..., 'precision', 'recall', 'f1'} (the last three: micro).
    """
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    report = {k: {m: float(v) for m, v in row.items()} for k, row in report.items()}
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {**report, "precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1-score"]}


def _label_order(labels) -> list[str]:
    """B-*/I-* (and other tags) sorted, then O last."""
    return sorted(set(labels) - {"O"}) + (["O"] if "O" in labels else [])


def token_report(gold: list[list[str]], pred: list[list[str]], labels: list[str] | None = None) -> dict:
    """Per-tag precision / recall / F1 / support over words, plus micro, macro and support-weighted averages."""
    g = np.array([t for s in gold for t in s], dtype=object)
    p = np.array([t for s in pred for t in s], dtype=object)
    if len(g) != len(p):
        raise ValueError(f"gold has {len(g)} tags but predictions {len(p)}")
    labels = _label_order(labels if labels is not None else set(g) | set(p))
    rows, tps, preds, supports = {}, [], [], []
    for lab in labels:
        tp = int(np.sum((g == lab) & (p == lab)))
        n_pred, n_gold = int(np.sum(p == lab)), int(np.sum(g == lab))
        rows[lab] = _prf(tp, n_pred, n_gold)
        tps.append(tp), preds.append(n_pred), supports.append(n_gold)
    tp, n_pred, n_gold = sum(tps), sum(preds), sum(supports)
    rows["micro avg"] = _prf(tp, n_pred, n_gold)
    per = np.array([[rows[lab][m] for m in ("precision", "recall", "f1-score")] for lab in labels]) \
        if labels else np.zeros((0, 3))
    w = np.array(supports, dtype=np.float64)
    rows["macro avg"] = dict(zip(("precision", "recall", "f1-score"), map(float, per.mean(0) if labels else [0] * 3)),
                             support=n_gold)
    weighted = (per * w[:, None]).sum(0) / w.sum() if w.sum() else np.zeros(3)
    rows["weighted avg"] = dict(zip(("precision", "recall", "f1-score"), map(float, weighted)), support=n_gold)
    return rows


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1-score": f1, "support": n_gold}


def format_report(report: dict, digits: int = 3) -> str:
    """sklearn's classification_report layout: one row per label, a blank line, then the averages."""
    labels = [k for k, v in report.items() if isinstance(v, dict) and k not in AVERAGES]
    avgs = [k for k in AVERAGES if k in report]
    width = max([len(k) for k in labels + avgs] + [len("weighted avg"), digits])
    head = ["precision", "recall", "f1-score", "support"]
    lines = [f"{'':>{width}} " + " ".join(f"{h:>9}" for h in head), ""]

    def row(name):
        r = report[name]
        vals = " ".join(f"{r[m]:>9.{digits}f}" for m in head[:3])
        return f"{name:>{width}} {vals} {int(r['support']):>9}"

    lines += [row(k) for k in labels] + [""] + [row(k) for k in avgs]
    return "\n".join(lines) + "\n"


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float(np.mean(pred == gold)) if len(gold) else 0.0


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy in nats), capped to stay finite."""
    return float(math.exp(min(mean_loss, 50.0)))
