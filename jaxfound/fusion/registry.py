"""The registry side of fusion: hooks that record runs in the graph at cfg.run.registry, and model I/O.

    register_finetune_run(cfg, summary)      # after finetune(cfg): the run, its base, dataset, task, valid/test scores
    register_pretrain_run(cfg, summary)      # after pretrain(cfg)
    model = load_model("runs/ner_a")         # a jaxfound run dir or a transformers dir -> params, config, labels
    evaluate = run_evaluator("runs/ner_a")   # params -> the run's metric on its data.valid

Every hook is a no-op (returns None) when cfg.run.registry is unset, so drivers call them unconditionally.
Task names are '<dataset>/<kind>': the dataset is the training file's directory (conll2003), the kind the task
(ner; for CoNLL tag_column 1 'pos', 2 'chunk').
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import igraph as ig

from jaxfound import checkpoint as ckpt
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph as G

GENERIC_STEMS = ("train", "input", "valid", "dev", "test", "data", "corpus")
GENERIC_DIRS = ("model", "best", "hf", "checkpoints")
RECORDED_METRICS = ("f1", "token_micro_f1", "accuracy", "macro_f1", "eval_loss")  # headline metrics only
CONLL_KINDS = {-1: "ner", 3: "ner", 1: "pos", 2: "chunk"}


# ---------------------------------------------------------------- names


def dataset_name(path: str | Path) -> str:
    """'conll2003' for .../conll2003/train.txt, 'tinyshakespeare' for .../tinyshakespeare/input.txt."""
    p = Path(path)
    return p.name if p.is_dir() else p.parent.name if p.stem in GENERIC_STEMS and p.parent.name else p.stem


def model_name(path: str | Path) -> str:
    """A run or transformers dir's name ('model' dirs take their parent's name)."""
    p = Path(path).resolve()
    return p.parent.name if p.name in GENERIC_DIRS else p.name


def task_name(cfg) -> str:
    """'<dataset>/<kind>' for a fine-tuning config."""
    kind = cfg.train.task
    if kind == "ner":
        kind = CONLL_KINDS.get(cfg.data.tag_column, f"tags{cfg.data.tag_column}")
    return f"{dataset_name(cfg.data.train)}/{kind}"


def _find_by_path(g: ig.Graph, path: str | Path) -> str | None:
    want = str(Path(path).resolve())
    return next((v["name"] for v in g.vs.select(kind_eq="model") if G._get(v, "path") == want), None) \
        if g.vcount() else None


def _fresh(g: ig.Graph, name: str, path: str, registry) -> bool:
    """True if name is new; False if it is already registered for this same path (a re-run: update it)."""
    if not G._has(g, name):
        return True
    old = G._get(G._vertex(g, name), "path")
    if old != path:
        raise JaxfoundError(f"registry {registry}: a model named '{name}' is already registered (path {old}); "
                            "give the run another name or run.dir")
    return False


# ---------------------------------------------------------------- hooks


def register_pretrain_run(cfg, summary: dict | None = None, params=None, *, name: str | None = None) -> str | None:
    """Record a pretraining run: model (arch, trunk signature, hash), corpus, tokenizer; finetuned_from model.init
    when it continues a registered model. Returns the model's name."""
    if not cfg.run.registry:
        return None
    g = G.load(cfg.run.registry, create=True)
    run_dir = Path(cfg.run.dir).resolve()
    name = name or model_name(run_dir)
    if params is None and summary is not None and "state" in summary:
        params = summary["state"].params
    signature = G.trunk_signature(params) if params is not None else None
    corpus = dataset_name(cfg.data.path) if cfg.data.path else "synthetic"
    if _fresh(g, name, str(run_dir), cfg.run.registry):
        parent = _find_by_path(g, cfg.model.init) if cfg.model.init else None
        G.add_model(g, name, path=str(run_dir), arch=cfg.model.arch, signature=signature, task=cfg.train.task)
        if parent:  # continued pretraining: it descends from the model it started from
            G.add_edge(g, name, parent, "finetuned_from")
        G._ensure(g, "dataset", corpus)
        G.add_edge(g, name, corpus, "pretrained_on")
    _record_scores(g, name, f"{corpus}/{cfg.train.task}", summary or {})
    G.save(g, cfg.run.registry)
    return name


def register_finetune_run(cfg, summary: dict | None = None, params=None, *, name: str | None = None,
                          task: str | None = None) -> str | None:
    """Record a fine-tuning run: finetuned_from its base (registered on first sight from model.init), trained_on
    its dataset, evaluated_on its task with the valid and test scores of summary['reports']."""
    if not cfg.run.registry:
        return None
    g = G.load(cfg.run.registry, create=True)
    run_dir = Path(cfg.run.dir).resolve()
    name = name or model_name(run_dir)
    task = task or task_name(cfg)
    dataset = dataset_name(cfg.data.train)
    if params is None:
        params = ckpt.load_params(run_dir / "best")
    signature = G.trunk_signature(params)
    if _fresh(g, name, str(run_dir), cfg.run.registry):
        base = _find_by_path(g, cfg.model.init) if cfg.model.init else None
        if base is None:  # the base is registered the first time a fine-tune names it
            base = model_name(cfg.model.init) if cfg.model.init else f"{name}-init"
            G.register_pretrain(g, base, str(Path(cfg.model.init).resolve()) if cfg.model.init else None,
                                f"{base}-corpus", arch=cfg.model.arch, signature=signature)
        labels = json.loads((run_dir / "labels.json").read_text()) if (run_dir / "labels.json").is_file() else None
        G.register_finetune(g, name, str(run_dir), base, dataset, task, signature=signature, labels=labels,
                            seed=cfg.train.seed, lr=cfg.train.lr, content_hash=_hash(run_dir / "best"))
    _record_scores(g, name, task, summary or {})
    G.save(g, cfg.run.registry)
    return name


def _hash(path: Path) -> str | None:
    return G.content_hash(path) if path.exists() else None


def _record_scores(g: ig.Graph, name: str, task: str, summary: dict) -> None:
    G._ensure(g, "task", task)
    for split, report in (summary.get("reports") or {}).items():
        for metric, value in report.items():
            if metric in RECORDED_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                G.record_score(g, name, task, metric, value, split)


def register_merge_run(registry, name: str, path: str | None, sources: dict[str, float], method: str,
                       scores: list[tuple[str, str, str, float]] = (), **attrs) -> str:
    """Record a merged model: merged_from each source (method, coefficient) and scores [(task, metric, split, v)]."""
    g = G.load(registry, create=True)
    G.register_merge(g, name, path, sources, method, **attrs)
    for task, metric, split, value in scores:
        G._ensure(g, "task", task)
        G.record_score(g, name, task, metric, value, split)
    G.save(g, registry)
    return name


def register_quantize_run(registry, name: str, path: str | None, source: str, method: str = "int8",
                          scores: list[tuple[str, str, str, float]] = ()) -> str:
    """Record a quantized copy of a registered model (never a merge candidate) and its scores."""
    g = G.load(registry, create=True)
    source = (_find_by_path(g, source) if Path(source).exists() else None) or source  # a path or a name
    G.register_quantize(g, name, path, source, method)
    for task, metric, split, value in scores:
        G._ensure(g, "task", task)
        G.record_score(g, name, task, metric, value, split)
    G.save(g, registry)
    return name


# ---------------------------------------------------------------- model I/O


@dataclass
class LoadedModel:
    """A model from disk: what merging, evaluating and saving need."""

    path: str
    model_cfg: object  # jaxfound ModelConfig
    head: str
    task: str  # jaxfound train.task (ner, cls, mlm, clm)
    params: dict
    labels: list[str] | None
    tokenizer_dir: str | None
    config: dict | None = None  # the run's config.json (jaxfound dirs)


HEAD_TASK = {"token_cls": "ner", "seq_cls": "cls", "mlm": "mlm", "lm": "clm", "none": "mlm"}


def load_model(path: str | Path) -> LoadedModel:
    """A jaxfound fine-tuned run dir (config.json + best/), a pretraining run dir (config.json + checkpoints/) or a
    transformers dir (config.json + weights)."""
    from jaxfound.config import from_dict
    from jaxfound.tasks import get_task

    p = Path(path)
    if not (p / "config.json").is_file():
        raise JaxfoundError(f"model {path}: no config.json; expected a jaxfound run dir or a transformers dir")
    raw = json.loads((p / "config.json").read_text())
    if "run" in raw and "model" in raw:  # jaxfound
        cfg = from_dict(raw, str(p / "config.json"))
        task = get_task(cfg.train.task)
        if (p / "best").exists():
            params = ckpt.load_params(p / "best")
        else:
            params = ckpt.latest_params(p)
        labels = json.loads((p / "labels.json").read_text()) if (p / "labels.json").is_file() else None
        tok = p / "tokenizer"
        return LoadedModel(str(p), cfg.model, task.head, task.name, params, labels,
                           str(tok) if tok.is_dir() else cfg.data.tokenizer, raw)
    from jaxfound.interop.hf import from_pretrained, load_hf_config

    info = load_hf_config(p)
    model, params = from_pretrained(p)
    labels = [info.id2label[i] for i in range(len(info.id2label))] if info.id2label else None
    has_tok = any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    return LoadedModel(str(p), model.cfg, model.head, HEAD_TASK[model.head], params, labels,
                       str(p) if has_tok else None)


def registry_loader(g: ig.Graph):
    """load_params(name, path) for execute_plan: from the path the graph records."""
    def load(name: str, path: str | None) -> dict:
        if not path:
            raise JaxfoundError(f"model '{name}' has no path in the registry; cannot load its params")
        return load_model(path).params
    return load


def run_evaluator(run_dir: str | Path, file: str | Path | None = None, metric: str | None = None):
    """(evaluate(params) -> metric (default: the task's headline) on file (default: its data.valid), metric name);
    the predict step is compiled once."""
    from jaxfound import finetune as ft
    from jaxfound.data import finetune as ftdata
    from jaxfound.sharding import make_mesh

    run = ft.load_run(run_dir)
    file = file or run.cfg.data.valid
    if not file:
        raise JaxfoundError(f"{run_dir}: its config has no data.valid; pass the validation file")
    split = ft.read_split(file, run.task.name, run.cfg.data, run.labels, run.tokenizer, run.cfg.data.seq_len)
    mesh = make_mesh(dataclasses.replace(run.cfg.mesh, data=-1, fsdp=1, tensor=1))
    step = ft.make_predict_step(run.model, mesh)
    batches = list(ftdata.eval_batches(split.windows, ft._eval_batch_size(mesh, run.cfg.train.batch_size),
                                       run.cfg.data.seq_len, run.pad_id, run.task.name == "ner"))
    metric = metric or run.task.metric

    def evaluate(params) -> float:
        preds = ft.predict_windows(step, params, batches, mesh, len(split.windows))
        return float(ft.score(run.task.name, split.gold, ft.decode(run.task.name, split, preds, run.labels),
                              run.labels)[metric])

    return evaluate, metric


def write_model(out: str | Path, template: LoadedModel, params: dict, extra: dict | None = None) -> Path:
    """A jaxfound run dir (config.json, labels.json, tokenizer/, best/) that `jaxfound evaluate` / `predict` load."""
    from jaxfound.config import Config, TrainConfig, to_dict
    from jaxfound.data.tokenizer import load_tokenizer

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = dict(template.config) if template.config else to_dict(Config(train=TrainConfig(task=template.task)))
    config["model"] = dataclasses.asdict(template.model_cfg)
    config["run"] = dict(config.get("run", {}), dir=str(out), registry=None)
    data = dict(config.get("data", {}))
    data["seq_len"] = min(data.get("seq_len", 128), template.model_cfg.max_position)  # validated against the model
    config["data"] = data
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if template.labels is not None:
        (out / "labels.json").write_text(json.dumps(template.labels, indent=1))
    if template.tokenizer_dir and Path(template.tokenizer_dir).resolve() != (out / "tokenizer"):
        load_tokenizer(template.tokenizer_dir).save_pretrained(str(out / "tokenizer"))
    ckpt.save_params(out / "best", params)
    if extra is not None:
        (out / "merge.json").write_text(json.dumps(extra, indent=1, default=str))
    return out


def write_hf(out: str | Path, template: LoadedModel, params: dict) -> Path:
    """A transformers directory (config.json, model.safetensors, the tokenizer) via interop.hf.save_pretrained."""
    from jaxfound.data.tokenizer import load_tokenizer
    from jaxfound.interop.hf import save_pretrained
    from jaxfound.models import build_model

    tok = load_tokenizer(template.tokenizer_dir) if template.tokenizer_dir else None
    return save_pretrained(out, build_model(template.model_cfg, template.head), params, tokenizer=tok,
                           id2label=template.labels)


# ---------------------------------------------------------------- drivers behind `jaxfound merge` and `graph`


def merge_from_registry(registry, target_task: str, method: str = "auto", out: str | Path | None = None,
                        name: str | None = None, force: bool = False, **plan_kwargs) -> dict:
    """Plan from the registry's graph, fuse, validate on the best target fine-tune's data.valid, record, write."""
    from jaxfound.fusion.plan import execute_plan, plan_merge

    g = G.load(registry)
    plan = plan_merge(g, target_task, method, **plan_kwargs)
    print(plan.describe())
    best = max((c for c in plan.candidates if c.task == target_task), key=lambda c: c.score)
    template = load_model(best.path)
    evaluate, _ = run_evaluator(best.path)
    name = name or f"{target_task.replace('/', '-')}-{plan.method}"
    out = Path(out or Path(registry) / "merged" / name).resolve()
    params, report = execute_plan(plan, registry_loader(g), evaluate, g=g, name=name, path=str(out), force=force)
    report.pop("task_params")
    if report["registered"]:
        write_model(out, template, params, extra=report)
        G.save(g, registry)
        report["out"] = str(out)
    return report


def _resolve(path: str, recipe: Path, key: str) -> Path:
    """A recipe's model path: as given (relative to the working dir), else relative to the recipe file."""
    for p in (Path(path), recipe.parent / path):
        if (p / "config.json").is_file():
            return p
    raise JaxfoundError(f"{recipe}: {key} '{path}' is not a jaxfound run dir or transformers dir "
                        "(no config.json there or next to the recipe)")


def run_recipe(recipe_path: str | Path, out: str | Path, hf: bool = False, seed: int = 0) -> dict:
    """Merge the models of a mergekit-style YAML recipe; write a jaxfound run dir, or a transformers dir (hf)."""
    from jaxfound.config import read_yaml
    from jaxfound.fusion.plan import merge_recipe, parse_recipe

    recipe_path = Path(recipe_path)
    recipe = parse_recipe(read_yaml(recipe_path), str(recipe_path))
    models = [load_model(_resolve(p, recipe_path, f"models[{i}].model")) for i, p in enumerate(recipe.models)]
    base = load_model(_resolve(recipe.base, recipe_path, "base_model")) if recipe.base else None
    for i, m in enumerate(models[1:], 1):
        if m.labels and models[0].labels and m.labels != models[0].labels:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has labels {m.labels} but models[0] has "
                                f"{models[0].labels}; merged classifiers need one label set")
        if m.head != models[0].head:
            raise JaxfoundError(f"{recipe_path}: models[{i}] has head '{m.head}' but models[0] has "
                                f"'{models[0].head}'; merge models with one head")
    params = merge_recipe(recipe, [m.params for m in models], base.params if base else None, seed)
    summary = {"recipe": str(recipe_path), "method": recipe.method, "models": list(recipe.models),
               "weights": list(recipe.weights), "densities": list(recipe.densities), "base": recipe.base,
               "lambda": recipe.lam, "normalize": recipe.normalize, "format": "transformers" if hf else "jaxfound"}
    where = write_hf(out, models[0], params) if hf else write_model(out, models[0], params, extra=summary)
    summary["out"] = str(where)
    return summary


def describe(g: ig.Graph) -> str:
    """A table of the models (root, trunk signature, scores) and the counts of everything else."""
    rows = [f"{'model':<30} {'root':<24} {'sig':<8} {'scores'}"]
    for v in g.vs.select(kind_eq="model") if g.vcount() else []:
        root = G.root_model(g, v["name"]) or "(several)"
        sig = (G._get(v, "signature") or "-")[:8]
        sc = ", ".join(f"{s['task']} {s['metric']}/{s['split']}={s['value']:.4f}" for s in G.scores(g, v["name"])
                       if s["metric"] in ("f1", "accuracy", "eval_loss"))
        parents = [f"{e['relation']}->{g.vs[e.target]['name']}" for e in G._out_edges(g, v, G.PARENT_RELATIONS)]
        rows.append(f"{v['name']:<30} {root:<24} {sig:<8} {sc}" + (f"   [{'; '.join(parents)}]" if parents else ""))
    kinds = {k: len(g.vs.select(kind_eq=k)) if g.vcount() else 0 for k in G.KINDS}
    rows.append(", ".join(f"{n} {k}s" for k, n in kinds.items()) + f", {g.ecount()} edges")
    for kind in ("dataset", "task"):
        names = [v["name"] for v in g.vs.select(kind_eq=kind)] if g.vcount() else []
        rows.append(f"{kind}s: {', '.join(names) or '-'}")
    return "\n".join(rows)
