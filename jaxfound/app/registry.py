"""Registry hooks: the drivers record their runs in the knowledge graph at run.registry (a no-op when unset).

    register_finetune_run(cfg, summary)      # after finetune(cfg): the run, its base, dataset, task, valid/test scores
    register_pretrain_run(cfg, summary)      # after pretrain(cfg): the run, its corpus, the base it continues

Task names are '<dataset>/<task>': the dataset is the training file's directory (conll2003), the task the
jaxfound task (ner, pos, chunk, cls; mlm / clm for corpora).
"""

from __future__ import annotations

from pathlib import Path

import igraph as ig

from jaxfound import runs
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph
from jaxfound.models import lora
from jaxfound.tasks import resolve_task

GENERIC_STEMS = ("train", "input", "valid", "dev", "test", "data", "corpus")
GENERIC_DIRS = ("model", "best", "hf", "checkpoints")
RECORDED_METRICS = ("f1", "token_micro_f1", "accuracy", "macro_f1", "eval_loss")  # headline metrics only


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
    """'<dataset>/<task>' for a fine-tuning config (CoNLL tag columns 1 / 2: pos / chunk)."""
    return f"{dataset_name(cfg.data.train)}/{resolve_task(cfg).name}"


def _find_by_path(g: ig.Graph, path: str | Path) -> str | None:
    want = str(Path(path).resolve())
    return next((v["name"] for v in graph.models(g) if graph.attr(v, "path") == want), None) \
        if g.vcount() else None


def _fresh(g: ig.Graph, name: str, path: str, registry) -> bool:
    """True if name is new; False if it is already registered for this same path (a re-run: update it)."""
    if not graph.has(g, name):
        return True
    old = graph.attr(graph.vertex(g, name), "path")
    if old != path:
        raise JaxfoundError(f"registry {registry}: a model named '{name}' is already registered (path {old}); "
                            "give the run another name or run.dir")
    return False


# ---------------------------------------------------------------- hooks


def register_pretrain_run(cfg, summary: dict | None = None, params=None, *, name: str | None = None) -> str | None:
    """Record a pretraining run: model (arch, trunk signature, hash), corpus, tokenizer; a continued run (model.init)
    is finetuned_from its base with continued=True and the corpus on the edge (the base registered on first sight).
    Returns the model's name."""
    if not cfg.run.registry:
        return None
    g = graph.load(cfg.run.registry, create=True)
    run_dir = Path(cfg.run.dir).resolve()
    name = name or model_name(run_dir)
    if params is None and summary is not None and "state" in summary:
        params = summary["state"].params
    signature = graph.trunk_signature(params) if params is not None else None
    corpus = dataset_name(cfg.data.path) if cfg.data.path else "synthetic"
    if _fresh(g, name, str(run_dir), cfg.run.registry):
        base = _find_by_path(g, cfg.model.init) if cfg.model.init else None
        if cfg.model.init and base is None:  # the base is registered the first time a continued run names it
            base = model_name(cfg.model.init)
            graph.register_pretrain(g, base, str(Path(cfg.model.init).resolve()), f"{base}-corpus",
                                    arch=cfg.model.arch, signature=signature)
        graph.add_model(g, name, path=str(run_dir), arch=cfg.model.arch, signature=signature, task=cfg.train.task)
        if base:  # continued pretraining: it descends from the model it started from (its nearest ancestor)
            graph.add_edge(g, name, base, "finetuned_from", continued=True, corpus=corpus, task=cfg.train.task)
        graph.ensure(g, "dataset", corpus)
        graph.add_edge(g, name, corpus, "pretrained_on")
    task = f"{corpus}/{cfg.train.task}"
    _record_scores(g, name, _summary_scores(task, summary), task)
    graph.save(g, cfg.run.registry)
    return name


def register_finetune_run(cfg, summary: dict | None = None, params=None, *, name: str | None = None,
                          task: str | None = None) -> str | None:
    """Record a fine-tuning run: finetuned_from its base (registered on first sight from model.init), trained_on
    its dataset, evaluated_on its task with the valid and test scores of summary['reports']."""
    if not cfg.run.registry:
        return None
    g = graph.load(cfg.run.registry, create=True)
    run_dir = Path(cfg.run.dir).resolve()
    name = name or model_name(run_dir)
    task = task or task_name(cfg)
    dataset = dataset_name(cfg.data.train)
    if params is None:
        params = runs.load_best(run_dir)
    signature = graph.trunk_signature(lora.split(params)[0])  # an adapter's base trunk: the base's signature
    if _fresh(g, name, str(run_dir), cfg.run.registry):
        base = _find_by_path(g, cfg.model.init) if cfg.model.init else None
        if base is None:  # the base is registered the first time a fine-tune names it
            base = model_name(cfg.model.init) if cfg.model.init else f"{name}-init"
            graph.register_pretrain(g, base, str(Path(cfg.model.init).resolve()) if cfg.model.init else None,
                                    f"{base}-corpus", arch=cfg.model.arch, signature=signature)
        common = dict(signature=signature, labels=runs.read_labels(run_dir), seed=cfg.train.seed, lr=cfg.train.lr,
                      content_hash=_hash(run_dir / "best"))
        if cfg.train.lora.rank:
            lo = cfg.train.lora
            graph.register_adapter(g, name, str(run_dir), base, dataset, task, rank=lo.rank, alpha=lo.alpha,
                                   targets=lo.targets, base_hash=_hash(Path(cfg.model.init)) if cfg.model.init
                                   else None, **common)
        else:
            graph.register_finetune(g, name, str(run_dir), base, dataset, task, **common)
    _record_scores(g, name, _summary_scores(task, summary), task)
    graph.save(g, cfg.run.registry)
    return name


def _hash(path: Path) -> str | None:
    return graph.content_hash(path) if path.exists() else None


def _summary_scores(task: str, summary: dict | None) -> list[tuple[str, str, str, float]]:
    """(task, metric, split, value) for the headline metrics of summary['reports']."""
    return [(task, metric, split, value) for split, report in ((summary or {}).get("reports") or {}).items()
            for metric, value in report.items()
            if metric in RECORDED_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)]


def _record_scores(g: ig.Graph, name: str, scores, task: str | None = None) -> None:
    """scores: (task, metric, split, value) rows; task: a task vertex to have even without scores."""
    if task:
        graph.ensure(g, "task", task)
    for score_task, metric, split, value in scores:
        graph.ensure(g, "task", score_task)
        graph.record_score(g, name, score_task, metric, value, split)


def register_quantize_run(registry, name: str, path: str | None, source: str, method: str = "int8",
                          scores: list[tuple[str, str, str, float]] = ()) -> str:
    """Record a quantized copy of a registered model (never a merge candidate) and its scores."""
    g = graph.load(registry, create=True)
    source = (_find_by_path(g, source) if Path(source).exists() else None) or source  # a path or a name
    graph.register_quantize(g, name, path, source, method)
    _record_scores(g, name, scores)
    graph.save(g, registry)
    return name
