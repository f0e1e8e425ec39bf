"""`jaxfound pretrain`: masked-LM (BERT) or causal-LM (GPT) pretraining on a corpus or the built-in one, from a
random init or, with model.init, continued from a transformers dir, GGUF file or jaxfound run dir."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfound import runs
from jaxfound.app import registry
from jaxfound.config import LoraConfig, ModelConfig
from jaxfound.data.pipeline import batch_iterator, local_batch, packed_fingerprint
from jaxfound.data.pretrain import prepare_pretraining
from jaxfound.data.tokenizer import load_tokenizer
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import load_hf_config
from jaxfound.models import TRUNK_KEYS, abstract_params, build_model
from jaxfound.models.scan import stack_layers
from jaxfound.sharding import global_batch, initialize_distributed
from jaxfound.tasks import get_task
from jaxfound.train.build import build
from jaxfound.train.loop import Job, finish_run, fit
from jaxfound.train.state import init_params
from jaxfound.train.step import make_eval_step

# model keys a continued run takes from the user's config; every other one (architecture, sizes, vocabulary,
# positions, rope) is model.init's
TRAINING_KEYS = ("dtype", "param_dtype", "remat", "scan_layers", "dropout", "attention")
DERIVED_WHEN_ZERO = ("vocab_size", "num_kv_heads", "head_dim")  # 0 in a config: 'take it from elsewhere'


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


@dataclass
class InitModel:
    """What a continued run starts from: model.init's config, params (the head too, when it has one) and tokenizer."""

    model: ModelConfig  # model.init's architecture with the user's training keys
    params: dict  # top-level keys of the model's params; the missing ones (a head it lacks) start fresh
    tokenizer: object
    fresh: list[str]  # top-level params model.init does not have


def load_init(cfg, task) -> InitModel:
    """model.init opened for continued pretraining on task (mlm or clm): errors name the key and what is valid."""
    path = cfg.model.init
    if not Path(path).exists():
        raise JaxfoundError(f"model.init={path}: no such directory or file; give a transformers dir, a .gguf file or "
                            "a jaxfound run dir")
    if Path(path).resolve() == Path(cfg.run.dir).resolve():
        raise JaxfoundError(f"model.init={path} is run.dir itself; rerunning a run dir resumes it without model.init")
    try:
        kind = runs.kind_of(path)
        own_head = load_hf_config(path).head if kind in ("transformers", "gguf") else None
    except JaxfoundError as e:
        raise JaxfoundError(f"model.init={path}: {e}") from None
    head = task.head if own_head in (None, task.head) else "none"  # a transformers trunk without the LM head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # another head of the checkpoint (BERT's next-sentence one) is dropped
        run = runs.require_float(runs.open_run(path, head), "continue pretraining")
    arch = run.config.model.arch
    if arch not in task.archs:
        wanted = next(name for name in ("mlm", "clm") if arch in get_task(name).archs)
        raise JaxfoundError(f"train.task={task.name} trains {' or '.join(task.archs)}, but model.init={path} is a "
                            f"{arch} model; set train.task={wanted}")
    params = dict(run.params) if run.model.head == task.head else \
        {k: v for k, v in run.params.items() if k in TRUNK_KEYS}
    model_cfg = dataclasses.replace(run.config.model, **{k: getattr(cfg.model, k) for k in TRAINING_KEYS},
                                    init=path, num_labels=0, quant="none", lora=LoraConfig())
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else run.tokenizer
    if tokenizer is None:
        raise JaxfoundError(f"model.init={path} has no tokenizer; set data.tokenizer to that model's tokenizer dir")
    shapes = abstract_params(build_model(model_cfg, task.head))
    fresh = sorted(k for k in shapes if k not in params)
    if model_cfg.scan_layers:  # open_run unrolls a scanned run
        params = stack_layers(params, model_cfg.num_layers)
    return InitModel(model_cfg, params, tokenizer, fresh)


def ignored_model_keys(user: ModelConfig, init: ModelConfig) -> list[str]:
    """'key=value' for each architecture key the user's config sets otherwise than model.init."""
    skip = set(TRAINING_KEYS) | {"init", "num_labels", "quant", "lora"}
    return [f"model.{f.name}={getattr(user, f.name)!r}" for f in dataclasses.fields(ModelConfig)
            if f.name not in skip and getattr(user, f.name) != getattr(init, f.name)
            and not (f.name in DERIVED_WHEN_ZERO and getattr(user, f.name) == 0)]


def _continue_from(cfg, task) -> tuple[object, InitModel]:
    """cfg with model.init's model config (seq_len checked against its positions), and what it starts from."""
    init = load_init(cfg, task)
    m = init.model
    print(f"model.init={cfg.model.init}: continuing a {m.arch} model (hidden {m.hidden_size}, {m.num_layers} layers, "
          f"vocab {m.vocab_size}, {m.max_position} positions) with "
          + (f"the tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer else "its own tokenizer"))
    ignored = ignored_model_keys(cfg.model, m)
    if ignored:
        print(f"  its architecture is used, not the config's {', '.join(ignored)}")
    if init.fresh:
        print(f"  it has no {task.head} head: {', '.join(init.fresh)} start from a random init")
    limit = m.max_position - (m.pad_token_id + 1 if m.arch == "roberta" else 0)  # RoBERTa counts after the pad id
    if cfg.data.seq_len > limit:
        raise JaxfoundError(f"data.seq_len={cfg.data.seq_len} exceeds the {limit} positions of model.init="
                            f"{cfg.model.init}; set data.seq_len <= {limit}")
    return dataclasses.replace(cfg, model=m), init


def _model_config_from_scratch(cfg, tokenizer, vocab_size: int):
    """cfg with the vocabulary (and RoBERTa's pad id) of the corpus's tokenizer."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    if model_cfg.arch == "roberta" and tokenizer.pad_token_id is not None:  # positions count after the pad id
        model_cfg = dataclasses.replace(model_cfg, pad_token_id=int(tokenizer.pad_token_id))
        if cfg.data.seq_len + model_cfg.pad_token_id + 1 > model_cfg.max_position:
            raise JaxfoundError(f"data.seq_len={cfg.data.seq_len}: the tokenizer's pad id is {model_cfg.pad_token_id}, "
                                f"so RoBERTa needs model.max_position >= seq_len + pad id + 1 = "
                                f"{cfg.data.seq_len + model_cfg.pad_token_id + 1}")
    return dataclasses.replace(cfg, model=model_cfg)


def _start_params(model, cfg, pretrained: dict) -> dict:
    """model.init's params in model.param_dtype, a missing head drawn fresh (init_params)."""
    params = init_params(model, cfg.data.seq_len, cfg.train.seed, pretrained, str(cfg.model.init))
    return jax.tree.map(lambda x, want: jnp.asarray(x, want.dtype), params, nn.unbox(abstract_params(model)))


def pretrain(cfg) -> dict:
    """Read the corpus, build the model (random, or model.init's) and train it; returns the run summary (with the
    final 'state')."""
    if cfg.train.freeze != "none":
        raise JaxfoundError(f"train.freeze={cfg.train.freeze} is for fine-tuning; pretraining trains every parameter")
    initialize_distributed(cfg.mesh)  # before anything touches jax.devices()
    runs.check_run_dir(cfg.run.dir)  # the tokenizer is written there: fail before reading the corpus, not after
    task = get_task(cfg.train.task, None if cfg.model.init else cfg.model.arch)
    if not task.pretraining:
        raise JaxfoundError(f"train.task={task.name} is not a pretraining task; pretrain takes mlm or clm")
    run_tokenizer = Path(cfg.run.dir) / "tokenizer"
    init = None
    if cfg.model.init:
        cfg, init = _continue_from(cfg, task)
        if not cfg.data.tokenizer and jax.process_index() == 0:  # the run dir keeps the tokenizer it was trained with
            runs.write_labels_and_tokenizer(cfg.run.dir, None, init.tokenizer)
    tokenizer_dir = cfg.data.tokenizer or str(run_tokenizer)
    data = prepare_pretraining(cfg, run_tokenizer, init.tokenizer if init else None)
    if init is None:
        cfg = _model_config_from_scratch(cfg, data.tokenizer, data.vocab_size)
    model = build_model(cfg.model, task.head)
    start = _start_params(model, cfg, init.params) if init else None
    training = build(cfg, model, task.loss, cfg.data.seq_len, cfg.train.schedule_steps or cfg.train.steps, start)
    evaluate = make_pretrain_evaluate(model, task, training.mesh, training.shardings.params, data.valid,
                                      cfg.train.batch_size, cfg.train.eval_batches)
    job = Job(
        model=model, task=task, total_steps=cfg.train.steps, evaluate=evaluate, seq_len=cfg.data.seq_len,
        make_iterator=lambda: batch_iterator(data.train, cfg.train.batch_size, jax.process_index(),
                                             jax.process_count()),
        extra={"task": task.name, "arch": cfg.model.arch, "vocab_size": data.vocab_size, "documents": data.num_docs,
               "corpus_tokens": data.num_tokens, "tokenizer": tokenizer_dir, "init": cfg.model.init,
               "init_fresh": init.fresh if init else None},
        data_fingerprint=packed_fingerprint(data.train.corpus),
    )
    summary = fit(cfg, job, training)
    finish_run(cfg.run.dir, summary)
    if jax.process_index() == 0:
        registry.register_pretrain_run(cfg, summary)  # a no-op unless run.registry is set
    return summary
