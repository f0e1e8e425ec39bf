"""`jaxfound <verb>`: a thin layer; every verb calls a library function a user could import.

Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from jaxfound.app import bench, evaluate, finetune, merge, pretrain, quantize
from jaxfound.config import CONFIG_DIR, load_config
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph

VERBS = {}


def verb(name, help_text):
    def register(fn):
        VERBS[name] = (fn, help_text)
        return fn
    return register


def _config_args(p: argparse.ArgumentParser, default_help: str = "configs/bert_tiny_mlm.yaml") -> None:
    p.add_argument("--config", "-c", default=None, help=f"YAML recipe (default: {default_help})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=40")


def _print_summary(summary: dict, keys) -> None:
    width = max(len(k) for k in keys)
    print("-" * (width + 30))
    for k in keys:
        v = summary.get(k)
        if isinstance(v, float):
            v = f"{v:.4f}"
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 30))


@verb("pretrain", "pretrain a BERT (masked LM) or GPT (causal LM); resumes if run.dir has checkpoints")
def _pretrain(p):
    _config_args(p)

    def run(args):
        summary = pretrain.pretrain(load_config(args.config, args.overrides, verb="pretrain"))
        summary.pop("state", None)
        first, last = summary.get("first_eval") or {}, summary.get("last_eval") or {}
        table = {
            "run dir": summary["run_dir"], "steps": summary["steps"], "seconds": summary["seconds"],
            "final train loss": summary["final_loss"], "first eval_loss": first.get("eval_loss"),
            "last eval_loss": last.get("eval_loss"), "last eval_accuracy": last.get("eval_accuracy"),
            "preempted (resumable)": summary["preempted"], "non-finite steps skipped": summary["nonfinite_steps"],
        }
        _print_summary(table, list(table))
        return 0
    return run


@verb("bench", "train-step throughput on synthetic batches: compile time, tokens/s, FLOPs, MFU, memory")
def _bench(p):
    _config_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--out", default=None, help="write the report as JSON here")

    def run(args):
        report = bench.benchmark(load_config(args.config, args.overrides, verb="bench"), args.steps, args.warmup)
        print(bench.format_table(report))
        if args.out:
            bench.write_report(report, args.out)
            print(f"wrote {args.out}")
        return 0
    return run


@verb("finetune", "fine-tune a pretrained model for ner (CoNLL) or cls (CSV / JSON lines); keeps the best valid F1")
def _finetune(p):
    _config_args(p, "configs/ner_conll03.yaml")

    def run(args):
        summary = finetune.finetune(load_config(args.config or CONFIG_DIR / "ner_conll03.yaml", args.overrides,
                                                verb="finetune"))
        best = summary.get("best") or {}
        table = {"run dir": summary["run_dir"], "steps": summary["steps"], "seconds": summary["seconds"],
                 "best step": best.get("step"), "final train loss": summary["final_loss"]}
        for split, rep in summary.get("reports", {}).items():
            table |= {f"{split} {k}": v for k, v in rep.items()}
        _print_summary(table, list(table))
        return 0
    return run


@verb("evaluate", "score a fine-tuned run dir on a labelled file: entity and token-level reports")
def _evaluate(p):
    p.add_argument("--run", required=True, help="run dir written by `jaxfound finetune`")
    p.add_argument("--file", required=True, help="CoNLL file (ner) or CSV / JSON lines (cls)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")

    def run(args):
        report = evaluate.evaluate(args.run, args.file, args.out)
        print(report["table"])
        return 0
    return run


@verb("predict", "entities (ner, with character offsets) or labels (cls) as JSON lines")
def _predict(p):
    p.add_argument("--run", required=True, help="run dir written by `jaxfound finetune`")
    p.add_argument("--file", default=None, help="plain text, one text per line")
    p.add_argument("texts", nargs="*", help="texts to label (whitespace-tokenized for ner)")

    def run(args):
        texts = list(args.texts)
        if args.file:
            try:
                texts += Path(args.file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise JaxfoundError(f"--file {args.file}: cannot read it as UTF-8 text ({e})") from None
        for row in evaluate.predict(args.run, texts):
            row.pop("tags", None)
            print(json.dumps(row, ensure_ascii=False))
        return 0
    return run


@verb("quantize", "int8 copy of a fine-tuned or merged run dir (w8 | w8a8): sizes, metric and tokens/s before/after")
def _quantize(p):
    p.add_argument("--checkpoint", required=True, help="run dir written by `jaxfound finetune` or `jaxfound merge`")
    p.add_argument("--mode", required=True,
                   help="w8: int8 weights, float matmul; w8a8: int8 weights and dynamic per-token int8 activations")
    p.add_argument("--out", required=True, help="output dir: evaluate / predict load it without the float run")
    p.add_argument("--eval", default=None, help="labelled file: metric and tokens/s of the float vs int8 model")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the eval file (after a warm-up pass)")

    def run(args):
        report = quantize.quantize_run(args.checkpoint, args.mode, args.out, args.eval, rounds=args.rounds)
        print(quantize.format_table(report))
        return 0
    return run


@verb("merge", "fuse models: a plan from the knowledge graph (--target-task) or a mergekit-style YAML (--recipe)")
def _merge(p):
    p.add_argument("--target-task", default=None, help="task vertex of the registry graph, e.g. conll2003/ner")
    p.add_argument("--registry", default=None, help="registry directory holding graph.json")
    p.add_argument("--method", default="auto",
                   choices=["auto", "greedy_soup", "average", "task_arithmetic", "ties", "dare"])
    p.add_argument("--recipe", default=None, help="mergekit-style YAML (models, merge_method, base_model, parameters)")
    p.add_argument("--out", default=None, help="output dir (plan mode default: REGISTRY/merged/NAME)")
    p.add_argument("--hf", action="store_true", help="recipe mode: write a transformers directory")
    p.add_argument("--name", default=None, help="name of the fused model in the graph")
    p.add_argument("--force", action="store_true", help="register the fused model even if worse than its best parent")
    p.add_argument("--density", type=float, default=0.5, help="ties / dare: fraction of task-vector entries kept")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="task-vector scale")
    p.add_argument("--seed", type=int, default=0, help="dare: the drop mask's seed")

    def run(args):
        if args.recipe:
            if not args.out:
                raise JaxfoundError("--recipe needs --out DIR (where the merged model is written)")
            summary = merge.run_recipe(args.recipe, args.out, hf=args.hf, seed=args.seed)
            _print_summary(summary, list(summary))
            return 0
        if not args.target_task or not args.registry:
            raise JaxfoundError("give --target-task T --registry R (plan from the graph) or --recipe R.yaml --out DIR")
        report = merge.merge_from_registry(args.registry, args.target_task, args.method, args.out, args.name,
                                           args.force, density=args.density, lam=args.lam, seed=args.seed)
        table = {k: report.get(k) for k in ("name", "method", "metric", "split", "score", "best_parent",
                                            "best_parent_score", "delta", "registered", "out")}
        _print_summary(table, list(table))
        print(report["message"])
        return 0 if report["registered"] else 1
    return run


@verb("graph", "the knowledge graph of a registry: show, lineage MODEL, plot OUT.png")
def _graph(p):
    p.add_argument("action", choices=["show", "lineage", "plot"])
    p.add_argument("target", nargs="?", default=None, help="lineage: the model; plot: the PNG (or SVG/PDF) path")
    p.add_argument("--registry", required=True, help="registry directory holding graph.json")

    def run(args):
        g = graph.load(args.registry)
        if args.action == "show":
            print(merge.describe(g))
        elif not args.target:
            raise JaxfoundError(f"graph {args.action} needs an argument: "
                                f"{'a model name' if args.action == 'lineage' else 'the output path, e.g. graph.png'}")
        elif args.action == "lineage":
            print(" <- ".join([args.target, *graph.lineage(g, args.target)]))
        else:
            print(f"wrote {graph.plot(g, args.target)}")
        return 0
    return run


@verb("export", "write a fine-tuned (or merged) run dir as a transformers directory (safetensors + tokenizer)")
def _export(p):
    p.add_argument("--run", required=True, help="run dir written by `jaxfound finetune` or `jaxfound merge`")
    p.add_argument("--out", required=True, help="directory that transformers' from_pretrained will load")

    def run(args):
        out = evaluate.export(args.run, args.out)
        print(f"wrote {out} (load it with transformers' from_pretrained)")
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxfound", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="verb")
    runners = {}
    for name, (factory, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        runners[name] = factory(p)
    parser.set_defaults(_runners=runners)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        code = args._runners[args.verb](args) or 0
    except JaxfoundError as e:
        one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        sys.stderr.write(f"jaxfound {args.verb}: error: {one_line}\n")  # one write: threads cannot split it
        sys.stderr.flush()
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    _exit_if_distributed(code)
    return code


def _exit_if_distributed(code: int) -> None:
    """After jax.distributed a process can hang at interpreter exit: flush and leave explicitly."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        jax.distributed.shutdown()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
