"""`jaxfound finetune`: a pretrained model (transformers dir or jaxfound run dir) fine-tuned for a labelling task
(ner, pos, chunk on CoNLL files; cls on CSV / JSON lines); keeps the best valid checkpoint, reports on test.

    summary = finetune(cfg)

The run dir holds everything needed later: config.json (model config included), labels.json, tokenizer/, best/.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound import runs
from jaxfound.app import registry, sft
from jaxfound.data import finetune as ftdata
from jaxfound.data.pipeline import fingerprint
from jaxfound.data.tokenizer import load_tokenizer, padded_vocab
from jaxfound.errors import JaxfoundError
from jaxfound.inference import Predictor
from jaxfound.interop.hf import load_hf_config, read_weights
from jaxfound.models import TRUNK_KEYS, build_model
from jaxfound.models.scan import stack_layers
from jaxfound.sharding import initialize_distributed, mesh_shape
from jaxfound.tasks import Instruction, resolve_task
from jaxfound.train.build import build
from jaxfound.train.loop import Job, finish_run, fit
from jaxfound.train.state import init_params

# ---------------------------------------------------------------- the model to start from


def _pooler(path: Path) -> dict | None:
    """A transformers BERT's pooler (its sequence-classification head reads [CLS] through it)."""
    raw = read_weights(path)
    w = raw.get("pooler.dense.weight", raw.get("bert.pooler.dense.weight"))
    b = raw.get("pooler.dense.bias", raw.get("bert.pooler.dense.bias"))
    if w is None or b is None:
        return None
    return {"kernel": jnp.asarray(np.asarray(w, np.float32).T), "bias": jnp.asarray(b)}


def base_params(run: runs.Run, head: str, labels: list[str]) -> dict:
    """The params to start from: the whole model when its head and labels are the task's (training continues from
    it, e.g. re-fitting the heads of a merged model), else the trunk (and a transformers BERT's pooler for cls)."""
    if run.model.head == head and run.labels == labels:
        return dict(run.params)
    trunk = {k: v for k, v in run.params.items() if k in TRUNK_KEYS}
    # a transformers BERT's pooler is what BertForSequenceClassification reads [CLS] through; RoBERTa's classification
    # head has its own dense layer, which transformers initialises fresh (so does jaxfound)
    bert = run.model.cfg.arch == "bert"
    pooler = _pooler(run.path) if run.kind == "transformers" and head == "seq_cls" and bert else None
    return trunk | ({"pooler": pooler} if pooler else {})


def _transformers_head(path, head: str, labels: list[str]) -> str | None:
    """A transformers dir's own head when it is the task's with the same labels, else 'none' (the trunk alone)."""
    if runs.kind_of(path) != "transformers":
        return None
    info = load_hf_config(path)
    return head if info.head == head and [info.id2label.get(i) for i in range(len(info.id2label))] == labels \
        else "none"


def load_base(cfg, head: str, labels: list[str]):
    """(ModelConfig, pretrained params or {}, tokenizer) for model.init: a transformers dir or a jaxfound run dir."""
    if cfg.model.init is None:
        if not cfg.data.tokenizer:
            raise JaxfoundError("fine-tuning needs model.init (a transformers dir or a jaxfound run dir), "
                                "or data.tokenizer to train from scratch")
        tok = load_tokenizer(cfg.data.tokenizer)
        return dataclasses.replace(cfg.model, vocab_size=padded_vocab(len(tok)), num_labels=len(labels),
                                   lora=cfg.train.lora), {}, tok
    if not (Path(cfg.model.init) / "config.json").is_file():
        raise JaxfoundError(f"model.init={cfg.model.init}: not a transformers dir (config.json + model.safetensors) "
                            "nor a jaxfound run dir (config.json + checkpoints/ or best/)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a checkpoint's own head is dropped on purpose
        run = runs.require_float(runs.open_run(cfg.model.init, _transformers_head(cfg.model.init, head, labels)),
                                 "fine-tune")
    model_cfg = dataclasses.replace(run.config.model, num_labels=len(labels), dtype=cfg.model.dtype,
                                    param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                                    scan_layers=cfg.model.scan_layers, init=cfg.model.init, lora=cfg.train.lora)
    tok = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else run.tokenizer
    if tok is None:
        raise JaxfoundError(f"model.init={cfg.model.init} has no tokenizer; set data.tokenizer to a tokenizer dir")
    params = base_params(run, head, labels)  # unrolled: open_run unstacks a scanned run
    return model_cfg, stack_layers(params, model_cfg.num_layers) if model_cfg.scan_layers else params, tok


# ---------------------------------------------------------------- fine-tuning


def _read_splits(cfg, task, labels, tokenizer) -> dict:
    """Every split tokenized once; sentences split into windows / texts truncated are reported."""
    seq_len = cfg.data.seq_len
    splits = {name: task.read(path, cfg.data, labels, tokenizer, seq_len)
              for name, path in (("train", cfg.data.train), ("valid", cfg.data.valid), ("test", cfg.data.test))
              if path}
    for name, s in splits.items():
        if s.windows.num_split or s.truncated or s.windows.num_cut_words:
            print(f"{name}: {s.windows.num_split} of {len(s.gold)} sentences longer than seq_len={seq_len} "
                  f"split into overlapping windows" if task.token_level else
                  f"{name}: {s.truncated} of {len(s.gold)} texts truncated to seq_len={seq_len}")
    return splits


def _check(cfg, task) -> None:
    if task.pretraining:
        raise JaxfoundError(f"train.task={task.name} is a pretraining task; finetune takes ner, pos, chunk or cls "
                            "(use `jaxfound pretrain`)")
    if not cfg.data.train:
        raise JaxfoundError("data.train is not set: give the training file (CoNLL for tagging, CSV/JSON lines for cls)")
    if cfg.data.packing and not task.token_level:
        raise JaxfoundError(f"data.packing packs token-level tasks (ner, pos, chunk); train.task={task.name} "
                            "classifies whole texts: set data.packing=false")
    if cfg.train.freeze == "trunk" and cfg.model.init is None:
        raise JaxfoundError("train.freeze=trunk trains only the head, so model.init must give a trained trunk "
                            "(a transformers dir or a jaxfound run dir)")


def _model_and_data(cfg, task):
    """(model config, initial params, tokenizer, labels, splits)."""
    labels = task.labels(cfg.data)
    if len(labels) < 2:
        raise JaxfoundError(f"{cfg.data.train}: only {len(labels)} distinct label(s) {labels}; need at least 2")
    model_cfg, pretrained, tokenizer = load_base(cfg, task.head, labels)
    if cfg.data.seq_len > model_cfg.max_position:
        raise JaxfoundError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {model_cfg.max_position} "
                            f"positions; set data.seq_len <= {model_cfg.max_position}")
    return model_cfg, pretrained, tokenizer, labels, _read_splits(cfg, task, labels, tokenizer)


@dataclasses.dataclass
class Setup:
    """What `finetune` trains: the config (its model section resolved from model.init), the task, model, labels,
    tokenizer, tokenized splits, the train batches (one epoch's plan) and the sharded state with its jitted step."""

    cfg: object
    task: object
    model: object
    labels: list
    tokenizer: object
    splits: dict
    train: object  # ftdata.BucketedBatches or ftdata.PackedBatches
    total_steps: int
    training: object  # jaxfound.train.build.Training


def setup(cfg) -> Setup:
    """Model, data and the compiled-on-first-call train step of a fine-tuning run, built as `finetune` builds them
    (benchmarks time its steps; nothing is written)."""
    task = resolve_task(cfg)
    initialize_distributed(cfg.mesh)
    _check(cfg, task)
    model_cfg, pretrained, tokenizer, labels, splits = _model_and_data(cfg, task)
    seq_len, pad_id = cfg.data.seq_len, ftdata.special_ids(tokenizer)[2]
    train = _train_batches(cfg, task, splits["train"].windows, pad_id)
    total_steps = cfg.train.epochs * train.steps_per_epoch
    model = build_model(model_cfg, task.head)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    rows = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=train.batch_size))
    training = build(rows, model, task.loss, seq_len, cfg.train.schedule_steps or total_steps,
                     init_params(model, seq_len, cfg.train.seed, pretrained, str(cfg.model.init)))
    return Setup(cfg, task, model, labels, tokenizer, splits, train, total_steps, training)


def finetune(cfg) -> dict:
    """Fine-tune model.init on data.train, keep the best valid checkpoint, report on valid and test."""
    task = resolve_task(cfg)
    if isinstance(task, Instruction):
        return sft.instruct(cfg)
    initialize_distributed(cfg.mesh)
    _check(cfg, task)
    runs.check_run_dir(cfg.run.dir)
    run = setup(cfg)
    cfg, task, model, labels, tokenizer = run.cfg, run.task, run.model, run.labels, run.tokenizer
    splits, train, total_steps, training = run.splits, run.train, run.total_steps, run.training
    seq_len = cfg.data.seq_len
    if jax.process_index() == 0:
        runs.write_labels_and_tokenizer(cfg.run.dir, labels, tokenizer)
    predictor = Predictor(model, task, labels, tokenizer, seq_len, cfg.train.batch_size, training.mesh)
    trainable = sft.report_trainable(cfg, training.state.params)
    trainable["optimizer_state_bytes"] = sum(x.nbytes for x in jax.tree.leaves(training.state.opt_state))
    job = Job(model=model, task=task, total_steps=total_steps, seq_len=seq_len,
              evaluate=lambda params, step: _headline(predictor.score(params, splits["valid"]))
              if "valid" in splits else {},
              make_iterator=lambda: ftdata.batch_iterator(train, total_steps, jax.process_index(),
                                                          jax.process_count()),
              best_metric=task.metric if "valid" in splits else None,
              eval_every=train.steps_per_epoch, log_every=min(cfg.train.log_every, train.steps_per_epoch),
              extra={"task": task.name, "labels": labels, "init": cfg.model.init,
                     "train_sentences": len(splits["train"].gold), "train_windows": len(splits["train"].windows),
                     "split_sentences": {n: s.windows.num_split for n, s in splits.items()},
                     "steps_per_epoch": train.steps_per_epoch, "batch_lengths": train.buckets.tolist(),
                     **({"packed_rows_per_batch": train.batch_size, "packed_padding": round(train.padding, 4)}
                        if cfg.data.packing else {}), **trainable},
              data_fingerprint=fingerprint(splits["train"].windows.input_ids, splits["train"].windows.labels))
    summary = fit(cfg, job, training)
    if summary["preempted"]:  # SIGTERM: the checkpoint is saved; reports and registry wait for the resumed run
        summary.pop("state")
        finish_run(cfg.run.dir, summary)
        return summary
    summary["reports"], best = _final_reports(cfg, task, predictor, splits, summary.pop("state").params)
    finish_run(cfg.run.dir, summary)
    if jax.process_index() == 0:
        registry.register_finetune_run(cfg, summary, best)  # a no-op unless run.registry is set
    return summary


def _train_batches(cfg, task, windows, pad_id: int):
    """Length-bucketed batches of train.batch_size sentences, or (data.packing) packed rows: about as many sentences
    per batch, in a whole number of rows per data shard."""
    seq_len = cfg.data.seq_len
    if not cfg.data.packing:
        return ftdata.BucketedBatches(windows, cfg.train.batch_size, cfg.train.seed, seq_len, pad_id,
                                      task.token_level, cfg.data.length_bucketing, epochs=cfg.train.epochs)
    data, fsdp, _ = mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, jax.device_count())
    shards = data * fsdp
    rows = cfg.train.batch_size * float(windows.lengths.mean()) / seq_len
    rows = max(1, math.ceil(rows / shards)) * shards
    short = ftdata.choose_short_len(windows.lengths, seq_len)
    packed = ftdata.PackedBatches(windows, rows, cfg.train.seed, seq_len, pad_id, short_len=short)
    tiers = ", ".join(f"{len(plan)} rows of {L} tokens ({n} per batch)" for L, n, plan in packed.tiers)
    print(f"packing: {len(windows)} windows in {tiers}, {100 * packed.padding:.1f}% padding, "
          f"~{cfg.train.batch_size} sentences per batch")
    return packed


def _headline(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def _final_reports(cfg, task, predictor: Predictor, splits: dict, last_params) -> tuple[dict, dict]:
    """valid / test reports of the best params (the last ones when there is no valid split), printed and saved."""
    run_dir = Path(cfg.run.dir)
    if "valid" in splits and (run_dir / "best").exists():
        best = runs.load_best(run_dir)
    else:
        best = last_params
        runs.save_best(run_dir, best)
    reports = {}
    for name in ("valid", "test"):
        if name in splits:
            report = predictor.score(best, splits[name])
            if jax.process_index() == 0:
                runs.write_json(run_dir / f"report_{name}.json", report)
            print(f"\n== {name} ({splits[name].path}), best params ==\n{task.render(report)}")
            reports[name] = _headline(report)
    return reports, best
