"""`jaxfound merge` and `jaxfound graph`: fuse models from a plan on the knowledge graph or from a mergekit-style
recipe, validate on the target's data, record the result; describe the registry.

    report = merge_from_registry("REG", "conll2003/ner")      # plan, merge, validate, register, write
    summary = run_recipe("ties.yaml", "runs/ties", hf=True)   # mergekit-style YAML -> a transformers dir
"""

from __future__ import annotations

from pathlib import Path

import igraph as ig

from jaxfound import runs
from jaxfound.app.evaluate import predictor_for
from jaxfound.config import read_yaml
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph
from jaxfound.fusion.plan import execute_plan, plan_merge
from jaxfound.fusion.recipe import merge_recipe, parse_recipe
from jaxfound.interop.hf import save_pretrained


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


def merge_from_registry(registry, target_task: str, method: str = "auto", out: str | Path | None = None,
                        name: str | None = None, force: bool = False, **plan_kwargs) -> dict:
    """Plan from the registry's graph, fuse, validate on the best target fine-tune's data.valid, record, write."""
    g = graph.load(registry)
    plan = plan_merge(g, target_task, method, **plan_kwargs)
    print(plan.describe())
    best = max((c for c in plan.candidates if c.task == target_task), key=lambda c: c.score)
    template = runs.open_run(best.path)
    evaluate, _ = run_evaluator(template)
    name = name or f"{target_task.replace('/', '-')}-{plan.method}"
    out = Path(out or Path(registry) / "merged" / name).resolve()
    params, report = execute_plan(plan, registry_loader(g), evaluate, g=g, name=name, path=str(out), force=force)
    report.pop("task_params")
    if report["registered"]:
        write_merged(out, template, params, report)
        graph.save(g, registry)
        report["out"] = str(out)
    return report


def _resolve(path: str, recipe: Path, key: str) -> Path:
    """A recipe's model path: as given (relative to the working dir), else relative to the recipe file."""
    for p in (Path(path), recipe.parent / path):
        if (p / "config.json").is_file():
            return p
    raise JaxfoundError(f"{recipe}: {key} '{path}' is not a jaxfound run dir or transformers dir "
                        "(no config.json there or next to the recipe)")


def _check_mergeable(models: list[runs.Run], recipe_path: Path) -> None:
    for i, m in enumerate(models[1:], 1):
        if m.labels and models[0].labels and m.labels != models[0].labels:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has labels {m.labels} but models[0] has "
                                f"{models[0].labels}; merged classifiers need one label set")
        if m.model.head != models[0].model.head:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has head '{m.model.head}' but models[0] has "
                                f"'{models[0].model.head}'; merge models with one head")


def run_recipe(recipe_path: str | Path, out: str | Path, hf: bool = False, seed: int = 0) -> dict:
    """Merge the models of a mergekit-style YAML recipe; write a jaxfound run dir, or a transformers dir (hf)."""
    recipe_path = Path(recipe_path)
    recipe = parse_recipe(read_yaml(recipe_path), str(recipe_path))
    models = [runs.open_run(_resolve(p, recipe_path, f"models[{i}].model")) for i, p in enumerate(recipe.models)]
    base = runs.open_run(_resolve(recipe.base, recipe_path, "base_model")) if recipe.base else None
    _check_mergeable(models, recipe_path)
    params = merge_recipe(recipe, [m.params for m in models], base.params if base else None, seed)
    summary = {"recipe": str(recipe_path), "method": recipe.method, "models": list(recipe.models),
               "weights": list(recipe.weights), "densities": list(recipe.densities), "base": recipe.base,
               "lambda": recipe.lam, "normalize": recipe.normalize, "format": "transformers" if hf else "jaxfound"}
    template = models[0]
    where = save_pretrained(out, template.model, params, tokenizer=template.tokenizer, id2label=template.labels) \
        if hf else write_merged(out, template, params, summary)
    summary["out"] = str(where)
    return summary


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
