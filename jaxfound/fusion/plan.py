"""KG-guided fusion: the knowledge graph picks what to merge, how and with which weights; the result is validated
and recorded back.

    plan = plan_merge(g, "conll2003/ner")        # candidates, left-out models (with reasons), method, coefficients
    print(plan.describe())
    params, report = execute_plan(plan, load_params, evaluate, g=g, name="ner-fused")

How a plan is made (every model vertex other than the base is either a candidate or left out with a reason):

1. Base: the pretrained root (graph.root_model) of the best direct candidate, unless base= is given.
2. Compatible lineage: root_model(m) == base and m's arch and trunk signature equal the base's. Quantized
   models and earlier merges are left out too (their sources are candidates themselves).
3. Relevance r_i: 1 for a model with a score on the target task; `related_weight` (0.5) for one scored only on a
   related task (a task defined on a dataset the target is defined on: graph.related_tasks); otherwise left out.
4. A validation score s_i on `split` for its task's metric (f1, else accuracy, else the first recorded);
   a model without one is left out: the plan never looks at test scores.

Coefficients (they sum to 1):

    q_i = s_i / max_j s_j            over the candidates j of the same task (quality relative to that task's best)
    c_i = r_i exp(q_i / T) / sum_j r_j exp(q_j / T)          T = temperature (0.1)

so a fine-tune 5 points below its task's best weighs exp(-0.5) = 0.61 of it, and a related-task model half a
target one of equal quality. weighting="uniform" gives c_i = 1/n (the uniform soup baseline).

Method 'auto': two or more fine-tunes of the target task -> greedy soup of those (Wortsman et al. 2022: one task
and one head, so averaging whole models works, and the greedy pass drops an ingredient that lowers the validation
score); related-task models are then left out with that reason (in benchmarks/fusion_conll03.py a TIES merge of
NER with POS and chunk models scored well below the NER soup). One fine-tune of the target plus related-task
models -> TIES with density 0.5 (Yadav et al. 2023: task vectors of different tasks interfere; trimming small
entries and electing signs limits that). The trunk is merged with the method; each
task's head is the coefficient-weighted average of that task's candidates' heads (renormalised within the task).

The evidence behind 'auto' (benchmarks/results/fusion_conll03.json: MiniLM on full CoNLL-2003, 2 epochs, test F1):
the greedy soup of four NER fine-tunes kept only the best one (0.8523; the uniform soup 0.8477), so a soup is never
below its best ingredient on validation while a plain average can be; one trunk for NER + POS + chunk kept only
0.82-0.83 of the single-task NER F1 with the heads as merged (task arithmetic and TIES alike) but 0.95-0.97 with each
head re-fitted on the merged trunk, against the single-task models with their heads re-fitted the same way (TIES at
equal weights: NER / POS / chunk 0.953 / 0.992 / 0.982; task arithmetic 0.934 / 0.991 / 0.985), so multi-task merges
want --refit-heads and, there, TIES's trimming and sign election edged out task arithmetic on the worst task.

Searched and gated merges: search_plan replaces the formula's coefficients with the best point of fusion.search
(a staged grid, then an evolution strategy, under a budget of evaluations; objective: the worst task's retention,
score / that task's single-task parent score on validation); execute_plan can re-fit heads after the merge
(refit=, recorded as head_refit_on edges) and gates every claim (fusion.gate: >= threshold of each parent's
validation score on each task, default 0.95; force registers anyway and says so).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import asdict, dataclass, field

import igraph as ig
import jax

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import gate as gating
from jaxfound.fusion import graph, merge, search

ALIASES = {"average": "linear", "dare": "dare_ties"}
# every method of fusion.merge (methods added there become plannable and searchable), plus the plan's own
METHODS = ("auto", "greedy_soup", *ALIASES, *merge.METHODS)
PREFERRED_METRICS = ("f1", "accuracy", "macro_f1")


@dataclass(frozen=True)
class Candidate:
    """One model the plan merges."""

    name: str
    path: str | None
    task: str  # the task whose score qualified it (the target, or a related task)
    relevance: float  # r_i: 1 (target task) or related_weight
    score: float  # s_i: validation score on `task`
    quality: float  # q_i = s_i / best s_j of the same task
    coefficient: float  # c_i


@dataclass(frozen=True)
class MergePlan:
    """What to merge and how; `rationale` says why, in words."""

    target_task: str
    base: str
    base_path: str | None
    method: str  # greedy_soup | linear | task_arithmetic | ties | dare_linear | dare_ties
    metric: str
    split: str
    candidates: tuple[Candidate, ...]
    excluded: tuple[tuple[str, str], ...]  # (model, reason)
    params: dict = field(default_factory=dict)  # lam, normalize, density, seed as the method takes them
    rationale: str = ""

    @property
    def coefficients(self) -> dict[str, float]:
        return {c.name: c.coefficient for c in self.candidates}

    @property
    def tasks(self) -> list[str]:
        """Tasks with candidates, the target first."""
        return list(dict.fromkeys([self.target_task] + [c.task for c in self.candidates]))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The plan as a table plus the rationale."""
        lines = [f"merge plan for task '{self.target_task}' ({self.metric} on {self.split}): method {self.method} "
                 f"{self.params or ''} over base '{self.base}'",
                 f"  {'candidate':<28} {'task':<20} {'r':>5} {'score':>7} {'q':>6} {'coef':>7}"]
        lines += [f"  {c.name:<28} {c.task:<20} {c.relevance:>5.2f} {c.score:>7.4f} {c.quality:>6.3f} "
                  f"{c.coefficient:>7.4f}" for c in self.candidates]
        lines += [f"  left out {name}: {reason}" for name, reason in self.excluded]
        return "\n".join(lines + [self.rationale])


# ---------------------------------------------------------------- planning


def _split_scores(g: ig.Graph, model: str, split: str) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} recorded for model on split."""
    out: dict[str, dict[str, float]] = {}
    for s in graph.scores(g, model):
        if s["split"] == split:
            out.setdefault(s["task"], {})[s["metric"]] = s["value"]
    return out


def task_metric(g: ig.Graph, task: str, split: str, preferred: str | None = None) -> str | None:
    """The metric that ranks models on task: preferred if recorded, else f1, accuracy, macro_f1, else the first."""
    t = graph.vertex(g, task, "task")
    recorded = sorted({e["metric"] for e in graph.in_edges(g, t, ["evaluated_on"]) if e["split"] == split})
    for m in ((preferred,) if preferred else ()) + PREFERRED_METRICS:
        if m in recorded:
            return m
    return recorded[0] if recorded else None


def coefficients(relevance: list[float], quality: list[float], temperature: float,
                 weighting: str = "score") -> list[float]:
    """c_i = r_i exp(q_i / T) / sum_j r_j exp(q_j / T) ('score'), or 1/n ('uniform')."""
    if weighting == "uniform":
        return [1.0 / len(relevance)] * len(relevance)
    if weighting != "score":
        raise JaxfoundError(f"weighting={weighting!r}; valid: 'score', 'uniform'")
    if temperature <= 0:
        raise JaxfoundError(f"temperature={temperature}; it must be > 0")
    top = max(quality)  # shift for a stable softmax
    raw = [r * math.exp((q - top) / temperature) for r, q in zip(relevance, quality)]
    return [w / sum(raw) for w in raw]


def _exclusion(g: ig.Graph, v: ig.Vertex, base_v: ig.Vertex, base: str) -> str | None:
    """Why model v cannot be merged onto base (None: its lineage and trunk are compatible)."""
    name = v["name"]
    if graph.attr(v, "quantization"):
        return f"quantized ({graph.attr(v, 'quantization')}): no float trunk to merge"
    if graph.out_edges(g, v, ["merged_from"]):
        return "an earlier merge: its sources are considered themselves"
    if graph.attr(v, "arch") != graph.attr(base_v, "arch"):  # first: no lineage makes two architectures merge
        return (f"architecture '{graph.attr(v, 'arch')}' differs from the base's '{graph.attr(base_v, 'arch')}' "
                "(different architectures never merge)")
    root = graph.root_model(g, name)
    if root != base:
        other = f"another base: descends from '{root}', not '{base}'" if root else "merged across several bases"
        if graph.attr(v, "signature") != graph.attr(base_v, "signature"):
            other += " (and another trunk signature: another size or vocabulary)"
        return other
    if graph.attr(v, "signature") != graph.attr(base_v, "signature"):
        sig, want = graph.attr(v, "signature") or "none", graph.attr(base_v, "signature") or "none"
        return f"trunk signature {sig[:12]} differs from the base's {want[:12]} (another size or vocabulary)"
    return None


def _score_models(g: ig.Graph, target_task: str, split: str, metric: str, related: set[str],
                  related_weight: float) -> list[tuple]:
    """(vertex, task, r_i, s_i, why it cannot be a candidate or None) for every model, from graph structure."""
    found = []
    for v in graph.models(g):
        scored = _split_scores(g, v["name"], split)
        task, r = ((target_task, 1.0) if target_task in scored
                   else (next((t for t in sorted(scored) if t in related), None), related_weight))
        if task is None:
            tasks = sorted({s["task"] for s in graph.scores(g, v["name"])})
            data = sorted(g.vs[e.target]["name"] for e in graph.out_edges(g, v, ["trained_on", "pretrained_on"]))
            found.append((v, None, None, None, f"unrelated to '{target_task}': no {split} score on it or on a task "
                          f"sharing its datasets (scored on {tasks or 'nothing'}, trained on {data or 'nothing'})"))
            continue
        m = task_metric(g, task, split, metric if task == target_task else None)
        value = scored[task].get(m)
        found.append((v, task, r, value, None if value is not None else f"no '{m}' score on {split} of '{task}'"))
    return found


def _pick_candidates(g: ig.Graph, found: list[tuple], base_v: ig.Vertex, target_task: str, method: str) -> tuple:
    """(picked (vertex, task, r_i, s_i), excluded (model, reason)); 'auto' leaves related tasks out of a soup."""
    base, picked, excluded = base_v["name"], [], []
    for v, task, r, value, why in found:
        if v["name"] == base:
            continue
        reason = _exclusion(g, v, base_v, base) or why
        if reason:
            excluded.append((v["name"], reason))
        else:
            picked.append((v, task, r, value))
    if len(picked) < 2:
        raise JaxfoundError(f"plan for '{target_task}': {len(picked)} compatible candidate(s) on base '{base}', "
                            f"nothing to merge; left out: {excluded}")
    if not any(t == target_task for _, t, _, _ in picked):
        raise JaxfoundError(f"plan for '{target_task}': no compatible candidate is fine-tuned on it (no head)")
    n_target = sum(t == target_task for _, t, _, _ in picked)
    if method == "auto" and n_target >= 2 and n_target < len(picked):
        for v, t, _, _ in picked:
            if t != target_task:
                excluded.append((v["name"], f"auto: {n_target} fine-tunes of '{target_task}' are soup material; "
                                 f"a model of the related task '{t}' would need a task-vector merge, which scored "
                                 "below the soup (benchmarks/fusion_conll03.py); ask for ties / task_arithmetic "
                                 "to include it"))
        picked = [p for p in picked if p[1] == target_task]
    return picked, excluded


def _top_per_task(picked: list[tuple], excluded: list, k: int, split: str) -> tuple[list, list]:
    """The k best picked models of each task (by validation score); the others left out with the reason."""
    if k < 1:
        raise JaxfoundError(f"top_per_task={k}; keep at least 1 model per task")
    rank = {}
    for v, t, _, _ in sorted(picked, key=lambda p: -p[3]):
        rank.setdefault(t, []).append(v["name"])
    keep = {p[0]["name"] for p in picked if p[0]["name"] in rank[p[1]][:k]}
    kept = [p for p in picked if p[0]["name"] in keep]
    excluded = excluded + [(p[0]["name"], f"top_per_task={k}: not among the {k} best of '{p[1]}' on {split}")
                           for p in picked if p[0]["name"] not in keep]
    return kept, excluded


def _choose_method(method: str, candidates: list[Candidate], target_task: str, density: float) -> tuple[str, str]:
    """(the merge method to run, why): 'auto' soups one task's fine-tunes and TIES-merges several tasks."""
    one_task = all(c.task == target_task for c in candidates)
    chosen, why = ALIASES.get(method, method), f"method {method} as requested"
    if method == "auto":  # neither greedy_soup nor ties has an alias
        chosen = "greedy_soup" if one_task else "ties"
        why = (f"auto: all {len(candidates)} candidates are fine-tunes of '{target_task}' (one task, one head) -> "
               "greedy soup: whole models averaged, best-first, keeping an ingredient only if the validation score "
               "does not drop" if one_task else
               f"auto: candidates span {len(set(c.task for c in candidates))} tasks -> TIES (density {density}): "
               "trimming small task-vector entries and electing signs limits interference between tasks")
    if chosen == "greedy_soup" and not one_task:
        raise JaxfoundError("method greedy_soup averages whole models, so every candidate must be a fine-tune of "
                            f"'{target_task}'; pass include_related=False or choose ties / task_arithmetic")
    return chosen, why


def plan_merge(g: ig.Graph, target_task: str, method: str = "auto", *, split: str = "valid",
               metric: str | None = None, base: str | None = None, related_weight: float = 0.5,
               include_related: bool = True, temperature: float = 0.1, weighting: str = "score",
               density: float = 0.5, lam: float = 1.0, normalize: bool | None = None, seed: int = 0,
               top_per_task: int | None = None) -> MergePlan:
    """A merge plan for target_task from the graph g (see the module docstring for the rules and the formula);
    top_per_task=k keeps the k best candidates of each task on validation (1: one model per task)."""
    if method not in METHODS:
        raise JaxfoundError(f"method {method!r} is unknown; valid methods: {', '.join(METHODS)}")
    graph.vertex(g, target_task, "task")
    metric = task_metric(g, target_task, split, metric)
    if metric is None:
        raise JaxfoundError(f"no model has a score on split '{split}' of task '{target_task}'; "
                            "register fine-tunes with validation scores first")
    related = set(graph.related_tasks(g, target_task)) if include_related else set()
    found = _score_models(g, target_task, split, metric, related, related_weight)
    if base is None:  # the pretrained root of the best-scoring fine-tune of the target (no merge, not quantized)
        direct = [(v, s) for v, t, _, s, why in found if t == target_task and s is not None
                  and not graph.out_edges(g, v, ["merged_from", "quantized_from"])]
        if not direct:
            raise JaxfoundError(f"no fine-tune of '{target_task}' has a '{metric}' score on '{split}'")
        base = graph.root_model(g, max(direct, key=lambda vs: vs[1])[0]["name"])
    base_v = graph.vertex(g, base, graph.MODELS)
    picked, excluded = _pick_candidates(g, found, base_v, target_task, method)
    if top_per_task is not None:
        picked, excluded = _top_per_task(picked, excluded, top_per_task, split)
    best_of = {}
    for _, t, _, s in picked:
        best_of[t] = max(best_of.get(t, -math.inf), s)
    quality = [s / best_of[t] if best_of[t] > 0 else 1.0 for _, t, _, s in picked]
    coefs = coefficients([r for _, _, r, _ in picked], quality, temperature, weighting)
    candidates = sorted((Candidate(v["name"], graph.attr(v, "path"), t, r, s, q, c)
                         for (v, t, r, s), q, c in zip(picked, quality, coefs)),
                        key=lambda c: (c.task != target_task, -c.coefficient, c.name))
    chosen, why = _choose_method(method, candidates, target_task, density)
    rationale = (f"{why}. Coefficients: c_i = r_i exp(q_i/T) / sum_j r_j exp(q_j/T), T={temperature}, "
                 f"q_i = score / best score of the same task, r = 1 (target) or {related_weight} (related task)"
                 if weighting == "score" else f"{why}. Coefficients: uniform (1/{len(candidates)})")
    return MergePlan(target_task, base, graph.attr(base_v, "path"), chosen, metric, split, tuple(candidates),
                     tuple(excluded), _method_params(chosen, density, lam, normalize, seed), rationale)


def _method_params(method: str, density: float, lam: float, normalize: bool | None, seed: int) -> dict:
    """The keyword arguments merge.merge takes for method (mergekit's defaults for normalize); a method added to
    fusion.merge gets the scalars search.METHOD_SCALARS lists for it."""
    if method in ("greedy_soup", "linear"):
        return {"normalize": True if normalize is None else normalize}
    scalars = search.METHOD_SCALARS.get(method, ())
    out = {k: v for k, v in (("lam", lam), ("density", density), ("t", 0.5)) if k in scalars}
    if method in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        out["normalize"] = (method == "ties") if normalize is None else normalize
    if method in merge.RANDOM_METHODS:
        out["seed"] = seed
    return out


# ---------------------------------------------------------------- fusing


def fuse_heads(plan: MergePlan, params: Mapping[str, dict], trunk) -> dict[str, dict]:
    """{task: trunk + that task's head}: each head the coefficient-weighted average of its task's candidates'."""
    out = {}
    for task in plan.tasks:
        group = [c for c in plan.candidates if c.task == task]
        heads = [merge.split_trunk(params[c.name])[2] for c in group]
        key = merge.split_trunk(params[group[0].name])[0]
        head = merge.linear(heads, [c.coefficient for c in group]) if len(group) > 1 else heads[0]
        out[task] = {key: trunk, **head}
    return out


def fuse(plan: MergePlan, params: Mapping[str, dict], base_params: dict | None = None) -> dict[str, dict]:
    """The plan's trunk merge (all methods but greedy_soup) -> {task: params}; pure, no evaluation."""
    if plan.method == "greedy_soup":
        raise JaxfoundError("greedy_soup needs an evaluation function: use execute_plan")
    names = [c.name for c in plan.candidates]
    trunks = [merge.split_trunk(params[n])[1] for n in names]
    kwargs = dict(plan.params)
    if "seed" in kwargs:
        kwargs["key"] = jax.random.key(kwargs.pop("seed"))
    base_trunk = None
    if plan.method not in ("linear", "slerp"):  # slerp interpolates the two candidates themselves
        if base_params is None:
            raise JaxfoundError(f"method {plan.method} needs the base model's params ('{plan.base}')")
        base_trunk = merge.split_trunk(base_params)[1]
    merge.check_compatible(trunks, names)
    trunk = merge.merge(plan.method, trunks, [c.coefficient for c in plan.candidates], base=base_trunk, **kwargs)
    return fuse_heads(plan, params, trunk)


# ---------------------------------------------------------------- searching


def search_space_of(plan: MergePlan, **kwargs) -> search.SearchSpace:
    """The plan's coefficients as a search space: its method's scalars and one weight per candidate (a greedy soup
    is searched as a weighted linear merge of its candidates). kwargs go to search.search_space."""
    method = "linear" if plan.method == "greedy_soup" else plan.method
    return search.search_space(method, [c.name for c in plan.candidates], **kwargs)


def with_coefficients(plan: MergePlan, space: search.SearchSpace, point: Mapping[str, float]) -> MergePlan:
    """The plan with a searched point: its method, candidate weights (as given) and scalars in params."""
    weights = space.weights(point)
    candidates = tuple(dataclasses.replace(c, coefficient=float(w)) for c, w in zip(plan.candidates, weights)) \
        if weights is not None else plan.candidates
    params = {**(plan.params if plan.method != "greedy_soup" else {"normalize": True}), **space.scalars(point)}
    return dataclasses.replace(plan, method=space.method, candidates=candidates, params=params,
                               rationale=plan.rationale + f". Coefficients searched on {plan.split}: {dict(point)}")


def plan_objective(plan: MergePlan, params: Mapping[str, dict], base_params: dict | None,
                   score_tasks: Callable[[dict[str, dict]], Mapping[str, float]], reference: Mapping[str, float],
                   space: search.SearchSpace) -> Callable[[dict[str, float]], tuple[float, dict]]:
    """objective(point) -> (worst task's retention, {'scores': {task: score}}) of the plan merged at point."""
    def objective(point):
        fused = fuse(with_coefficients(plan, space, point), params, base_params)
        scores = {t: float(v) for t, v in score_tasks(fused).items()}
        return gating.worst_retention(scores, reference), {"scores": scores}
    return objective


def search_plan(plan: MergePlan, params: Mapping[str, dict], base_params: dict | None,
                score_tasks: Callable[[dict[str, dict]], Mapping[str, float]], reference: Mapping[str, float],
                budget: int, *, seed: int = 0, cache: MutableMapping | None = None,
                space: search.SearchSpace | None = None, **search_kwargs) -> tuple[MergePlan, search.SearchResult]:
    """The plan's coefficients searched under a budget of evaluations; the objective is the worst task's retention
    min_t score_t / reference_t (reference: each task's single-task parent score on validation).

    score_tasks({task: params}) -> {task: validation score} (the driver may re-fit heads inside it).
    Returns (the plan with the best point, the search result with its log).
    """
    space = space or search_space_of(plan)
    objective = plan_objective(plan, params, base_params, score_tasks, reference, space)
    result = search.search(objective, space, budget, seed=seed, cache=cache, **search_kwargs)
    return with_coefficients(plan, space, result.best), result


# ---------------------------------------------------------------- executing


def _memo(evaluate: Callable[[dict], float]) -> Callable[[dict], float]:
    """evaluate, remembering scores by the params' identity (a parent scored twice costs once)."""
    seen: dict[int, tuple[dict, float]] = {}

    def scored(params):
        if id(params) not in seen:
            seen[id(params)] = (params, float(evaluate(params)))  # the params are kept so their id stays theirs
        return seen[id(params)][1]
    return scored


def _merge_target(plan: MergePlan, params: dict, load_params, evaluate) -> tuple[dict, dict, dict]:
    """(task params, sources {model: coefficient}, greedy-soup details) of the plan's merge."""
    if plan.method != "greedy_soup":
        base_params = load_params(plan.base, plan.base_path) if plan.method not in ("linear", "slerp") else None
        return fuse(plan, params, base_params), plan.coefficients, {}
    names = [c.name for c in plan.candidates]
    target, chosen, history = merge.greedy_soup([params[n] for n in names], evaluate)
    sources = {names[i]: 1.0 / len(chosen) for i in chosen}
    return ({plan.target_task: target}, sources,
            {"kept": list(sources), "left_out": [n for n in names if n not in sources], "history": history})


def execute_plan(plan: MergePlan, load_params: Callable[[str, str | None], dict], evaluate: Callable[[dict], float],
                 *, g: ig.Graph | None = None, name: str | None = None, path: str | None = None,
                 force: bool = False, evaluators: Mapping[str, Callable[[dict], float]] | None = None,
                 threshold: float = gating.DEFAULT_THRESHOLD,
                 refit: Callable[[dict[str, dict]], tuple[dict[str, dict], dict]] | None = None,
                 metrics: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """Merge, (re-fit heads,) score on validation, gate each task against each parent, record in g.

    load_params(model name, path) -> params; evaluate(params) -> the plan's metric on the target (higher is better);
    evaluators {task: evaluate} adds other tasks with candidates to the gate. refit({task: params}) ->
    ({task: params with re-fitted heads}, {task: {dataset?, hyper-parameters, ...}}) runs after the merge;
    metrics {task: metric name} names what the other tasks' evaluators return (default: task_metric).
    The gate: the merged model keeps >= threshold of every parent's validation score on a task (parents are the
    candidates of that task, scored by the same evaluator). With g, the merged model is registered only if the
    target task passes (or force): merged_from edges with method and coefficient, head_refit_on edges, and a
    score for the target and for each other gated task that passes. Returns (the target's params, report);
    report['task_params'] holds {task: params} for every task with candidates.
    """
    evaluators = {**(evaluators or {}), plan.target_task: evaluate}
    evaluators = {t: _memo(f) for t, f in evaluators.items() if t in plan.tasks}
    params = {c.name: load_params(c.name, c.path) for c in plan.candidates}
    task_params, sources, greedy = _merge_target(plan, params, load_params, evaluators[plan.target_task])
    refit_info = {}
    if refit is not None:
        task_params, refit_info = refit(task_params)
    scores = {t: evaluators[t](task_params[t]) for t in evaluators if t in task_params}
    parents = {t: {c.name: evaluators[t](params[c.name]) for c in plan.candidates if c.task == t} for t in scores}
    report_gate = gating.gate(scores, parents, threshold)
    name = name or f"{plan.target_task.replace('/', '-')}-{plan.method}"
    target_parents = parents[plan.target_task]
    best_parent = max(target_parents, key=target_parents.get)
    score, parent_score = scores[plan.target_task], target_parents[best_parent]
    passed = report_gate.passed(plan.target_task)
    report = {"name": name, "target_task": plan.target_task, "method": plan.method, "metric": plan.metric,
              "split": plan.split, "score": score, "scores": scores, "best_parent": best_parent,
              "best_parent_score": parent_score, "delta": score - parent_score,
              "worst_retention": min(c.retention for c in report_gate.claims), "gate": report_gate.to_dict(),
              "coefficients": sources, "refit": refit_info, "plan": plan.to_dict(), **greedy}
    failed = [c for c in report_gate.claims if c.task == plan.target_task and not c.passed]
    verdict = (f"fused '{name}' scores {score:.4f} {plan.metric} on {plan.split} of '{plan.target_task}', "
               + (f"keeping >= {threshold:g} of every parent's score" if passed else
                  "keeping " + ", ".join(f"{c.retention:.3f} of '{c.parent}' ({c.parent_score:.4f})" for c in failed)
                  + f", below the gate {threshold:g}"))
    if g is None:
        report |= {"registered": False, "registered_tasks": [],
                   "message": verdict + "; no graph given, nothing recorded"}
    elif not passed and not force:
        report |= {"registered": False, "registered_tasks": [],
                   "message": f"refused: {verdict}; pass force=True (--force) to register it"}
    else:
        _record(g, plan, name, path, sources, scores, report_gate, refit_info, force, metrics or {})
        claimed = [t for t in scores if report_gate.passed(t) or t == plan.target_task]
        report |= {"registered": True, "registered_tasks": claimed,
                   "message": f"registered: {verdict}" + ("" if passed else " (forced)")}
    report["task_params"] = task_params
    return task_params[plan.target_task], report


def _record(g: ig.Graph, plan: MergePlan, name: str, path: str | None, sources: Mapping[str, float],
            scores: Mapping[str, float], report_gate: gating.GateReport, refit_info: Mapping[str, dict],
            force: bool, metrics: Mapping[str, str]) -> None:
    """The merged model, its sources, its re-fitted heads and the scores it may claim (target: always here)."""
    graph.register_merge(g, name, path, sources, plan.method, base=plan.base, target_task=plan.target_task,
                         merge_params=dict(plan.params), gate_threshold=report_gate.threshold,
                         gate_forced=force and not report_gate.passed(plan.target_task))
    for task, info in refit_info.items():
        info = dict(info)
        dataset = info.pop("dataset", None) or next(iter(graph.task_datasets(g, task)), None)
        if dataset is None:
            raise JaxfoundError(f"head re-fit of '{task}': the task is defined on no dataset in the graph; "
                                "give the refit info a 'dataset'")
        graph.record_head_refit(g, name, dataset, task, **info)
    for task, value in scores.items():
        if task == plan.target_task or report_gate.passed(task):
            metric = plan.metric if task == plan.target_task else (
                metrics.get(task) or task_metric(g, task, plan.split) or plan.metric)
            graph.record_score(g, name, task, metric, value, plan.split)
