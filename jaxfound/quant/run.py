"""`jaxfound quantize`: a fine-tuned (or merged) run dir -> an int8 run dir that evaluate / predict load on their own.

    report = quantize_run("runs/ner", "w8", "runs/ner-w8", eval_file="test.txt")

The quantized dir holds config.json (model.quant = the mode), labels.json, tokenizer/, params.safetensors + quant.json
(int8 kernels + float32 scales, ``save_quantized``) and quant_report.json: sizes, the task metric and inference
tokens/s of the float and the int8 model on the eval file, timed batch by batch in alternation so both share the
machine's noise.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.errors import JaxfoundError
from jaxfound.quant.checkpoint import META_FILE, PARAMS_FILE, load_quantized, save_quantized
from jaxfound.quant.int8 import DEFAULT_RULES, MODES, check_rules, quantize
from jaxfound.quant.report import size_report

REPORT_FILE = "quant_report.json"
METRIC_NAMES = {"ner": ("f1", "entity_f1"), "cls": ("accuracy", "accuracy")}  # task -> (score key, report name)


def is_quantized_run(run_dir) -> bool:
    return (Path(run_dir) / META_FILE).is_file()


def load_quantized_params(run_dir) -> dict:
    """The int8 + float params of a dir written by ``quantize_run``, as jax arrays (placed once, not per call)."""
    qparams, _ = load_quantized(run_dir)
    return jax.tree.map(jnp.asarray, qparams)


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


def compare(run, qmodel, qparams, eval_file, rounds: int = 3) -> dict:
    """Task metric and tokens/s of run (float) and qmodel/qparams on eval_file, same batches and mesh."""
    from jaxfound import finetune as ft
    from jaxfound.data import finetune as ftdata
    from jaxfound.sharding import global_batch, make_mesh

    task = run.task.name
    split = ft.read_split(eval_file, task, run.cfg.data, run.labels, run.tokenizer, run.cfg.data.seq_len)
    mesh = make_mesh(dataclasses.replace(run.cfg.mesh, data=-1, fsdp=1, tensor=1))
    batches = ftdata.eval_batches(split.windows, ft._eval_batch_size(mesh, run.cfg.train.batch_size),
                                  run.cfg.data.seq_len, run.pad_id, task == "ner")
    key, name = METRIC_NAMES[task]
    models = {"before": (run.model, jax.device_put(run.params)), "after": (qmodel, qparams)}
    out, runners = {"metric_name": name}, {}
    for which, (model, params) in models.items():
        step = ft.make_predict_step(model, mesh)
        preds = ft.predict_windows(step, params, batches, mesh, len(split.windows))  # also the warm-up
        out[f"metric_{which}"] = float(ft.score(task, split.gold, ft.decode(task, split, preds, run.labels),
                                                run.labels)[key])
        placed = [global_batch({k: v for k, v in b.items() if k != "labels"}, mesh) for _, b in batches]
        runners[which] = jax_runner(step, params, placed)
    tokens = [real_tokens(b) for _, b in batches]
    speed = interleaved_throughput(runners, tokens, rounds)
    out |= {"metric_delta": out["metric_after"] - out["metric_before"],
            "tokens_per_s_before": speed["before"], "tokens_per_s_after": speed["after"],
            "speedup": speed["after"] / speed["before"], "eval_file": str(eval_file), "eval_tokens": sum(tokens),
            "eval_batches": len(batches), "throughput_rounds": rounds}
    return out


# ---------------------------------------------------------------- the driver


def _check_out(out: Path, checkpoint: Path) -> None:
    if out.resolve() == checkpoint.resolve():
        raise JaxfoundError(f"--out {out} is the checkpoint itself; give a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_quantized_run(out))):
        raise JaxfoundError(f"--out {out} exists and is not an empty dir or an earlier quantized dir; "
                            "give a new or empty directory")


def write_quantized_run(out, run, qparams, mode: str, metadata: dict) -> Path:
    """config.json (model.quant = mode), labels.json, tokenizer/, params.safetensors + quant.json under ``out``."""
    from jaxfound.config import to_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = to_dict(run.cfg)
    config["model"] = dict(config["model"], quant=mode)
    config["run"] = dict(config.get("run", {}), dir=str(out.resolve()), registry=None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "labels.json").write_text(json.dumps(run.labels, indent=1))
    if (out / "tokenizer").exists():
        shutil.rmtree(out / "tokenizer")
    run.tokenizer.save_pretrained(str(out / "tokenizer"))
    save_quantized(out, qparams, {"mode": mode, **metadata})
    return out


def quantize_run(checkpoint, mode: str, out, eval_file=None, rules=None, rounds: int = 3,
                 register: bool = True) -> dict:
    """Quantize a fine-tuned / merged run dir to ``out``; report sizes (and metric, tokens/s on eval_file).

    register: record ``out`` in the source run's registry (run.registry), if it has one; False for scratch copies.
    """
    from jaxfound import finetune as ft
    from jaxfound.models import build_model

    checkpoint, out = Path(checkpoint), Path(out)
    if mode not in MODES:
        raise JaxfoundError(f"--mode {mode!r}: allowed {', '.join(MODES)}")
    if rounds < 1:
        raise JaxfoundError(f"rounds={rounds}: need at least 1 timed pass over the eval file")
    if is_quantized_run(checkpoint):
        raise JaxfoundError(f"--checkpoint {checkpoint} is already int8 ({META_FILE}); give the float run dir")
    if not (checkpoint / "config.json").is_file():
        raise JaxfoundError(f"--checkpoint {checkpoint}: no config.json; expected a run dir written by "
                            "`jaxfound finetune` or `jaxfound merge`")
    _check_out(out, checkpoint)
    if eval_file is not None and not Path(eval_file).is_file():
        raise JaxfoundError(f"--eval {eval_file}: file not found")
    rules = check_rules(DEFAULT_RULES if rules is None else rules)

    run = ft.load_run(checkpoint)
    qparams = quantize(run.params, rules)
    report = {"mode": mode, "checkpoint": str(checkpoint), "out": str(out), "task": run.task.name,
              **size_report(run.params, qparams), "rules": [dataclasses.asdict(r) for r in rules]}
    write_quantized_run(out, run, qparams, mode, {"source": str(checkpoint.resolve()), "rules": rules})
    report |= {"metric_name": METRIC_NAMES[run.task.name][1], "metric_before": None, "metric_after": None,
               "tokens_per_s_before": None, "tokens_per_s_after": None}  # measured only on an eval file
    if eval_file is not None:
        qmodel = build_model(dataclasses.replace(run.cfg.model, quant=mode), run.task.head)
        report |= compare(run, qmodel, jax.device_put(qparams), eval_file, rounds)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    if register and run.cfg.run.registry:  # the source is registered: record the int8 copy beside it (quantized_from)
        from jaxfound.fusion.registry import register_quantize_run

        scores = [] if report["metric_after"] is None else [
            (f"{Path(eval_file).parent.name}/{run.task.name}", report["metric_name"], Path(eval_file).stem,
             float(report["metric_after"]))]
        register_quantize_run(run.cfg.run.registry, out.resolve().name, str(out.resolve()),
                              str(checkpoint.resolve()), f"int8-{mode}", scores)
    return report


# ---------------------------------------------------------------- the printed table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_table(report: dict) -> str:
    """Before / after / change for size, the task metric and throughput."""
    mode = report["mode"]
    rows = [("all params", _mb(report["bytes_before"]), _mb(report["bytes_after"]), f"{report['ratio']:.2f}x smaller"),
            (f"quantized tensors ({report['quantized_layers']})", _mb(report["quantized_bytes_before"]),
             _mb(report["quantized_bytes_after"]), f"{report['quantized_ratio']:.2f}x smaller")]
    if report.get("metric_before") is not None:
        pct = lambda key: f"{100 * report[key]:.2f}"  # noqa: E731  (entity F1 and accuracy are fractions)
        rows += [(f"{report['metric_name']} (%)", pct("metric_before"), pct("metric_after"),
                  f"{100 * report['metric_delta']:+.2f} pts"),
                 ("tokens/s", f"{report['tokens_per_s_before']:,.0f}", f"{report['tokens_per_s_after']:,.0f}",
                  f"{report['speedup']:.2f}x")]
    header = ("", "float32", f"int8 ({mode})", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), "-" * len(fmt(header)), *map(fmt, rows)]
    if report.get("eval_file"):
        lines.append(f"eval: {report['eval_file']} ({report['eval_tokens']:,} real tokens, {report['eval_batches']} "
                     f"length-sorted batches, {report['throughput_rounds']} timed passes, float and int8 alternating)")
    lines.append(f"wrote {Path(report['out']) / PARAMS_FILE} and {Path(report['out']) / REPORT_FILE}")
    return "\n".join(lines)
