"""`jaxfound finetune / evaluate / predict`: NER (CoNLL) and text classification (CSV / JSON lines).

    summary = finetune(cfg)                        # trains, keeps the best valid F1, reports on test
    report = evaluate("runs/ner", "test.txt")      # entity + token-level reports from the run dir alone
    rows = predict("runs/ner", texts=["EU rejects German call"])

A run dir holds everything needed later: config.json (model config included), labels.json,
tokenizer/, best/ (params).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound import checkpoint as ckpt
from jaxfound import metrics
from jaxfound.config import from_dict, replace
from jaxfound.data import finetune as ftdata
from jaxfound.data.conll import read_conll, tag_spans
from jaxfound.data.pipeline import fingerprint
from jaxfound.data.tokenizer import load_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.quant.checkpoint import META_FILE as QUANT_META
from jaxfound.sharding import LOGICAL_RULES, activation_sharding, global_batch, make_mesh
from jaxfound.tasks import get_task

EVAL_BATCH = 64


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """One file, tokenized: windows plus the gold labels (word tags per sentence, or one label per text)."""

    path: str
    windows: ftdata.Windows
    gold: list  # ner: list of tag lists; cls: list of label strings
    words: list  # ner: word tuples; cls: texts
    truncated: int = 0  # cls only: texts longer than seq_len


def read_split(path, task: str, data_cfg, labels: list[str] | None, tokenizer, seq_len: int) -> Split:
    """Read and tokenize a file; labels None -> prediction only (no gold needed for cls)."""
    label2id = {t: i for i, t in enumerate(labels or [])}
    if task == "ner":
        sents = read_conll(path, data_cfg.token_column, data_cfg.tag_column)
        unseen = sorted({t for s in sents for t in s.tags} - set(label2id))
        if unseen and labels is not None:
            warnings.warn(f"{path}: tags {unseen} do not occur in the training labels; they count as misses",
                          stacklevel=2)
        ids = [np.array([label2id.get(t, ftdata.IGNORE) for t in s.tags], np.int32) for s in sents]
        windows = ftdata.encode_words([s.words for s in sents], ids, tokenizer, seq_len)
        return Split(str(path), windows, [list(s.tags) for s in sents], [s.words for s in sents])
    texts, gold = ftdata.read_table(path, data_cfg.text_column, data_cfg.label_column)
    ids = [label2id.get(g, ftdata.IGNORE) for g in gold]
    windows, truncated = ftdata.encode_texts(texts, ids, tokenizer, seq_len)
    return Split(str(path), windows, gold, texts, truncated)


# ---------------------------------------------------------------- model


def _graft(fresh: dict, trunk: dict, source: str) -> dict:
    """The fresh params with every part the pretrained model has (trunk, pooler, a head it keeps) taken from it."""
    out = dict(fresh)
    for key, value in trunk.items():
        if key in fresh:
            want = jax.tree.map(lambda x: tuple(x.shape), fresh[key])
            got = jax.tree.map(lambda x: tuple(np.shape(x)), value)
            if want != got:
                raise JaxfoundError(f"{source}: pretrained '{key}' params do not match the model config")
            out[key] = value
    return out


def _hf_base(path: str, head: str, labels: list[str], model_cfg):
    """(ModelConfig, params to start from) from a transformers dir; the head is new unless its labels match."""
    from jaxfound.interop.hf import from_pretrained, load_hf_config, read_weights

    info = load_hf_config(path)
    cfg = dataclasses.replace(info.model, num_labels=len(labels), dtype=model_cfg.dtype,
                              param_dtype=model_cfg.param_dtype, remat=model_cfg.remat, init=path)
    if info.head == head and [info.id2label.get(i) for i in range(len(info.id2label))] == labels:
        return cfg, from_pretrained(path, head)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint's own head is dropped on purpose
        _, trunk = from_pretrained(path, "none")
    if head == "seq_cls":
        raw = read_weights(path)
        w, b = raw.get("pooler.dense.weight", raw.get("bert.pooler.dense.weight")), \
            raw.get("pooler.dense.bias", raw.get("bert.pooler.dense.bias"))
        if w is not None and b is not None:
            trunk["pooler"] = {"kernel": jnp.asarray(np.asarray(w, np.float32).T), "bias": jnp.asarray(b)}
    return cfg, trunk


def _run_base(run_dir: Path, head: str, labels: list[str], model_cfg):
    """(ModelConfig, params) from a jaxfound run dir: a pretraining run (its latest checkpoint: the trunk), or a
    fine-tuned / merged one (its best/ params; the head too when its task and labels are the same, so that
    training continues from it, e.g. re-fitting the head of a merged model with train.freeze=trunk)."""
    from jaxfound.tasks import get_task

    saved = from_dict(ckpt.read_config(run_dir), source=str(run_dir / "config.json"))
    labels_file = run_dir / "labels.json"
    if labels_file.is_file() and (run_dir / "best").exists():
        params = ckpt.load_params(run_dir / "best")
        same = get_task(saved.train.task).head == head and json.loads(labels_file.read_text()) == labels
    else:
        params, same = ckpt.latest_params(run_dir), False
    cfg = dataclasses.replace(saved.model, num_labels=len(labels), dtype=model_cfg.dtype,
                              param_dtype=model_cfg.param_dtype, remat=model_cfg.remat, init=str(run_dir))
    return cfg, dict(params) if same else {k: v for k, v in params.items() if k in ("bert", "gpt")}


def load_base(cfg, head: str, labels: list[str]):
    """(ModelConfig, pretrained params or {}, tokenizer) for model.init: a transformers dir or a jaxfound run dir."""
    init = cfg.model.init
    if init is None:
        if not cfg.data.tokenizer:
            raise JaxfoundError("fine-tuning needs model.init (a transformers dir or a jaxfound run dir), "
                                "or data.tokenizer to train from scratch")
        tok = load_tokenizer(cfg.data.tokenizer)
        vocab = -(-len(tok) // 128) * 128
        return dataclasses.replace(cfg.model, vocab_size=vocab, num_labels=len(labels)), {}, tok
    path = Path(init)
    if (path / "config.json").is_file() and ((path / "checkpoints").is_dir() or (path / "best").is_dir()):
        model_cfg, params = _run_base(path, head, labels, cfg.model)
        tok = load_tokenizer(str(path / "tokenizer")) if not cfg.data.tokenizer else load_tokenizer(cfg.data.tokenizer)
    elif (path / "config.json").is_file():
        model_cfg, params = _hf_base(str(path), head, labels, cfg.model)
        tok = load_tokenizer(cfg.data.tokenizer or str(path))
    else:
        raise JaxfoundError(f"model.init={init}: not a transformers dir (config.json + model.safetensors) "
                            "nor a jaxfound run dir (config.json + checkpoints/ or best/)")
    return model_cfg, params, tok


def init_params(model, seq_len: int, seed: int, pretrained: dict, source: str) -> dict:
    """Pretrained parts copied in; the rest (the new head) drawn as BERT does: N(0, 0.02) weights, zero biases."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
    rng = np.random.default_rng([seed, 17])

    def fresh(path, x):
        name = getattr(path[-1], "key", "")
        if name in ("kernel", "embedding"):
            return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
        return np.ones(x.shape, x.dtype) if name == "scale" else np.zeros(x.shape, x.dtype)

    missing = {k: v for k, v in shapes.items() if k not in pretrained}
    return _graft({**shapes, **jax.tree_util.tree_map_with_path(fresh, missing)}, pretrained, source) \
        if pretrained else jax.tree_util.tree_map_with_path(fresh, shapes)


# ---------------------------------------------------------------- prediction


def make_predict_step(model, mesh):
    """jit (params, batch) -> argmax labels, replicated on every process."""
    def fn(params, batch):
        with activation_sharding(mesh, LOGICAL_RULES):
            logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                 batch.get("token_type_ids"))
        return jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def predict_windows(predict_step, params, batches, mesh, num_windows: int) -> list[np.ndarray]:
    """Predictions for every window (position-wise for ner, one label for cls), in window order."""
    out = [None] * num_windows
    p, n = jax.process_index(), jax.process_count()
    for rows, batch in batches:
        b = len(rows) // n
        local = {k: v[p * b:(p + 1) * b] for k, v in batch.items() if k != "labels"}
        pred = np.asarray(jax.device_get(predict_step(params, global_batch(local, mesh))))
        for j, r in enumerate(rows):
            if r >= 0:
                out[r] = pred[j]
    return out


def _eval_batch_size(mesh, batch_size: int) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-max(batch_size, EVAL_BATCH) // shards) * shards


def decode(task: str, split: Split, preds: list[np.ndarray], labels: list[str]) -> list:
    """Window predictions -> word tags per sentence (ner) or one label per text (cls)."""
    if task == "ner":
        return [[labels[i] for i in words] for words in ftdata.merge_windows(split.windows, preds)]
    return [labels[int(p)] for p in preds]


def score(task: str, gold: list, pred: list, labels: list[str]) -> dict:
    """ner: entity report (seqeval) + token-level table; cls: accuracy + per-label table."""
    if task == "ner":
        ent = metrics.entity_report(gold, pred)
        tok = metrics.token_report(gold, pred)
        return {"f1": ent["f1"], "precision": ent["precision"], "recall": ent["recall"],
                "token_micro_f1": tok["micro avg"]["f1-score"], "entity": ent, "token": tok}
    tok = metrics.token_report([gold], [pred])
    return {"accuracy": metrics.accuracy(pred, gold), "macro_f1": tok["macro avg"]["f1-score"], "labels": tok}


def render(task: str, report: dict) -> str:
    """The printed tables of a report."""
    if task == "ner":
        ent = {k: v for k, v in report["entity"].items() if isinstance(v, dict)}
        return ("entity level (seqeval, default mode)\n" + metrics.format_report(ent) +
                "\ntoken level (word IOB2 tags)\n" + metrics.format_report(report["token"]))
    return f"accuracy {report['accuracy']:.4f}\n" + metrics.format_report(report["labels"])


# ---------------------------------------------------------------- finetune


def _headline(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def finetune(cfg) -> dict:
    """Fine-tune model.init on data.train (ner | cls), keep the best valid checkpoint, report on test."""
    from jaxfound.train.loop import Job, check_run_dir, fit

    task = get_task(cfg.train.task)
    if task.pretraining:
        raise JaxfoundError(f"train.task={task.name} is a pretraining task; finetune takes ner or cls "
                            "(use `jaxfound pretrain`)")
    if not cfg.data.train:
        raise JaxfoundError("data.train is not set: give the training file (CoNLL for ner, CSV/JSON lines for cls)")
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)
    seq_len = cfg.data.seq_len

    # ---- Labels, base model, tokenizer ----
    if task.name == "ner":
        train_sents = read_conll(cfg.data.train, cfg.data.token_column, cfg.data.tag_column)
        labels = sorted({t for s in train_sents for t in s.tags})
    else:
        labels = sorted(set(ftdata.read_table(cfg.data.train, cfg.data.text_column, cfg.data.label_column)[1]))
    if len(labels) < 2:
        raise JaxfoundError(f"{cfg.data.train}: only {len(labels)} distinct label(s) {labels}; need at least 2")
    if cfg.train.freeze == "trunk" and cfg.model.init is None:
        raise JaxfoundError("train.freeze=trunk trains only the head, so model.init must give a trained trunk "
                            "(a transformers dir or a jaxfound run dir)")
    model_cfg, pretrained, tokenizer = load_base(cfg, task.head, labels)
    if seq_len > model_cfg.max_position:
        raise JaxfoundError(f"data.seq_len={seq_len} exceeds the model's {model_cfg.max_position} positions; "
                            f"set data.seq_len <= {model_cfg.max_position}")
    _, _, pad_id = ftdata._specials(tokenizer)

    # ---- Data: tokenize every split once ----
    splits = {name: read_split(path, task.name, cfg.data, labels, tokenizer, seq_len)
              for name, path in (("train", cfg.data.train), ("valid", cfg.data.valid), ("test", cfg.data.test))
              if path}
    for name, s in splits.items():
        if s.windows.num_split or s.truncated or s.windows.num_cut_words:
            print(f"{name}: {s.windows.num_split} of {len(s.gold)} sentences longer than seq_len={seq_len} "
                  f"split into overlapping windows" if task.name == "ner" else
                  f"{name}: {s.truncated} of {len(s.gold)} texts truncated to seq_len={seq_len}")
    train = ftdata.BucketedBatches(splits["train"].windows, cfg.train.batch_size, cfg.train.seed, seq_len, pad_id,
                                   task.name == "ner", cfg.data.length_bucketing,
                                   epochs=cfg.train.epochs)
    total_steps = cfg.train.epochs * train.steps_per_epoch

    # ---- Model, params, run dir contents ----
    model = build_model(model_cfg, task.head)
    params0 = init_params(model, seq_len, cfg.train.seed, pretrained, str(cfg.model.init))
    cfg = replace(cfg, model=dataclasses.asdict(model_cfg),
                  train={"eval_every": train.steps_per_epoch, "log_every": min(cfg.train.log_every,
                                                                               train.steps_per_epoch)})
    if jax.process_index() == 0:
        (run_dir / "labels.json").write_text(json.dumps(labels, indent=1))
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    # ---- Evaluation on valid each epoch ----
    mesh = make_mesh(cfg.mesh)
    predict_step = make_predict_step(model, mesh)
    ebs = _eval_batch_size(mesh, cfg.train.batch_size)
    eval_sets = {name: ftdata.eval_batches(s.windows, ebs, seq_len, pad_id, task.name == "ner")
                 for name, s in splits.items() if name != "train"}

    def run_eval(params, name):
        s = splits[name]
        preds = predict_windows(predict_step, params, eval_sets[name], mesh, len(s.windows))
        return score(task.name, s.gold, decode(task.name, s, preds, labels), labels)

    def evaluate(params, step):
        return _headline(run_eval(params, "valid")) if "valid" in splits else {}

    extra = {"task": task.name, "labels": labels, "init": cfg.model.init,
             "train_sentences": len(splits["train"].gold), "train_windows": len(splits["train"].windows),
             "split_sentences": {n: s.windows.num_split for n, s in splits.items()},
             "steps_per_epoch": train.steps_per_epoch, "batch_lengths": train.buckets.tolist()}
    job = Job(model=model, task=task, total_steps=total_steps, evaluate=evaluate, seq_len=seq_len,
              make_iterator=lambda: ftdata.batch_iterator(train, total_steps, jax.process_index(),
                                                          jax.process_count()),
              init_params=params0, best_metric=task.metric if "valid" in splits else None, extra=extra,
              data_fingerprint=fingerprint(splits["train"].windows.input_ids, splits["train"].windows.labels))
    summary = fit(cfg, job)

    # ---- Reports with the best params ----
    state = summary.pop("state")
    if "valid" in splits and (run_dir / "best").exists():
        best = ckpt.load_params(run_dir / "best")
    else:
        best = state.params
        ckpt.save_params(run_dir / "best", best)
    summary["reports"] = {}
    for name in ("valid", "test"):
        if name in splits:
            report = run_eval(best, name)
            if jax.process_index() == 0:
                (run_dir / f"report_{name}.json").write_text(json.dumps(report, indent=1))
            print(f"\n== {name} ({splits[name].path}), best params ==\n{render(task.name, report)}")
            summary["reports"][name] = _headline(report)
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        from jaxfound.fusion.registry import register_finetune_run

        register_finetune_run(cfg, summary, best)  # a no-op unless run.registry is set
    return summary


# ---------------------------------------------------------------- a fine-tuned run, reloaded


@dataclass
class FinetunedRun:
    cfg: object
    task: object
    model: object
    params: dict
    tokenizer: object
    labels: list[str]

    @property
    def pad_id(self) -> int:
        return ftdata._specials(self.tokenizer)[2]


def load_run(run_dir) -> FinetunedRun:
    """Everything `finetune` saved in a run dir: config, labels, tokenizer and the best params (int8 if quantized)."""
    run_dir = Path(run_dir)
    cfg = from_dict(ckpt.read_config(run_dir), source=str(run_dir / "config.json"))
    task = get_task(cfg.train.task)
    labels_file = run_dir / "labels.json"
    if task.pretraining or not labels_file.is_file():
        raise JaxfoundError(f"{run_dir}: not a fine-tuned run (needs labels.json and train.task ner or cls)")
    labels = json.loads(labels_file.read_text())
    model = build_model(cfg.model, task.head)
    if (run_dir / QUANT_META).is_file():  # written by `jaxfound quantize`: int8 kernels + scales, no best/
        from jaxfound.quant.run import load_quantized_params

        params = load_quantized_params(run_dir)
    else:
        params = ckpt.load_params(run_dir / "best")
    return FinetunedRun(cfg, task, model, params, load_tokenizer(str(run_dir / "tokenizer")), labels)


def _predictions(run: FinetunedRun, split: Split) -> list:
    mesh = make_mesh(dataclasses.replace(run.cfg.mesh, data=-1, fsdp=1, tensor=1))
    batches = ftdata.eval_batches(split.windows, _eval_batch_size(mesh, run.cfg.train.batch_size),
                                  run.cfg.data.seq_len, run.pad_id, run.task.name == "ner")
    preds = predict_windows(make_predict_step(run.model, mesh), run.params, batches, mesh, len(split.windows))
    return decode(run.task.name, split, preds, run.labels)


def evaluate(run_dir, file, out: str | Path | None = None) -> dict:
    """Score a fine-tuned run on a labelled file (CoNLL for ner, CSV / JSON lines for cls); writes JSON if out."""
    run = load_run(run_dir)
    split = read_split(file, run.task.name, run.cfg.data, run.labels, run.tokenizer, run.cfg.data.seq_len)
    report = score(run.task.name, split.gold, _predictions(run, split), run.labels)
    report["file"] = str(file)
    report["table"] = render(run.task.name, report)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def whitespace_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) character offsets of whitespace-separated words."""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def predict(run_dir, texts: list[str]) -> list[dict]:
    """ner: entities with character offsets per text; cls: the label per text."""
    run = load_run(run_dir)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise JaxfoundError("predict: nothing to predict (give texts or a non-empty file)")
    seq_len = run.cfg.data.seq_len
    if run.task.name == "cls":
        windows, _ = ftdata.encode_texts(texts, None, run.tokenizer, seq_len)
        split = Split("<input>", windows, [None] * len(texts), texts)
        return [{"text": t, "label": lab} for t, lab in zip(texts, _predictions(run, split))]
    words = [whitespace_words(t) for t in texts]
    windows = ftdata.encode_words([[w for w, _, _ in ws] for ws in words], None, run.tokenizer, seq_len)
    tags = _predictions(run, Split("<input>", windows, [None] * len(texts), [ws for ws in words]))
    out = []
    for text, ws, tg in zip(texts, words, tags):
        ents = [{"type": kind, "start": ws[a][1], "end": ws[b - 1][2], "text": text[ws[a][1]:ws[b - 1][2]]}
                for kind, a, b in tag_spans(tg)]
        out.append({"text": text, "entities": ents, "tags": tg})
    return out
