"""`jaxfound quantize`: a fine-tuned (or merged) run dir -> an int8 run dir that evaluate / predict load on their own;
a decoder (a jaxfound run dir, a transformers dir or a GGUF file) -> an int8 run dir that generate / serve load.

    report = quantize_run("runs/ner", "w8", "runs/ner-w8", eval_file="test.txt")
    report = quantize_run("SmolLM2.gguf", "w8", "runs/smol-w8", eval_file="held_out.txt")   # next-token loss

The quantized dir holds config.json (model.quant = the mode), labels.json, tokenizer/, params.safetensors + quant.json
(int8 kernels + float32 scales, ``save_quantized``) and quant_report.json: sizes, the task metric and inference
tokens/s of the float and the int8 model on the eval file, timed batch by batch in alternation so both share the
machine's noise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jaxfound import runs
from jaxfound.app import registry
from jaxfound.app.evaluate import open_labelled, predictor_for
from jaxfound.errors import JaxfoundError
from jaxfound.interop.hf import load_hf_config
from jaxfound.interop.int8_import import int8_converter
from jaxfound.losses import clm_loss
from jaxfound.models import abstract_params, build_model
from jaxfound.quant.checkpoint import META_FILE, PARAMS_FILE
from jaxfound.quant.int4 import ALL_MODES, quantize_params
from jaxfound.quant.int8 import DEFAULT_RULES, check_rules, quantize_tied_embedding
from jaxfound.quant.report import size_report
from jaxfound.sharding import global_batch

REPORT_FILE = "quant_report.json"


# ---------------------------------------------------------------- throughput


def real_tokens(batch: dict) -> int:
    return int(np.asarray(batch["attention_mask"]).sum())


def interleaved_throughput(runners: dict[str, Callable[[int], object]], tokens_per_batch: list[int],
                           rounds: int = 3) -> dict[str, float]:
    """Real tokens/s of each runner over the same batches; runner(i) must finish batch i before returning.

    Runners alternate batch by batch (the order flips every batch) so a noisy neighbour slows all of them alike;
    call each runner on every batch once before this (compiles) so only warm calls are timed.
    """
    names = list(runners)
    seconds = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for i in range(len(tokens_per_batch)):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                runners[name](i)
                seconds[name] += time.perf_counter() - t0
    total = rounds * sum(tokens_per_batch)
    return {name: total / max(s, 1e-9) for name, s in seconds.items()}


def jax_runner(predict_step, params, placed_batches: list[dict]) -> Callable[[int], object]:
    return lambda i: jax.block_until_ready(predict_step(params, placed_batches[i]))


# ---------------------------------------------------------------- evaluation of float vs int8


def metric_name(task) -> str:
    """The headline metric as the report names it (seqeval's F1 is an entity F1)."""
    return "entity_f1" if task.metric == "f1" else task.metric


def compare(run, qmodel, qparams, eval_file, rounds: int = 3) -> dict:
    """Task metric and tokens/s of run (float) and qmodel/qparams on eval_file, same batches and mesh."""
    before = predictor_for(run)
    predictors = {"before": before, "after": before.for_model(qmodel)}  # one mesh, one set of batches
    split = before.read(eval_file, run.config.data)
    params = {"before": jax.device_put(run.params), "after": qparams}
    batches = before.batches(split)
    placed = [global_batch({k: v for k, v in b.items() if k != "labels"}, before.mesh) for _, b in batches]
    out, runners = {"metric_name": metric_name(run.task)}, {}
    for which, predictor in predictors.items():
        out[f"metric_{which}"] = float(predictor.score(params[which], split)[run.task.metric])  # also the warm-up
        runners[which] = jax_runner(predictor.step, params[which], placed)
    tokens = [real_tokens(b) for _, b in batches]
    speed = interleaved_throughput(runners, tokens, rounds)
    out |= {"metric_delta": out["metric_after"] - out["metric_before"],
            "tokens_per_s_before": speed["before"], "tokens_per_s_after": speed["after"],
            "speedup": speed["after"] / speed["before"], "eval_file": str(eval_file), "eval_tokens": sum(tokens),
            "eval_batches": len(tokens), "throughput_rounds": rounds}
    return out


# ---------------------------------------------------------------- the driver


def _check_out(out: Path, checkpoint: Path) -> None:
    if out.resolve() == checkpoint.resolve():
        raise JaxfoundError(f"--out {out} is the checkpoint itself; give a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise JaxfoundError(f"--out {out} exists and is not an empty dir or an earlier quantized dir; "
                            "give a new or empty directory")


def _check_args(checkpoint: Path, mode: str, out: Path, eval_file, rounds: int) -> None:
    if mode not in ALL_MODES:
        raise JaxfoundError(f"--mode {mode!r}: allowed {', '.join(ALL_MODES)}")
    if rounds < 1:
        raise JaxfoundError(f"rounds={rounds}: need at least 1 timed pass over the eval file")
    if (checkpoint / META_FILE).is_file():
        raise JaxfoundError(f"--checkpoint {checkpoint} is already int8 ({META_FILE}); give the float run dir")
    is_gguf = checkpoint.suffix.lower() == ".gguf" and checkpoint.is_file()
    if not is_gguf and not (checkpoint / "config.json").is_file():
        raise JaxfoundError(f"--checkpoint {checkpoint}: no config.json; expected a run dir written by "
                            "`jaxfound finetune` or `jaxfound merge`, a decoder (run dir, transformers dir) or a "
                            "GGUF file")
    _check_out(out, checkpoint)
    if eval_file is not None and not Path(eval_file).is_file():
        raise JaxfoundError(f"--eval {eval_file}: file not found")


def quantize_run(checkpoint, mode: str, out, eval_file=None, rules=None, rounds: int = 3,
                 register: bool = True) -> dict:
    """Quantize a fine-tuned / merged run dir to ``out``; report sizes (and metric, tokens/s on eval_file).

    register: record ``out`` in the source run's registry (run.registry), if it has one; False for scratch copies.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_args(checkpoint, mode, out, eval_file, rounds)
    rules = check_rules(DEFAULT_RULES if rules is None else rules)
    if eval_file is None and runs.kind_of(checkpoint) in ("transformers", "gguf"):
        info = load_hf_config(checkpoint)
        if info.head == "lm":  # an imported decoder, nothing to compare: read straight into int8
            return _quantize_imported_decoder(checkpoint, info.model, mode, out, rules)
    run = runs.require_float(runs.open_run(checkpoint), "quantize")
    if run.model.head == "lm":
        return _quantize_decoder(run, checkpoint, mode, out, eval_file, rules, rounds)
    run = open_labelled(checkpoint)
    qparams = quantize_params(run.params, mode, rules)
    report = {"mode": mode, "checkpoint": str(checkpoint), "out": str(out), "task": run.task.name,
              **size_report(run.params, qparams), "rules": [dataclasses.asdict(r) for r in rules],
              "metric_name": metric_name(run.task), "metric_before": None, "metric_after": None,
              "tokens_per_s_before": None, "tokens_per_s_after": None}  # measured only on an eval file
    runs.write_run(out, runs.config_for(run, quant=mode), qparams, labels=run.labels, tokenizer=run.tokenizer,
                   quant={"mode": mode, "source": str(checkpoint.resolve()), "rules": rules})
    if eval_file is not None:
        qmodel = build_model(dataclasses.replace(run.config.model, quant=mode), run.task.head)
        report |= compare(run, qmodel, jax.device_put(qparams), eval_file, rounds)
    runs.write_json(out / REPORT_FILE, report)
    if register and run.config.run.registry:  # the source is registered: record the int8 copy (quantized_from)
        scores = [] if report["metric_after"] is None else [
            (f"{Path(eval_file).parent.name}/{run.task.name}", report["metric_name"], Path(eval_file).stem,
             float(report["metric_after"]))]
        registry.register_quantize_run(run.config.run.registry, out.resolve().name, str(out.resolve()),
                                       str(checkpoint.resolve()), f"int8-{mode}", scores)
    return report


def _quantize_decoder(run, checkpoint: Path, mode: str, out: Path, eval_file, rules, rounds: int) -> dict:
    """An int8 copy of a decoder (every Dense kernel of the blocks; an untied lm_head, or the tied word table as int8
    rows with one scale per row, which serves both the lookup and the head: int8.quantize_tied_embedding); with
    eval_file (text), the held-out next-token loss and forward tokens/s of float and int8."""
    qparams = quantize_params(run.params, mode, rules)
    cfg = run.config.model
    if cfg.arch == "gpt" or cfg.tie_embeddings:
        qparams = quantize_tied_embedding(qparams, cfg.arch)
    report = {"mode": mode, "checkpoint": str(checkpoint), "out": str(out), "task": run.task.name,
              **size_report(run.params, qparams), "rules": [dataclasses.asdict(r) for r in rules],
              "metric_name": "next_token_loss", "metric_before": None, "metric_after": None,
              "tokens_per_s_before": None, "tokens_per_s_after": None}
    runs.write_run(out, runs.config_for(run, quant=mode), qparams, tokenizer=run.tokenizer,
                   quant={"mode": mode, "source": str(checkpoint.resolve()), "rules": rules})
    if eval_file is not None:
        qmodel = build_model(dataclasses.replace(run.config.model, quant=mode), "lm")
        report |= compare_decoder(run, qmodel, jax.device_put(qparams), eval_file, rounds)
    runs.write_json(out / REPORT_FILE, report)
    return report


def _quantize_imported_decoder(checkpoint: Path, cfg, mode: str, out: Path, rules) -> dict:
    """``_quantize_decoder`` for a transformers dir or GGUF file without an eval file: the weights are read one
    tensor at a time into int8 (interop.int8_import: the same params as quantizing the float model, without a float32
    copy of it); the float sizes come from the model's shapes."""
    tied = cfg.arch == "gpt" or cfg.tie_embeddings
    run = runs.open_run(checkpoint, convert=int8_converter(cfg.arch, tied, rules, mode))
    float_shapes = nn.unbox(abstract_params(run.model))
    report = {"mode": mode, "checkpoint": str(checkpoint), "out": str(out), "task": run.task.name,
              **size_report(float_shapes, run.params), "rules": [dataclasses.asdict(r) for r in rules],
              "metric_name": "next_token_loss", "metric_before": None, "metric_after": None,
              "tokens_per_s_before": None, "tokens_per_s_after": None, "read": "one tensor at a time"}
    runs.write_run(out, runs.config_for(run, quant=mode), run.params, tokenizer=run.tokenizer,
                   quant={"mode": mode, "source": str(checkpoint.resolve()), "rules": rules})
    runs.write_json(out / REPORT_FILE, report)
    return report


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int) -> np.ndarray:
    """(W, seq_len) token windows of a text, back to back (the first max_windows)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    n = min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise JaxfoundError(f"eval text has {len(ids)} tokens, fewer than one window of {seq_len}; give a longer file")
    return ids[:n * seq_len].reshape(n, seq_len)


def _loss_step(model):
    """Jitted (params, ids (B, L)) -> next-token loss sums over whole windows."""
    def sums(params, ids):
        return clm_loss(model, params, {"input_ids": ids, "segment_ids": jax.numpy.ones_like(ids)},
                        jax.random.key(0), False)
    return jax.jit(sums)


def compare_decoder(run, qmodel, qparams, eval_file, rounds: int = 3, seq_len: int = 128, batch: int = 4,
                    max_windows: int = 32) -> dict:
    """Held-out next-token loss (mean over the eval text's windows) and forward tokens/s of float vs int8."""
    windows = text_windows(run.tokenizer, Path(eval_file).read_text(encoding="utf-8"), seq_len, max_windows)
    full = max(len(windows) // batch, 1) * batch if len(windows) >= batch else len(windows)
    batches = [jax.numpy.asarray(windows[i:i + batch]) for i in range(0, full, batch)]
    params = {"before": jax.device_put(run.params), "after": qparams}
    models = {"before": run.model, "after": qmodel}
    out, runners = {"metric_name": "next_token_loss"}, {}
    for which in ("before", "after"):
        step = _loss_step(models[which])
        sums = [jax.device_get(step(params[which], b)) for b in batches]  # also the warm-up
        out[f"metric_{which}"] = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
        runners[which] = lambda i, step=step, p=params[which]: jax.block_until_ready(step(p, batches[i]))
    tokens = [int(np.prod(b.shape)) for b in batches]
    speed = interleaved_throughput(runners, tokens, rounds)
    return out | {"metric_delta": out["metric_after"] - out["metric_before"],
                  "tokens_per_s_before": speed["before"], "tokens_per_s_after": speed["after"],
                  "speedup": speed["after"] / speed["before"], "eval_file": str(eval_file), "eval_tokens": sum(tokens),
                  "eval_batches": len(batches), "throughput_rounds": rounds}


# ---------------------------------------------------------------- the printed table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_table(report: dict) -> str:
    """Before / after / change for size, the task metric and throughput."""
    mode = report["mode"]
    rows = [("all params", _mb(report["bytes_before"]), _mb(report["bytes_after"]), f"{report['ratio']:.2f}x smaller"),
            (f"quantized tensors ({report['quantized_layers']})", _mb(report["quantized_bytes_before"]),
             _mb(report["quantized_bytes_after"]), f"{report['quantized_ratio']:.2f}x smaller")]
    if report.get("metric_before") is not None and report["metric_name"] == "next_token_loss":
        rows += [("held-out next-token loss", f"{report['metric_before']:.4f}", f"{report['metric_after']:.4f}",
                  f"{report['metric_delta']:+.4f}"),
                 ("tokens/s (forward)", f"{report['tokens_per_s_before']:,.0f}", f"{report['tokens_per_s_after']:,.0f}",
                  f"{report['speedup']:.2f}x")]
    elif report.get("metric_before") is not None:
        pct = lambda key: f"{100 * report[key]:.2f}"  # noqa: E731  (entity F1 and accuracy are fractions)
        rows += [(f"{report['metric_name']} (%)", pct("metric_before"), pct("metric_after"),
                  f"{100 * report['metric_delta']:+.2f} pts"),
                 ("tokens/s", f"{report['tokens_per_s_before']:,.0f}", f"{report['tokens_per_s_after']:,.0f}",
                  f"{report['speedup']:.2f}x")]
    header = ("", "float32", f"int8 ({mode})", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), "-" * len(fmt(header)), *map(fmt, rows)]
    if report.get("eval_file") and report["metric_name"] == "next_token_loss":
        lines.append(f"eval: {report['eval_file']} ({report['eval_tokens']:,} tokens in {report['eval_batches']} "
                     f"batches of 128-token windows, {report['throughput_rounds']} timed passes, float and int8 "
                     "alternating)")
    elif report.get("eval_file"):
        lines.append(f"eval: {report['eval_file']} ({report['eval_tokens']:,} real tokens, {report['eval_batches']} "
                     f"length-sorted batches, {report['throughput_rounds']} timed passes, float and int8 alternating)")
    lines.append(f"wrote {Path(report['out']) / PARAMS_FILE} and {Path(report['out']) / REPORT_FILE}")
    return "\n".join(lines)
