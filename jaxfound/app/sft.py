"""`jaxfound finetune train.task=sft`: instruction fine-tuning of a decoder (GPT-2, the Llama family) on chat
(messages) or prompt / completion JSON lines, in full or with LoRA adapters (train.lora.rank).

    summary = instruct(cfg)      # cfg.model.init: a transformers dir, GGUF file or jaxfound run dir with an LM head

Examples are rendered by the tokenizer's chat template, packed several per row (attention and positions reset per
example) and trained on the assistant / completion tokens only (jaxfound.data.sft). The best params by held-out loss
go to best/; the run dir opens like any decoder (`jaxfound generate`, `serve`; adapters folded in), and
`jaxfound export --adapter` writes a LoRA run's adapters for PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np

from jaxfound import runs
from jaxfound.data import finetune as ftdata
from jaxfound.data import sft as sftdata
from jaxfound.data.pipeline import fingerprint
from jaxfound.data.tokenizer import load_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model, lora
from jaxfound.models.scan import stack_layers
from jaxfound.sharding import initialize_distributed
from jaxfound.tasks import resolve_task
from jaxfound.train.build import build
from jaxfound.train.loop import Job, finish_run, fit
from jaxfound.train.state import init_params
from jaxfound.train.step import make_eval_step

DECODERS = ("gpt", "llama")


def load_decoder(cfg):
    """(ModelConfig, pretrained params, tokenizer) of model.init, a decoder with its LM head."""
    if cfg.model.init is None:
        raise JaxfoundError("train.task=sft starts from a pretrained decoder: set model.init to a transformers dir, "
                            "a GGUF file or a jaxfound run dir (GPT-2 or the Llama family)")
    run = runs.require_float(runs.open_run(cfg.model.init, "lm"), "fine-tune")
    if run.config.model.arch not in DECODERS or run.model.head != "lm":
        raise JaxfoundError(f"model.init={cfg.model.init} is a {run.config.model.arch} model with head "
                                            f"{run.model.head!r}; train.task=sft needs a decoder with an LM head "
                            f"({', '.join(DECODERS)})")
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else run.tokenizer
    if tokenizer is None:
        raise JaxfoundError(f"model.init={cfg.model.init} has no tokenizer; set data.tokenizer to a tokenizer dir")
    model_cfg = dataclasses.replace(run.config.model, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                    remat=cfg.model.remat, scan_layers=cfg.model.scan_layers,
                                    attention=cfg.model.attention, dropout=cfg.model.dropout, init=cfg.model.init,
                                    lora=cfg.train.lora, num_labels=0)
    params = stack_layers(run.params, model_cfg.num_layers) if model_cfg.scan_layers else dict(run.params)
    return model_cfg, params, tokenizer


def eval_batches(rows: dict, batch_size: int) -> list[dict]:
    """Every packed row once, in order, in batches of batch_size (the last filled with rows that carry no loss)."""
    batches = sftdata.SFTBatches(rows, batch_size, seed=0)
    n = batches.num_rows
    order = np.r_[np.arange(n), np.full(math.ceil(n / batch_size) * batch_size - n, n)].reshape(-1, batch_size)
    return [{k: v[idx] for k, v in batches.rows.items()} for idx in order]


def _read(cfg, task, tokenizer, seq_len: int, pad_id: int) -> dict:
    """{split: (SFTData, packed rows)} for data.train / valid / test, with what truncation and packing did."""
    out = {}
    for name in ("train", "valid", "test"):
        path = getattr(cfg.data, name)
        if not path:
            continue
        data = task.read(path, tokenizer, seq_len)
        rows = sftdata.pack(data, seq_len, pad_id)
        print(f"{name}: {len(data)} examples ({data.format}), {data.num_targets:,} trained tokens, "
              f"{len(rows['input_ids'])} packed rows of {seq_len} ({100 * sftdata.padding_fraction(rows):.1f}% "
              f"padding); {data.truncated} truncated, {data.dropped} dropped (nothing to train after truncation)")
        out[name] = (data, rows)
    return out


def instruct(cfg) -> dict:
    """Instruction-tune model.init on data.train (JSON lines), keep the best valid params, report valid / test loss."""
    initialize_distributed(cfg.mesh)
    task = resolve_task(cfg)
    if not cfg.data.train:
        raise JaxfoundError("data.train is not set: give a JSON lines file of {\"messages\": [...]} or "
                            "{\"prompt\": ..., \"completion\": ...} objects")
    runs.check_run_dir(cfg.run.dir)
    model_cfg, pretrained, tokenizer = load_decoder(cfg)
    seq_len = cfg.data.seq_len
    if seq_len > model_cfg.max_position:
        raise JaxfoundError(f"data.seq_len={seq_len} exceeds the model's {model_cfg.max_position} positions; set "
                            f"data.seq_len <= {model_cfg.max_position}")
    pad_id = ftdata.special_ids(tokenizer)[2]
    splits = _read(cfg, task, tokenizer, seq_len, pad_id)
    train_data, train_rows = splits["train"]
    batches = sftdata.SFTBatches(train_rows, cfg.train.batch_size, cfg.train.seed, pad_id)
    total_steps = cfg.train.epochs * batches.steps_per_epoch
    model = build_model(model_cfg, "lm")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if jax.process_index() == 0:
        runs.write_labels_and_tokenizer(cfg.run.dir, None, tokenizer)
    training = build(cfg, model, task.loss, seq_len, cfg.train.schedule_steps or total_steps,
                     init_params(model, seq_len, cfg.train.seed, pretrained, str(cfg.model.init)))
    evaluate = held_out_loss(model, task, training, {n: rows for n, (_, rows) in splits.items() if n != "train"},
                             cfg.train.batch_size)
    job = Job(model=model, task=task, total_steps=total_steps, seq_len=seq_len,
              evaluate=lambda params, step: {f"eval_{k}": v for k, v in evaluate(params, ("valid",)).get(
                  "valid", {}).items()},
              make_iterator=lambda: ftdata.batch_iterator(batches, total_steps, jax.process_index(),
                                                          jax.process_count()),
              best_metric="-eval_loss" if "valid" in splits else None,
              eval_every=batches.steps_per_epoch, log_every=min(cfg.train.log_every, batches.steps_per_epoch),
              extra={"task": task.name, "init": cfg.model.init, "format": train_data.format,
                     "train_examples": len(train_data), "train_rows": batches.num_rows,
                     "train_target_tokens": train_data.num_targets, "truncated": train_data.truncated,
                     "dropped": train_data.dropped, "padding": round(sftdata.padding_fraction(train_rows), 4),
                     "steps_per_epoch": batches.steps_per_epoch, **report_trainable(cfg, training.state.params)},
              data_fingerprint=fingerprint(train_data.input_ids, train_data.loss_mask))
    summary = fit(cfg, job, training)
    last = summary.pop("state").params
    if not summary["preempted"]:
        run_dir = Path(cfg.run.dir)
        best = runs.load_best(run_dir) if (run_dir / "best").exists() else last
        if not (run_dir / "best").exists():
            runs.save_best(run_dir, best)
        summary["reports"] = evaluate(best, ("valid", "test"))
        if jax.process_index() == 0:
            runs.write_json(run_dir / "report.json", summary["reports"])
        for name, report in summary["reports"].items():
            print(f"{name}: loss {report['loss']:.4f}, perplexity {report['ppl']:.2f}, next-token accuracy "
                  f"{report['accuracy']:.4f} (best params, trained tokens only)")
    finish_run(cfg.run.dir, summary)
    return summary


def report_trainable(cfg, params) -> dict:
    """Trainable / total parameter counts of a LoRA run, printed and returned for the summary ({} otherwise)."""
    if not cfg.train.lora.rank:
        return {}
    counts, line = lora.describe(params, cfg.model.arch, cfg.train.lora)
    print(line)
    return counts


def held_out_loss(model, task, training, splits: dict, batch_size: int):
    """(params, split names) -> {split: {loss, ppl, accuracy}} over each split's packed rows (trained tokens only)."""
    step = make_eval_step(model, task.loss, training.mesh, training.shardings.params)
    batches = {name: eval_batches(rows, batch_size) for name, rows in splits.items()}

    def evaluate(params, names) -> dict:
        out = {}
        for name in (n for n in names if n in batches):
            sums = [jax.device_get(step(params, b)) for b in batches[name]]
            count = max(sum(float(s["count"]) for s in sums), 1.0)
            loss = sum(float(s["loss_sum"]) for s in sums) / count
            out[name] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
                         "accuracy": sum(float(s["correct"]) for s in sums) / count}
        return out
    return evaluate


__all__ = ["eval_batches", "held_out_loss", "instruct", "load_decoder", "report_trainable"]
