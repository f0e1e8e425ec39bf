"""Tasks as strategies: each task owns its reader, model head, loss, decoding, scores, headline metric and report.

    task = resolve_task(cfg)                       # ner | pos | chunk | cls | sft | mlm | clm
    split = task.read("test.txt", cfg.data, labels, tokenizer, seq_len)
    report = task.score(split.gold, task.decode(split, window_preds, labels))

Adding a task touches this file (and its data reader), nothing in train/ or the drivers.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxfound import losses, metrics
from jaxfound.data import finetune as ftdata
from jaxfound.data import sft
from jaxfound.data.conll import read_conll, tag_spans
from jaxfound.errors import JaxfoundError

HEAD_TASK = {"token_cls": "ner", "seq_cls": "cls", "mlm": "mlm", "lm": "clm", "none": "mlm"}  # a bare model's task


@dataclass
class Split:
    """One file (or the texts to predict), tokenized: windows plus the gold labels."""

    path: str
    windows: ftdata.Windows
    gold: list  # tagging: a tag list per sentence; cls: a label per text (None entries when predicting)
    words: list  # tagging: word tuples (or (word, start, end) when predicting); cls: texts
    truncated: int = 0  # cls only: texts longer than seq_len


def whitespace_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character offsets of whitespace-separated words."""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


@dataclass(frozen=True)
class Task:
    """A pretraining objective: a token stream trained for train.steps, scored by held-out loss."""

    name: str
    head: str  # the model head: 'mlm', 'lm', 'token_cls', 'seq_cls'
    loss: Callable
    metric: str = "eval_loss"  # the headline metric: the best checkpoint maximises it (losses: reported only)
    archs: tuple[str, ...] = ()  # the architectures it can train (empty: any)
    pretraining: bool = True


@dataclass(frozen=True)
class Tagging(Task):
    """Word tagging on CoNLL files: one tag per word, predicted at the word's first subword."""

    column: int | None = None  # the CoNLL tag column (None: data.tag_column)
    entities: bool = True  # IOB spans scored with seqeval; else token accuracy
    token_level: bool = True

    def labels(self, data_cfg) -> list[str]:
        return sorted({t for s in read_conll(data_cfg.train, data_cfg.token_column, self.tag_column(data_cfg))
                       for t in s.tags})

    def tag_column(self, data_cfg) -> int:
        return data_cfg.tag_column if self.column is None else self.column

    def read(self, path, data_cfg, labels, tokenizer, seq_len: int) -> Split:
        sents = read_conll(path, data_cfg.token_column, self.tag_column(data_cfg))
        label2id = {t: i for i, t in enumerate(labels)}
        unseen = sorted({t for s in sents for t in s.tags} - set(label2id))
        if unseen:
            warnings.warn(f"{path}: tags {unseen} do not occur in the training labels; they count as misses",
                          stacklevel=2)
        ids = [np.array([label2id.get(t, ftdata.IGNORE) for t in s.tags], np.int32) for s in sents]
        windows = ftdata.encode_words([s.words for s in sents], ids, tokenizer, seq_len)
        return Split(str(path), windows, [list(s.tags) for s in sents], [s.words for s in sents])

    def inputs(self, texts: list[str], tokenizer, seq_len: int) -> Split:
        """Texts to predict: whitespace words with their character offsets."""
        words = [whitespace_words(t) for t in texts]
        windows = ftdata.encode_words([[w for w, _, _ in ws] for ws in words], None, tokenizer, seq_len)
        return Split("<input>", windows, [None] * len(texts), words)

    def decode(self, split: Split, preds: list[np.ndarray], labels: list[str]) -> list:
        return [[labels[i] for i in words] for words in ftdata.merge_windows(split.windows, preds)]

    def score(self, gold: list, pred: list) -> dict:
        tok = metrics.token_report(gold, pred)
        if self.entities:
            ent = metrics.entity_report(gold, pred)
            head = {"f1": ent["f1"], "precision": ent["precision"], "recall": ent["recall"], "entity": ent}
        else:
            head = {"accuracy": metrics.accuracy([t for s in pred for t in s], [t for s in gold for t in s])}
        return {**head, "token_micro_f1": tok["micro avg"]["f1-score"], "token": tok}

    def render(self, report: dict) -> str:
        tags = "IOB2 tags" if self.entities else "tags"
        token = f"\ntoken level (word {tags})\n" + metrics.format_report(report["token"])
        if not self.entities:
            return f"token accuracy {report['accuracy']:.4f}" + token
        ent = {k: v for k, v in report["entity"].items() if isinstance(v, dict)}
        return "entity level (seqeval, default mode)\n" + metrics.format_report(ent) + token

    def rows(self, texts: list[str], split: Split, pred: list) -> list[dict]:
        """Per text: the entities (type, character offsets, text; IOB tasks) and the word tags."""
        out = []
        for text, ws, tags in zip(texts, split.words, pred):
            ents = [{"type": kind, "start": ws[a][1], "end": ws[b - 1][2], "text": text[ws[a][1]:ws[b - 1][2]]}
                    for kind, a, b in tag_spans(tags)]
            out.append({"text": text, **({"entities": ents} if self.entities else {}), "tags": tags})
        return out


@dataclass(frozen=True)
class Classify(Task):
    """Text classification from CSV / JSON lines: one label per text, read at [CLS]."""

    token_level: bool = False

    def labels(self, data_cfg) -> list[str]:
        return sorted(set(ftdata.read_table(data_cfg.train, data_cfg.text_column, data_cfg.label_column)[1]))

    def read(self, path, data_cfg, labels, tokenizer, seq_len: int) -> Split:
        texts, gold = ftdata.read_table(path, data_cfg.text_column, data_cfg.label_column)
        label2id = {t: i for i, t in enumerate(labels)}
        windows, truncated = ftdata.encode_texts(texts, [label2id.get(g, ftdata.IGNORE) for g in gold],
                                                 tokenizer, seq_len)
        return Split(str(path), windows, gold, texts, truncated)

    def inputs(self, texts: list[str], tokenizer, seq_len: int) -> Split:
        windows, _ = ftdata.encode_texts(texts, None, tokenizer, seq_len)
        return Split("<input>", windows, [None] * len(texts), texts)

    def decode(self, split: Split, preds: list[np.ndarray], labels: list[str]) -> list:
        return [labels[int(p)] for p in preds]

    def score(self, gold: list, pred: list) -> dict:
        tok = metrics.token_report([gold], [pred])
        return {"accuracy": metrics.accuracy(pred, gold), "macro_f1": tok["macro avg"]["f1-score"], "labels": tok}

    def render(self, report: dict) -> str:
        return f"accuracy {report['accuracy']:.4f}\n" + metrics.format_report(report["labels"])

    def rows(self, texts: list[str], split: Split, pred: list) -> list[dict]:
        return [{"text": t, "label": label} for t, label in zip(texts, pred)]


@dataclass(frozen=True)
class Instruction(Task):
    """Instruction fine-tuning (SFT) of a causal decoder on chat (messages) or prompt / completion JSON lines,
    packed several examples per row; scored by held-out loss over the trained tokens (lower is better)."""

    def read(self, path, tokenizer, seq_len: int) -> sft.SFTData:
        return sft.read_sft(path, tokenizer, seq_len)


TASKS = {
    "mlm": Task("mlm", "mlm", losses.mlm_loss, archs=("bert", "roberta")),
    "clm": Task("clm", "lm", losses.clm_loss, archs=("gpt", "llama")),
    "ner": Tagging("ner", "token_cls", losses.token_cls_loss, "f1", pretraining=False),
    "pos": Tagging("pos", "token_cls", losses.token_cls_loss, "accuracy", pretraining=False, column=1,
                   entities=False),
    "chunk": Tagging("chunk", "token_cls", losses.token_cls_loss, "f1", pretraining=False, column=2),
    "cls": Classify("cls", "seq_cls", losses.seq_cls_loss, "accuracy", pretraining=False),
    "sft": Instruction("sft", "lm", losses.sft_loss, "eval_loss", archs=("gpt", "llama"), pretraining=False),
}
CONLL_COLUMNS = {1: "pos", 2: "chunk"}  # CoNLL-2003: `train.task=ner data.tag_column=1` is POS tagging


def get_task(name: str, arch: str | None = None) -> Task:
    """The task called name; arch (if given) must be one it can train."""
    if name not in TASKS:
        raise JaxfoundError(f"unknown task '{name}' (allowed: {', '.join(TASKS)})")
    task = TASKS[name]
    if arch is not None and task.archs and arch not in task.archs:
        raise JaxfoundError(f"train.task={name} needs model.arch {' or '.join(task.archs)}, got model.arch={arch}")
    return task


def resolve_task(cfg) -> Task:
    """The task a config trains: train.task, with CoNLL's POS / chunk columns named as their own tasks."""
    name = cfg.train.task
    if name == "ner":
        name = CONLL_COLUMNS.get(cfg.data.tag_column, name)
    return get_task(name)
