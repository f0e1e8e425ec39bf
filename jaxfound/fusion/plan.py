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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import igraph as ig
import jax

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import graph, merge

METHODS = ("auto", "greedy_soup", "average", "linear", "task_arithmetic", "ties", "dare", "dare_linear", "dare_ties")
ALIASES = {"average": "linear", "dare": "dare_ties"}
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
               density: float = 0.5, lam: float = 1.0, normalize: bool | None = None, seed: int = 0) -> MergePlan:
    """A merge plan for target_task from the graph g (see the module docstring for the rules and the formula)."""
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
    """The keyword arguments merge.merge takes for method (mergekit's defaults for normalize)."""
    if method in ("greedy_soup", "linear"):
        return {"normalize": True if normalize is None else normalize}
    out = {"lam": lam, "normalize": (method == "ties") if normalize is None else normalize}
    if method in ("ties", "dare_linear", "dare_ties"):
        out["density"] = density
    if method.startswith("dare"):
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
    if plan.method != "linear":
        if base_params is None:
            raise JaxfoundError(f"method {plan.method} needs the base model's params ('{plan.base}')")
        base_trunk = merge.split_trunk(base_params)[1]
    merge.check_compatible(trunks, names)
    trunk = merge.merge(plan.method, trunks, [c.coefficient for c in plan.candidates], base=base_trunk, **kwargs)
    return fuse_heads(plan, params, trunk)


# ---------------------------------------------------------------- executing


def execute_plan(plan: MergePlan, load_params: Callable[[str, str | None], dict], evaluate: Callable[[dict], float],
                 *, g: ig.Graph | None = None, name: str | None = None, path: str | None = None,
                 force: bool = False) -> tuple[dict, dict]:
    """Merge, score on the target's validation split, compare with the best parent, record in g.

    load_params(model name, path) -> params; evaluate(params) -> the plan's metric on the target (higher is
    better). With g, the fused model is registered (merged_from edges with method and coefficient, its score)
    only if it is not worse than its best parent, or force. Returns (the target's params, report);
    report['task_params'] holds {task: params} for every task with candidates.
    """
    params = {c.name: load_params(c.name, c.path) for c in plan.candidates}
    greedy = {}
    if plan.method == "greedy_soup":
        names = [c.name for c in plan.candidates]
        # greedy_soup scores every candidate itself, so the best parent is measured like the soup
        target, chosen, history = merge.greedy_soup([params[n] for n in names], evaluate)
        best_parent, parent_score, score = names[chosen[0]], history[0], history[-1]
        sources = {names[i]: 1.0 / len(chosen) for i in chosen}
        task_params = {plan.target_task: target}
        greedy = {"kept": list(sources), "left_out": [n for n in names if n not in sources], "history": history}
    else:
        base_params = load_params(plan.base, plan.base_path) if plan.method != "linear" else None
        task_params = fuse(plan, params, base_params)
        target = task_params[plan.target_task]
        score = float(evaluate(target))
        best = max((c for c in plan.candidates if c.task == plan.target_task), key=lambda c: c.score)
        best_parent, parent_score = best.name, float(evaluate(params[best.name]))
        sources = plan.coefficients
    name = name or f"{plan.target_task.replace('/', '-')}-{plan.method}"
    worse = score < parent_score
    report = {"name": name, "target_task": plan.target_task, "method": plan.method, "metric": plan.metric,
              "split": plan.split, "score": score, "best_parent": best_parent, "best_parent_score": parent_score,
              "delta": score - parent_score, "coefficients": sources, "plan": plan.to_dict(), **greedy}
    verdict = (f"fused '{name}' scores {score:.4f} {plan.metric} on {plan.split}, "
               f"{'below' if worse else 'not below'} its best parent '{best_parent}' ({parent_score:.4f})")
    if g is None:
        report |= {"registered": False, "message": verdict + "; no graph given, nothing recorded"}
    elif worse and not force:
        report |= {"registered": False, "message": f"refused: {verdict}; pass force=True (--force) to register it"}
    else:
        graph.register_merge(g, name, path, sources, plan.method, base=plan.base, target_task=plan.target_task,
                         merge_params=dict(plan.params))
        graph.record_score(g, name, plan.target_task, plan.metric, score, plan.split)
        report |= {"registered": True,
                   "message": f"registered: {verdict}" + (" (forced)" if worse else "")}
    report["task_params"] = task_params
    return target, report
