"""The task registry: a task name -> (model head, loss, the metric that picks the best checkpoint).

Adding a task touches this file (and its data pipeline), nothing in train/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from jaxfound.errors import JaxfoundError
from jaxfound.train import step


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # bert / gpt head ('mlm', 'lm', 'token_cls', 'seq_cls')
    loss: Callable
    pretraining: bool  # True: a token stream with steps; False: labelled examples with epochs
    metric: str  # the headline metric (higher is better except for *loss / perplexity)


TASKS = {
    "mlm": Task("mlm", "mlm", step.mlm_loss, True, "eval_loss"),
    "clm": Task("clm", "lm", step.clm_loss, True, "eval_loss"),
    "ner": Task("ner", "token_cls", step.token_cls_loss, False, "f1"),
    "cls": Task("cls", "seq_cls", step.seq_cls_loss, False, "accuracy"),
}


def get_task(name: str, arch: str | None = None) -> Task:
    if name not in TASKS:
        raise JaxfoundError(f"unknown task '{name}' (allowed: {', '.join(TASKS)})")
    task = TASKS[name]
    if arch is not None and (name, arch) in (("mlm", "gpt"), ("clm", "bert")):
        good = "gpt" if name == "clm" else "bert"
        raise JaxfoundError(f"train.task={name} needs model.arch={good}, got model.arch={arch}")
    return task
