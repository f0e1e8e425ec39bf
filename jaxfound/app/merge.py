"""`jaxfound merge` and `jaxfound graph`: fuse models from a plan on the knowledge graph or from a mergekit-style
recipe, validate on the target's data, record the result; describe the registry.

    report = merge_from_registry("REG", "conll2003/ner")      # plan, merge, validate, gate, register, write
    report = merge_from_registry("REG", "conll2003/ner", "ties", search_budget=12, refit=RefitConfig())
    summary = run_recipe("ties.yaml", "runs/ties", hf=True)   # mergekit-style YAML -> a transformers dir

With search_budget, the plan's coefficients are searched on the validation split (fusion.search: a grid, then an
evolution strategy; the objective is the worst task's retention of its best parent's score) and every evaluation is
written to OUT/search_log.jsonl (a rerun into the same OUT reads it back: evaluations already made cost nothing).
With refit, each task's head is re-fitted on the merged trunk (app.refit), inside the search too.
"""

from __future__ import annotations

import json
from pathlib import Path

import igraph as ig
import numpy as np

from jaxfound import runs
from jaxfound.app.evaluate import predictor_for
from jaxfound.app.refit import HeadRefit
from jaxfound.config import read_yaml
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import aligned, graph, merge
from jaxfound.fusion.adapters import RANK_KEEPING, merge_adapters
from jaxfound.fusion.gate import DEFAULT_THRESHOLD
from jaxfound.fusion.plan import MergePlan, execute_plan, plan_merge, search_plan
from jaxfound.fusion.recipe import merge_recipe, parse_recipe
from jaxfound.fusion.refit import RefitConfig
from jaxfound.interop.hf import save_pretrained, transformers_names
from jaxfound.interop.peft import CONFIG_FILE as ADAPTER_CONFIG
from jaxfound.models import lora

SEARCH_LOG = "search_log.jsonl"


def registry_loader(g: ig.Graph):
    """load_params(name, path) for execute_plan: from the path the graph records."""
    def load(name: str, path: str | None) -> dict:
        if not path:
            raise JaxfoundError(f"model '{name}' has no path in the registry; cannot load its params")
        return runs.open_run(path).params
    return load


def run_evaluator(run: runs.Run | str | Path, file: str | Path | None = None, metric: str | None = None):
    """(evaluate(params) -> metric (default: the task's headline) on file (default: its data.valid), metric name);
    the predict step is compiled once."""
    run = run if isinstance(run, runs.Run) else runs.open_run(run)
    file = file or run.config.data.valid
    if not file:
        raise JaxfoundError(f"{run.path}: its config has no data.valid; pass the validation file")
    predictor = predictor_for(run)
    split = predictor.read(file, run.config.data)
    metric = metric or run.task.metric
    return (lambda params: float(predictor.score(params, split)[metric])), metric


def write_merged(out: str | Path, template: runs.Run, params: dict, report: dict) -> Path:
    """A jaxfound run dir shaped like template (config, labels, tokenizer) with the merged params and merge.json."""
    return runs.write_run(out, runs.config_for(template), params, labels=template.labels,
                          tokenizer=template.tokenizer, reports={"merge.json": report})


def memo_loader(load):
    """load(name, path), each model read from disk once."""
    loaded: dict[str, dict] = {}

    def cached(name: str, path: str | None) -> dict:
        if name not in loaded:
            loaded[name] = load(name, path)
        return loaded[name]
    return cached


def read_search_log(path: str | Path) -> dict[str, tuple[float, dict]]:
    """A search cache {evaluation key: (score, info)} from an earlier search log (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    cache = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            cache[row["key"]] = (float(row["score"]), row.get("info", {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise JaxfoundError(f"{path}:{i}: not a search-log line (JSON with 'key' and 'score'); "
                                "delete the file to search afresh") from None
    return cache


def write_search_log(path: str | Path, log: list[dict]) -> Path:
    """Every evaluation of a search as one JSON line: index, phase, coefficients, score, cached, key, info."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, default=float) + "\n" for row in log))
    return path


def task_templates(plan: MergePlan) -> dict[str, runs.Run]:
    """Per task of the plan, its best candidate's run (labels, tokenizer, data files, evaluation)."""
    out = {}
    for task in plan.tasks:
        best = max((c for c in plan.candidates if c.task == task), key=lambda c: c.score)
        if not best.path:
            raise JaxfoundError(f"model '{best.name}' has no path in the registry; cannot evaluate task '{task}'")
        out[task] = runs.open_run(best.path)
    return out


def task_scorer(evaluators, head_refit: HeadRefit | None = None):
    """score_tasks({task: params}) -> {task: validation score}; with head_refit the heads are re-fitted first and
    scored on the cached validation features (what evaluating the whole model gives, without a second pass)."""
    def score_tasks(task_params):
        if head_refit is None:
            return {t: evaluators[t](p) for t, p in task_params.items()}
        return {t: info["valid_after"] for t, info in head_refit(task_params)[1].items()}
    return score_tasks


def merge_from_registry(registry, target_task: str, method: str = "auto", out: str | Path | None = None,
                        name: str | None = None, force: bool = False, *, search_budget: int | None = None,
                        refit: RefitConfig | None = None, threshold: float = DEFAULT_THRESHOLD, search_seed: int = 0,
                        **plan_kwargs) -> dict:
    """Plan from the registry's graph, (search,) fuse, (re-fit heads,) validate every task on its best fine-tune's
    data.valid, gate, record, write."""
    g = graph.load(registry)
    plan = plan_merge(g, target_task, method, **plan_kwargs)
    print(plan.describe())
    templates = task_templates(plan)
    evaluators = {t: run_evaluator(r)[0] for t, r in templates.items()}
    metrics = {t: r.task.metric for t, r in templates.items()}
    name = name or f"{target_task.replace('/', '-')}-{plan.method}" + ("-searched" if search_budget else "")
    out = Path(out or Path(registry) / "merged" / name).resolve()
    load = memo_loader(registry_loader(g))
    head_refit = HeadRefit(templates, refit, metrics=metrics) if refit is not None else None
    searched = {}
    if search_budget is not None:
        params = {c.name: load(c.name, c.path) for c in plan.candidates}
        base = load(plan.base, plan.base_path) if plan.method not in ("linear", "slerp", "greedy_soup") \
            else None
        reference = {t: max(evaluators[t](params[c.name]) for c in plan.candidates if c.task == t) for t in plan.tasks}

        score_tasks = task_scorer(evaluators, head_refit)
        log_path = out / SEARCH_LOG
        plan, result = search_plan(plan, params, base, score_tasks, reference, search_budget, seed=search_seed,
                                   cache=read_search_log(log_path))
        write_search_log(log_path, result.log)
        print(f"search: {result.evaluations} new evaluations of {len(result.log)} requested (budget "
              f"{search_budget}); best worst-task retention {result.score:.4f} at {result.best}; log {log_path}")
        searched = {"search": {"budget": search_budget, "evaluations": result.evaluations, "best": result.best,
                               "worst_retention": result.score, "reference": reference, "log": str(log_path)}}
    params, report = execute_plan(plan, load, evaluators[target_task], g=g, name=name, path=str(out), force=force,
                                  evaluators=evaluators, threshold=threshold, refit=head_refit, metrics=metrics)
    report.pop("task_params")
    report |= searched
    print(plan_gate_table(report))
    if report["registered"]:
        write_merged(out, templates[target_task], params, report)
        graph.save(g, registry)
        report["out"] = str(out)
    return report


def plan_gate_table(report: dict) -> str:
    """The gate's verdict per (task, parent)."""
    gate = report["gate"]
    rows = [f"gate (keep >= {gate['threshold']:g} of each parent's {report['split']} score):",
            f"  {'task':<24} {'parent':<28} {'parent':>8} {'merged':>8} {'kept':>7}  verdict"]
    rows += [f"  {c['task']:<24} {c['parent']:<28} {c['parent_score']:>8.4f} {c['score']:>8.4f} "
             f"{c['retention']:>7.3f}  {'pass' if c['passed'] else 'FAIL'}" for c in gate["claims"]]
    return "\n".join(rows)


def _resolve(path: str, recipe: Path, key: str) -> Path:
    """A recipe's model path, as given (relative to the working dir), else relative to the recipe file: whatever
    runs.open_run opens (a jaxfound run dir, a transformers dir, a PEFT adapter dir or a GGUF file)."""
    for p in (Path(path), recipe.parent / path):
        if (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file() or (
                p.suffix.lower() == ".gguf" and p.is_file()):
            return p
    raise JaxfoundError(f"{recipe}: {key} '{path}' is not a jaxfound run dir or transformers dir (config.json), a "
                        f"PEFT adapter dir ({ADAPTER_CONFIG}) or a GGUF file (.gguf), as given or next to the recipe")


def _check_mergeable(models: list[runs.Run], recipe_path: Path) -> None:
    for i, m in enumerate(models[1:], 1):
        if m.labels and models[0].labels and m.labels != models[0].labels:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has labels {m.labels} but models[0] has "
                                f"{models[0].labels}; merged classifiers need one label set")
        if m.model.head != models[0].model.head:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has head '{m.model.head}' but models[0] has "
                                f"'{models[0].model.head}'; merge models with one head")


def run_recipe(recipe_path: str | Path, out: str | Path, hf: bool = False, seed: int = 0,
               as_adapter: bool = False) -> dict:
    """Merge the models of a mergekit-style YAML recipe; write a jaxfound run dir, or a transformers dir (hf).
    as_adapter: the models are LoRA runs of one base, merged into one LoRA run (see merge_adapter_runs)."""
    recipe_path = Path(recipe_path)
    recipe = parse_recipe(read_yaml(recipe_path), str(recipe_path), needs_base=not as_adapter)
    if as_adapter:
        return merge_adapter_runs(recipe, recipe_path, out)
    models = [runs.open_run(_resolve(p, recipe_path, f"models[{i}].model")) for i, p in enumerate(recipe.models)]
    base = runs.open_run(_resolve(recipe.base, recipe_path, "base_model")) if recipe.base else None
    _check_mergeable(models, recipe_path)
    params = merge_recipe(recipe, [m.params for m in models], base.params if base else None, seed,
                          names=transformers_names(models[0].model))
    summary = {"recipe": str(recipe_path), "method": recipe.method, "models": list(recipe.models),
               "weights": list(recipe.weights), "densities": list(recipe.densities), "base": recipe.base,
               "lambda": recipe.lam, "normalize": recipe.normalize, "format": "transformers" if hf else "jaxfound"}
    template = models[0]
    where = save_pretrained(out, template.model, params, tokenizer=template.tokenizer, id2label=template.labels) \
        if hf else write_merged(out, template, params, summary)
    summary["out"] = str(where)
    return summary


def merge_adapter_runs(recipe, recipe_path: Path, out: str | Path) -> dict:
    """LoRA runs of one base merged by a rank-keeping method (linear, task_arithmetic) into one LoRA run: its
    adapters are the exact weighted sum of theirs (rank = the sum of ranks; fusion.adapters.linear_adapters), its
    heads their weighted average. The run opens folded like any LoRA run; `jaxfound export --adapter` writes it for
    PEFT. The adapters carry their base, which must be the same weights in every run; the recipe's base_model may be
    left out, and when given it is checked to be that base (its weights are not otherwise used)."""
    if recipe.method not in RANK_KEEPING:
        raise JaxfoundError(f"{recipe_path}: merge_method {recipe.method} does not keep adapters low-rank; with "
                            f"--as-adapter use one of {', '.join(RANK_KEEPING)} (other methods: merge without "
                            "--as-adapter, which folds the adapters into a full model)")
    models = [runs.open_run(_resolve(p, recipe_path, f"models[{i}].model"), adapters=True)
              for i, p in enumerate(recipe.models)]
    _check_mergeable(models, recipe_path)
    base = _frozen_trunk(models[0])
    for i, m in enumerate(models):
        if not m.config.model.lora.rank:
            raise JaxfoundError(f"{recipe_path}: models[{i}] ({m.path}) has no LoRA adapters; --as-adapter merges "
                                "LoRA runs (train.lora.rank > 0) of one base")
        trunk = _frozen_trunk(m)
        if i and not (_weights_within(trunk, base) and _weights_within(base, trunk)):
            raise JaxfoundError(f"{recipe_path}: models[{i}] ({m.path}) is an adapter of other base weights than "
                                f"models[0] ({models[0].path}); adapters merge only over one base")
    if recipe.base is not None:
        _check_adapter_base(recipe, recipe_path, models[0], base)
    normalize = recipe.normalize if recipe.normalize is not None else recipe.method == "linear"
    params, cfg = merge_adapters(recipe.method, [m.params for m in models], [m.config.model.lora for m in models],
                                 list(recipe.weights), lam=recipe.lam, normalize=normalize)
    summary = {"recipe": str(recipe_path), "method": recipe.method, "models": list(recipe.models),
               "weights": list(recipe.weights), "lambda": recipe.lam, "normalize": normalize, "format": "adapter",
               "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}}
    if recipe.base is not None:
        summary["base"] = f"{recipe.base} (checked: the adapters' frozen weights are its weights)"
    template = models[0]
    where = runs.write_run(out, runs.config_for(template, lora=cfg), params, labels=template.labels,
                           tokenizer=template.tokenizer, reports={"merge.json": summary})
    summary["out"] = str(where)
    return summary


def _frozen_trunk(run: runs.Run) -> dict:
    """A LoRA run's trunk without its adapters: the base weights it was trained on (its heads are trained with the
    adapters and may differ between runs of one base)."""
    return merge.split_trunk(lora.split(run.params)[0])[1]


def _weights_within(trunk: dict, base: dict) -> bool:
    """Every weight of trunk is in base (at its path) and equal to base's cast to its dtype; base may hold more."""
    base = aligned.flat(base)
    for path, x in aligned.flat(trunk).items():
        x = np.asarray(x)
        if path not in base or not np.array_equal(x, np.asarray(base[path]).astype(x.dtype)):
            return False
    return True


def _check_adapter_base(recipe, recipe_path: Path, adapter: runs.Run, trunk: dict) -> None:
    """The recipe's base_model, opened, holds the frozen weights of the adapters (else the recipe names another
    model than the one the adapters were trained on)."""
    base = runs.open_run(_resolve(recipe.base, recipe_path, "base_model"))
    key, base_trunk, _ = merge.split_trunk(base.params)
    if key != merge.split_trunk(adapter.params)[0] or not _weights_within(trunk, base_trunk):
        raise JaxfoundError(f"{recipe_path}: base_model '{recipe.base}' is not the base of the adapters (the frozen "
                            f"weights of models[0] ({adapter.path}) differ from its weights); name the model they "
                            "were trained on, or leave base_model out: --as-adapter does not need it")


def describe(g: ig.Graph) -> str:
    """A table of the models (root, trunk signature, scores) and the counts of everything else."""
    rows = [f"{'model':<30} {'root':<24} {'sig':<8} {'scores'}"]
    for v in graph.models(g) if g.vcount() else []:
        root = graph.root_model(g, v["name"]) or "(several)"
        sig = (graph.attr(v, "signature") or "-")[:8]
        sc = ", ".join(f"{s['task']} {s['metric']}/{s['split']}={s['value']:.4f}" for s in graph.scores(g, v["name"])
                       if s["metric"] in ("f1", "accuracy", "eval_loss"))
        parents = [f"{e['relation']}->{g.vs[e.target]['name']}" for e in graph.out_edges(g, v, graph.PARENT_RELATIONS)]
        rows.append(f"{v['name']:<30} {root:<24} {sig:<8} {sc}" + (f"   [{'; '.join(parents)}]" if parents else ""))
    kinds = {k: len(g.vs.select(kind_eq=k)) if g.vcount() else 0 for k in graph.KINDS}
    rows.append(", ".join(f"{n} {k}s" for k, n in kinds.items()) + f", {g.ecount()} edges")
    for kind in ("dataset", "task"):
        names = [v["name"] for v in g.vs.select(kind_eq=kind)] if g.vcount() else []
        rows.append(f"{kind}s: {', '.join(names) or '-'}")
    return "\n".join(rows)
