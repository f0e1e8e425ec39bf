"""`jaxfound <verb>`: a thin layer; every verb calls one function of jaxfound.app that a user could import.

Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from jaxfound import runs
from jaxfound.app import bench, evaluate, finetune, generate, merge, pretrain, quantize, serve
from jaxfound.app import compile as aot
from jaxfound.config import CONFIG_DIR, load_config
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph
from jaxfound.fusion.plan import METHODS as PLAN_METHODS
from jaxfound.fusion.refit import RefitConfig
from jaxfound.quant.kernel import cache_dir

VERBS = {}  # name -> (function of the parsed args, help, argument specs)


def arg(*names, **options) -> tuple:
    return names, options


def config_args(default: str) -> list[tuple]:
    return [arg("--config", "-c", default=None, help=f"YAML recipe (default: {default})"),
            arg("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.steps=40")]


def verb(name: str, help_text: str, *args: tuple):
    def register(fn):
        VERBS[name] = (fn, help_text, args)
        return fn
    return register


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("-" * (width + 30))
    for k, v in summary.items():
        print(f"{k:<{width}}  {f'{v:.4f}' if isinstance(v, float) else v}")
    print("-" * (width + 30))


@verb("pretrain", "pretrain a BERT (masked LM) or GPT (causal LM); resumes if run.dir has checkpoints",
      *config_args("configs/bert_tiny_mlm.yaml"))
def _pretrain(args):
    summary = pretrain.pretrain(load_config(args.config, args.overrides, verb="pretrain"))
    first, last = summary.get("first_eval") or {}, summary.get("last_eval") or {}
    _print_summary({
        "run dir": summary["run_dir"], "steps": summary["steps"], "seconds": summary["seconds"],
        "final train loss": summary["final_loss"], "first eval_loss": first.get("eval_loss"),
        "last eval_loss": last.get("eval_loss"), "last eval_accuracy": last.get("eval_accuracy"),
        "preempted (resumable)": summary["preempted"], "non-finite steps skipped": summary["nonfinite_steps"]})


@verb("bench", "train-step throughput on synthetic batches: compile time, tokens/s, FLOPs, MFU, memory",
      *config_args("configs/bert_tiny_mlm.yaml"),
      arg("--steps", type=int, default=10, help="timed steps (the median is reported)"),
      arg("--warmup", type=int, default=2, help="untimed steps after compilation"),
      arg("--out", default=None, help="write the report as JSON here"))
def _bench(args):
    report = bench.benchmark(load_config(args.config, args.overrides, verb="bench"), args.steps, args.warmup)
    print(bench.format_table(report))
    if args.out:
        runs.write_json(args.out, report, 2)
        print(f"wrote {args.out}")


@verb("compile", "compile a recipe's train step (and a decoder's prefill / decode) for a TPU slice on this host: "
      "memory per chip, fits or not, FLOPs, XLA's step-time estimate and MFU, collectives",
      *config_args("configs/bert_tiny_mlm.yaml"),
      arg("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5e:4x4, v5p:2x2x1, v4:2x2x1, v6e:2x2"),
      arg("--decode-batch", type=int, default=None, help="decoders: batch of the prefill / decode compiles "
          "(default train.batch_size)"),
      arg("--out", default=None, help="write the report as JSON here"))
def _compile(args):
    report = aot.compile_for_topology(load_config(args.config, args.overrides, verb="compile"), args.topology,
                                      decode_batch=args.decode_batch)
    print(aot.format_report(report))
    if args.out:
        runs.write_json(args.out, report, 2)
        print(f"wrote {args.out}")


@verb("finetune", "fine-tune a pretrained model for ner / pos / chunk (CoNLL) or cls (CSV / JSON lines); keeps the "
      "best valid score", *config_args("configs/ner_conll03.yaml"))
def _finetune(args):
    summary = finetune.finetune(load_config(args.config or CONFIG_DIR / "ner_conll03.yaml", args.overrides,
                                            verb="finetune"))
    table = {"run dir": summary["run_dir"], "steps": summary["steps"], "seconds": summary["seconds"],
             "best step": (summary.get("best") or {}).get("step"), "final train loss": summary["final_loss"]}
    for split, rep in summary.get("reports", {}).items():
        table |= {f"{split} {k}": v for k, v in rep.items()}
    _print_summary(table)


@verb("evaluate", "score a fine-tuned run dir on a labelled file: entity and token-level reports",
      arg("--run", required=True, help="run dir written by `jaxfound finetune`, `merge` or `quantize`"),
      arg("--file", required=True, help="CoNLL file (ner, pos, chunk) or CSV / JSON lines (cls)"),
      arg("--out", default=None, help="also write the report as JSON here"))
def _evaluate(args):
    print(evaluate.evaluate(args.run, args.file, args.out)["table"])


@verb("predict", "entities (ner, with character offsets) or labels (cls) as JSON lines",
      arg("--run", required=True, help="run dir written by `jaxfound finetune`, `merge` or `quantize`"),
      arg("--file", default=None, help="plain text, one text per line"),
      arg("texts", nargs="*", help="texts to label (whitespace-tokenized for tagging)"))
def _predict(args):
    texts = list(args.texts)
    if args.file:
        try:
            texts += Path(args.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise JaxfoundError(f"--file {args.file}: cannot read it as UTF-8 text ({e})") from None
    for row in evaluate.predict(args.run, texts):
        if "entities" in row:  # the entities say it; POS tags are the answer themselves
            row.pop("tags")
        print(json.dumps(row, ensure_ascii=False))


@verb("generate", "continue text prompts with a decoder LM (GPT-2, Llama family): greedy or sampled, streamed",
      arg("--model", required=True, help="causal-LM run dir, transformers dir or .gguf file"),
      arg("prompts", nargs="+", help="prompts; each is continued on its own (batched together)"),
      arg("--chat", action="store_true", help="put each prompt in the tokenizer's chat template as a user turn"),
      arg("--max-new-tokens", type=int, default=64),
      arg("--temperature", type=float, default=0.0, help="0: greedy (argmax)"),
      arg("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this mass"),
      arg("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)"),
      arg("--seed", type=int, default=0, help="sampling key"),
      arg("--stop", action="append", default=[], metavar="STR", help="stop string, cut from the text (repeatable)"))
def _generate(args):
    single = len(args.prompts) == 1

    def stream(row, token, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate.generate(args.model, args.prompts, chat=args.chat, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               stop=args.stop, on_token=stream if single else None)
    if single:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(args.prompts, result.texts)):
            print(f"--- [{i}] {prompt}\n{text}")
    print(generate.summary(result), file=sys.stderr)


@verb("serve", "an OpenAI-compatible HTTP API for a decoder (completions, chat; continuous batching) or a "
      "fine-tuned encoder (/v1/ner, /v1/classify)",
      arg("--run", required=True, help="run dir, transformers dir or .gguf file (decoder, tagger or classifier)"),
      arg("--host", default="127.0.0.1", help="address to bind (default: loopback only)"),
      arg("--port", type=int, default=8000, help="TCP port (0: a free one, printed at start)"),
      arg("--max-batch", type=int, default=8, help="decoder: KV-cache slots (requests decoded together); "
          "encoder: texts per batch"),
      arg("--max-len", type=int, default=None, help="decoder: tokens per request, prompt + completion "
          "(default: min(2048, the model's positions))"),
      arg("--max-queue", type=int, default=64, help="requests that may wait for a slot; beyond it: 503"),
      arg("--api-key-file", default=None, help="file holding the key clients must send as 'Authorization: Bearer'"),
      arg("--model-name", default=None, help="the model id clients use (default: the run dir's name)"),
      arg("--seed", type=int, default=0, help="sampling key of requests that give no seed"),
      arg("--compile-cache", default=None, help="XLA compilation cache dir, so restarts skip compiling "
          "(default: $JAXFOUND_CACHE/xla; 'none': off)"))
def _serve(args):
    key = serve.read_api_key(args.api_key_file) if args.api_key_file else None
    options = serve.ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
                                 max_queue=args.max_queue, api_key=key, model_name=args.model_name, seed=args.seed,
                                 compile_cache=None if args.compile_cache == "none" else
                                 args.compile_cache or str(cache_dir() / "xla"))
    return serve.serve(args.run, options, progress=lambda line: print(line, flush=True))


@verb("quantize", "int8 / 4-bit copy of a fine-tuned or merged run dir, or of a decoder (w8 | w8a8 | w4): sizes, "
      "metric and tokens/s before/after",
      arg("--checkpoint", required=True, help="run dir written by `jaxfound finetune` or `jaxfound merge`, or a "
          "decoder: a jaxfound run dir, transformers dir or GGUF file (then generate / serve load the output)"),
      arg("--mode", required=True,
          help="w8: int8 weights, float matmul; w8a8: int8 weights and dynamic per-token int8 activations; w4: 4-bit "
          "weights (groups of 32 rows, a float16 scale and offset each) and int8 activations"),
      arg("--out", required=True, help="output dir: evaluate / predict load it without the float run"),
      arg("--eval", default=None, help="labelled file (a decoder: a text file): metric (held-out next-token loss) "
          "and tokens/s of the float vs int8 model"),
      arg("--rounds", type=int, default=3, help="timed passes over the eval file (after a warm-up pass)"))
def _quantize(args):
    print(quantize.format_table(quantize.quantize_run(args.checkpoint, args.mode, args.out, args.eval,
                                                      rounds=args.rounds)))


@verb("merge", "fuse models: a plan from the knowledge graph (--target-task) or a mergekit-style YAML (--recipe); "
      "optionally searched (--search), heads re-fitted (--refit-heads), gated (--gate)",
      arg("--target-task", default=None, help="task vertex of the registry graph, e.g. conll2003/ner"),
      arg("--registry", default=None, help="registry directory holding graph.json"),
      arg("--method", default="auto", choices=list(PLAN_METHODS)),
      arg("--recipe", default=None, help="mergekit-style YAML (models, merge_method, base_model, parameters); models "
          "and base_model: run dirs, transformers dirs, PEFT adapter dirs or GGUF files"),
      arg("--out", default=None, help="output dir (plan mode default: REGISTRY/merged/NAME)"),
      arg("--hf", action="store_true", help="recipe mode: write a transformers directory"),
      arg("--as-adapter", action="store_true", help="recipe mode: the models are LoRA runs of one base; write "
          "their linear / task_arithmetic merge as one LoRA run (rank = the sum of ranks; base_model optional)"),
      arg("--name", default=None, help="name of the fused model in the graph"),
      arg("--force", action="store_true", help="register the fused model even if it fails the gate"),
      arg("--gate", type=float, default=0.95, help="register only if the merge keeps >= this fraction of every "
          "parent's validation score on each task (default 0.95)"),
      arg("--search", action="store_true", help="search the coefficients on validation (grid, then an evolution "
          "strategy; objective: the worst task's retention); the log goes to OUT/search_log.jsonl"),
      arg("--budget", type=int, default=None, help="--search: objective evaluations at most (default 12)"),
      arg("--refit-heads", action="store_true", help="re-fit each task's head on the merged trunk (a linear probe "
          "on cached features of the task's data.train; the epoch best on valid is kept); recorded in the graph"),
      arg("--refit-lr", type=float, default=1e-2, help="--refit-heads: peak AdamW learning rate"),
      arg("--refit-epochs", type=int, default=2, help="--refit-heads: passes over the training tokens"),
      arg("--density", type=float, default=0.5, help="ties / dare: fraction of task-vector entries kept"),
      arg("--lambda", dest="lam", type=float, default=1.0, help="task-vector scale"),
      arg("--seed", type=int, default=0, help="dare: the drop mask's seed; --search: the evolution strategy's"))
def _merge(args):
    _check_merge_flags(args)
    if args.recipe:
        if not args.out:
            raise JaxfoundError("--recipe needs --out DIR (where the merged model is written)")
        if args.as_adapter and args.hf:
            raise JaxfoundError("--as-adapter writes a jaxfound LoRA run; drop --hf (export it for PEFT with "
                                "`jaxfound export --adapter`)")
        return _print_summary(merge.run_recipe(args.recipe, args.out, hf=args.hf, seed=args.seed,
                                               as_adapter=args.as_adapter))
    if not args.target_task or not args.registry:
        raise JaxfoundError("give --target-task T --registry R (plan from the graph) or --recipe R.yaml --out DIR")
    refit = RefitConfig(lr=args.refit_lr, epochs=args.refit_epochs, seed=args.seed) if args.refit_heads else None
    report = merge.merge_from_registry(args.registry, args.target_task, args.method, args.out, args.name,
                                       args.force, search_budget=(args.budget or 12) if args.search else None,
                                       refit=refit, threshold=args.gate, search_seed=args.seed,
                                       density=args.density, lam=args.lam, seed=args.seed)
    _print_summary({k: report.get(k) for k in ("name", "method", "metric", "split", "score", "best_parent",
                                               "best_parent_score", "worst_retention", "registered", "out")})
    print(report["message"])
    return 0 if report["registered"] else 1


def _check_merge_flags(args) -> None:
    """Flags that cannot work together or out of range: name the flag and what is valid."""
    if args.recipe:
        for flag, on in (("--search", args.search), ("--refit-heads", args.refit_heads), ("--budget", args.budget)):
            if on:
                raise JaxfoundError(f"{flag} works with --target-task (the plan from the graph); a --recipe fixes "
                                    "its coefficients and has no validation data")
    if args.budget is not None and not args.search:
        raise JaxfoundError(f"--budget {args.budget} needs --search (it bounds the search's evaluations)")
    if args.budget is not None and args.budget < 1:
        raise JaxfoundError(f"--budget {args.budget}: give the number of evaluations, an integer >= 1")
    if not 0.0 < args.gate <= 1.5:
        raise JaxfoundError(f"--gate {args.gate}: give the fraction of each parent's score to keep, in (0, 1.5], "
                            "e.g. 0.95")
    if args.refit_epochs < 1 or args.refit_lr <= 0:
        raise JaxfoundError(f"--refit-epochs {args.refit_epochs} / --refit-lr {args.refit_lr}: epochs must be >= 1 "
                            "and the learning rate > 0")


@verb("graph", "the knowledge graph of a registry: show, lineage MODEL, plot OUT.png",
      arg("action", choices=["show", "lineage", "plot"]),
      arg("target", nargs="?", default=None, help="lineage: the model; plot: the PNG (or SVG/PDF) path"),
      arg("--registry", required=True, help="registry directory holding graph.json"))
def _graph(args):
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


@verb("export", "write a fine-tuned (or merged) run dir as a transformers directory (safetensors + tokenizer)",
      arg("--run", required=True, help="run dir written by `jaxfound finetune` or `jaxfound merge`"),
      arg("--out", required=True, help="directory that transformers' from_pretrained will load"),
      arg("--adapter", action="store_true", help="a LoRA run's adapters as a PEFT adapter dir (for its base model)"))
def _export(args):
    path = evaluate.export(args.run, args.out, adapter=args.adapter)
    print(f"wrote {path} (load it with " + ("peft's PeftModel.from_pretrained onto its base model)" if args.adapter
                                          else "transformers' from_pretrained)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxfound", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="verb")
    for name, (_, help_text, args) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for names, options in args:
            p.add_argument(*names, **options)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may come after options too (`--topology v5e:4x4 mesh.fsdp=-1 --out f.json`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verb:
        parser.print_help()
        return 2
    try:
        code = VERBS[args.verb][0](args) or 0
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
