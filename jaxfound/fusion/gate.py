"""The gate on a merge's claims: a merged model is claimed for a task only if it keeps >= `threshold` of every
parent's validation score on that task (retention = merged score / parent score).

    report = gate({"ner": 0.88}, {"ner": {"ner-a": 0.90, "ner-b": 0.86}}, threshold=0.95)
    report.passed_tasks, print(report.table())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from jaxfound.errors import JaxfoundError

DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class Claim:
    """One (task, parent) pair: the parent's and the merged model's validation scores, the retention, the verdict."""

    task: str
    parent: str
    parent_score: float
    score: float
    retention: float
    passed: bool


@dataclass(frozen=True)
class GateReport:
    """Every claim, and the tasks whose every parent is kept at >= threshold."""

    threshold: float
    claims: tuple[Claim, ...]

    @property
    def passed_tasks(self) -> list[str]:
        tasks = list(dict.fromkeys(c.task for c in self.claims))
        return [t for t in tasks if all(c.passed for c in self.claims if c.task == t)]

    def passed(self, task: str) -> bool:
        return task in self.passed_tasks

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "passed_tasks": self.passed_tasks,
                "claims": [asdict(c) for c in self.claims]}

    def table(self) -> str:
        rows = [f"  {'task':<22} {'parent':<28} {'parent':>7} {'merged':>7} {'kept':>7}  "
                f"verdict (>= {self.threshold:g})"]
        rows += [f"  {c.task:<22} {c.parent:<28} {c.parent_score:>7.4f} {c.score:>7.4f} {c.retention:>7.3f}  "
                 f"{'pass' if c.passed else 'FAIL'}" for c in self.claims]
        return "\n".join(rows)


def retention(score: float, parent_score: float) -> float:
    """score / parent_score; a parent scoring <= 0 is kept by any score >= its own."""
    if parent_score > 0:
        return score / parent_score
    return 1.0 if score >= parent_score else 0.0


def worst_retention(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """min over tasks of scores[task] / reference[task]: the objective of a multi-task merge."""
    missing = [t for t in reference if t not in scores]
    if missing:
        raise JaxfoundError(f"worst_retention: no score for task(s) {missing}; scored: {sorted(scores)}")
    return min(retention(scores[t], reference[t]) for t in reference) if reference else -math.inf


def gate(scores: Mapping[str, float], parent_scores: Mapping[str, Mapping[str, float]],
         threshold: float = DEFAULT_THRESHOLD) -> GateReport:
    """Judge the merged model's score on each task against each parent's score on it (both on validation)."""
    if not 0.0 < threshold <= 1.5:
        raise JaxfoundError(f"gate threshold={threshold}; give the fraction of each parent's score to keep, "
                            "in (0, 1.5], e.g. 0.95")
    claims = []
    for task, parents in parent_scores.items():
        if task not in scores:
            raise JaxfoundError(f"gate: the merged model has no score on task '{task}'; scored: {sorted(scores)}")
        for parent, parent_score in parents.items():
            r = retention(scores[task], parent_score)
            claims.append(Claim(task, parent, float(parent_score), float(scores[task]), r, r >= threshold))
    return GateReport(threshold, tuple(claims))
