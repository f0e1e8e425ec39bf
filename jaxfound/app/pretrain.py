"""`jaxfound pretrain`: masked-LM (BERT) or causal-LM (GPT) pretraining on a corpus or the built-in one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from jaxfound import runs
from jaxfound.app import registry
from jaxfound.data.pipeline import batch_iterator, fingerprint, local_batch
from jaxfound.data.pretrain import prepare_pretraining
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model
from jaxfound.sharding import global_batch, initialize_distributed
from jaxfound.tasks import get_task
from jaxfound.train.build import build
from jaxfound.train.loop import Job, finish_run, fit
from jaxfound.train.step import make_eval_step


def make_pretrain_evaluate(model, task, mesh, param_shardings, valid, batch_size: int, num_batches: int):
    """Held-out loss, accuracy and perplexity over fixed eval batches (the same masks every time)."""
    eval_step = make_eval_step(model, task.loss, mesh, param_shardings)
    rows = valid.num_rows
    num_batches = max(1, min(num_batches, -(-rows // batch_size)))
    batches = [local_batch(valid, i, batch_size, jax.process_index(), jax.process_count()) for i in range(num_batches)]

    def evaluate(params, step):
        totals = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
        for b in batches:
            sums = jax.device_get(eval_step(params, global_batch(b, mesh)))
            totals = {k: totals[k] + float(sums[k]) for k in totals}
        loss = totals["loss_sum"] / max(totals["count"], 1.0)
        return {"eval_loss": loss, "eval_accuracy": totals["correct"] / max(totals["count"], 1.0),
                "eval_perplexity": float(np.exp(min(loss, 50.0)))}

    return evaluate


def pretrain(cfg) -> dict:
    """Read the corpus, build the model and train it; returns the run summary (with the final 'state')."""
    if cfg.train.freeze != "none":
        raise JaxfoundError(f"train.freeze={cfg.train.freeze} is for fine-tuning; pretraining trains every parameter")
    initialize_distributed(cfg.mesh)  # before anything touches jax.devices()
    runs.check_run_dir(cfg.run.dir)  # the tokenizer is written there: fail before reading the corpus, not after
    task = get_task(cfg.train.task, cfg.model.arch)
    tokenizer_dir = cfg.data.tokenizer or str(Path(cfg.run.dir) / "tokenizer")
    data = prepare_pretraining(cfg, Path(cfg.run.dir) / "tokenizer")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    if model_cfg.arch == "roberta" and data.tokenizer.pad_token_id is not None:  # positions count after the pad id
        model_cfg = dataclasses.replace(model_cfg, pad_token_id=int(data.tokenizer.pad_token_id))
        if cfg.data.seq_len + model_cfg.pad_token_id + 1 > model_cfg.max_position:
            raise JaxfoundError(f"data.seq_len={cfg.data.seq_len}: the tokenizer's pad id is {model_cfg.pad_token_id}, "
                                f"so RoBERTa needs model.max_position >= seq_len + pad id + 1 = "
                                f"{cfg.data.seq_len + model_cfg.pad_token_id + 1}")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = build_model(cfg.model, task.head)
    training = build(cfg, model, task.loss, cfg.data.seq_len, cfg.train.schedule_steps or cfg.train.steps)
    evaluate = make_pretrain_evaluate(model, task, training.mesh, training.shardings.params, data.valid,
                                      cfg.train.batch_size, cfg.train.eval_batches)
    job = Job(
        model=model, task=task, total_steps=cfg.train.steps, evaluate=evaluate, seq_len=cfg.data.seq_len,
        make_iterator=lambda: batch_iterator(data.train, cfg.train.batch_size, jax.process_index(),
                                             jax.process_count()),
        extra={"task": task.name, "arch": cfg.model.arch, "vocab_size": data.vocab_size, "documents": data.num_docs,
               "corpus_tokens": data.num_tokens, "tokenizer": tokenizer_dir},
        data_fingerprint=fingerprint(data.train.corpus.ids_NxL, data.train.corpus.segment_ids_NxL),
    )
    summary = fit(cfg, job, training)
    finish_run(cfg.run.dir, summary)
    if jax.process_index() == 0:
        registry.register_pretrain_run(cfg, summary)  # a no-op unless run.registry is set
    return summary
