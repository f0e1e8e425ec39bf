"""Merge-coefficient search on a validation score under a budget of evaluations: a grid, then an evolution strategy.

    space = search_space("ties", ["ner", "pos", "chunk"])
    result = search(objective, space, budget=12, seed=0)   # objective(coefficients) -> score or (score, info)
    result.best, result.score, result.log                  # the log: every evaluation, its coefficients and score

The coefficients are a flat dict: the method's scalar parameters ('lam', 'density', 't', ...) and one 'weight:<model>'
per model for methods that weigh models. The grid (at most `grid_share` of the budget) is staged: each scalar's grid
values with equal weights first, then each model in turn weighted `upweight` at the best scalars so far (as mergekit
users hand-tune a recipe; `grid_points` is the full product, for comparison); the rest of the budget goes to a
seeded (mu/mu_w + lambda)-ES in the unit cube of the search box (elitist: the best points so far stay parents; the
step size grows after a generation that improves on the best, shrinks otherwise), the small-budget cousin of the
CMA-ES mergekit-evolve runs. Every evaluation is cached by a hash of (models, method, coefficients rounded to
`decimals`), so a point visited twice costs one objective call; the budget counts objective calls only.
Pure: no files; the driver writes the log.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import merge

# method parameter -> (low, high); its grid depends on the method (below)
BOUNDS = {"lam": (0.1, 2.0), "density": (0.1, 1.0), "t": (0.0, 1.0), "weight": (0.25, 2.0)}
# scalar parameters each method takes, in mergekit's terms (merge.merge keyword names)
METHOD_SCALARS = {"linear": (), "task_arithmetic": ("lam",), "ties": ("lam", "density"),
                  "dare_linear": ("lam", "density"), "dare_ties": ("lam", "density"), "della": ("lam", "density"),
                  "della_linear": ("lam", "density"), "breadcrumbs": ("lam", "density"),
                  "breadcrumbs_ties": ("lam", "density"), "slerp": ("t",), "model_stock": ()}
UNWEIGHTED = ("slerp", "model_stock")  # methods without per-model weights


@dataclass(frozen=True)
class Dim:
    """One searched coefficient: its name, box and the values the grid visits."""

    name: str  # 'lam', 'density', 't' or 'weight:<model>'
    low: float
    high: float
    grid: tuple[float, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """What a search varies for one merge: the method, the models (in merge order) and the dimensions."""

    method: str
    models: tuple[str, ...]
    dims: tuple[Dim, ...]
    upweight: float = 1.5  # the grid's weighting patterns: equal, then each model alone at this weight

    @property
    def weighted(self) -> bool:
        return any(d.name.startswith("weight:") for d in self.dims)

    def weights(self, coefficients: Mapping[str, float]) -> list[float] | None:
        """The per-model weights of a point (None for a method without weights)."""
        return [coefficients[f"weight:{m}"] for m in self.models] if self.weighted else None

    def scalars(self, coefficients: Mapping[str, float]) -> dict[str, float]:
        """The method's keyword arguments of a point ('lam', 'density', ...)."""
        return {k: v for k, v in coefficients.items() if not k.startswith("weight:")}


def default_grid(method: str, name: str, n_models: int) -> tuple[float, ...]:
    """The grid of one scalar: lambda around a summed task-vector scale of 1.5 for task arithmetic (3 models:
    0.4, 0.5, 0.6), around 1 for sign-elected / sparsified merges; density 0.5; SLERP t 0.3, 0.5, 0.7."""
    if name == "lam":
        return tuple(round(x / n_models, 4) for x in (1.2, 1.5, 1.8)) if method == "task_arithmetic" \
            else (0.7, 1.0, 1.3)
    return {"density": (0.5,), "t": (0.3, 0.5, 0.7)}.get(name, ((BOUNDS[name][0] + BOUNDS[name][1]) / 2,))


def search_space(method: str, models: Sequence[str], bounds: Mapping[str, tuple[float, float]] | None = None,
                 grid: Mapping[str, Sequence[float]] | None = None, upweight: float = 1.5) -> SearchSpace:
    """The coefficients of `method` over `models`: its scalars (METHOD_SCALARS) and one weight per model."""
    if method not in merge.METHODS:
        raise JaxfoundError(f"search: merge method {method!r} is unknown; valid methods: {', '.join(merge.METHODS)}")
    if len(models) < 2 or len(set(models)) != len(models):
        raise JaxfoundError(f"search: give two or more distinct models, got {list(models)}")
    box, grid = {**BOUNDS, **(bounds or {})}, dict(grid or {})
    dims = []
    for name in METHOD_SCALARS.get(method, ()):
        low, high = box[name]
        values = tuple(grid.get(name, default_grid(method, name, len(models))))
        if not values or any(not low <= v <= high for v in values):
            raise JaxfoundError(f"search: grid['{name}'] = {list(values)} must be non-empty and inside [{low}, {high}]")
        dims.append(Dim(name, low, high, values))
    if method not in UNWEIGHTED:
        low, high = box["weight"]
        dims += [Dim(f"weight:{m}", low, high, (1.0,)) for m in models]
    return SearchSpace(method, tuple(models), tuple(dims), upweight)


def evaluation_key(models: Sequence[str], method: str, coefficients: Mapping[str, float], decimals: int = 4) -> str:
    """sha256 of (models, method, coefficients rounded to decimals): equal keys are one evaluation."""
    payload = {"models": list(models), "method": method,
               "coefficients": {k: round(float(v), decimals) for k, v in sorted(coefficients.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _scalar_combos(space: SearchSpace) -> list[dict[str, float]]:
    scalar_dims = [d for d in space.dims if not d.name.startswith("weight:")]
    return [{d.name: float(v) for d, v in zip(scalar_dims, combo)}
            for combo in itertools.product(*[d.grid for d in scalar_dims])]


def _weight_patterns(space: SearchSpace) -> list[dict[str, float]]:
    """Equal weights, then each model in turn at space.upweight (none for an unweighted method)."""
    if not space.weighted:
        return [{}]
    n = len(space.models)
    return [{f"weight:{m}": space.upweight if i == j else 1.0 for i, m in enumerate(space.models)}
            for j in range(-1, n)]


def grid_points(space: SearchSpace) -> list[dict[str, float]]:
    """The full grid: every scalar grid combination with equal weights, then with each model in turn upweighted."""
    return [{**scalars, **weights} for weights in _weight_patterns(space) for scalars in _scalar_combos(space)]


def _to_unit(space: SearchSpace, point: Mapping[str, float]) -> np.ndarray:
    return np.array([(point[d.name] - d.low) / (d.high - d.low) if d.high > d.low else 0.5 for d in space.dims])


def _from_unit(space: SearchSpace, u: np.ndarray, decimals: int) -> dict[str, float]:
    u = np.clip(u, 0.0, 1.0)
    return {d.name: round(float(d.low + x * (d.high - d.low)), decimals) for d, x in zip(space.dims, u)}


@dataclass
class SearchResult:
    """The best point, its score, how many objective calls were made, and every evaluation in order."""

    best: dict[str, float]
    score: float
    evaluations: int
    log: list[dict] = field(default_factory=list)  # {index, phase, coefficients, score, cached, key, info}


class _Evaluator:
    """The objective behind the cache and the budget; records every request in the log."""

    def __init__(self, objective, space, budget, cache, decimals):
        self.objective, self.space, self.budget, self.decimals = objective, space, budget, decimals
        self.cache = {} if cache is None else cache
        self.calls, self.log, self.best = 0, [], (None, -math.inf)

    @property
    def exhausted(self) -> bool:
        return self.calls >= self.budget

    def __call__(self, point: dict[str, float], phase: str) -> float | None:
        key = evaluation_key(self.space.models, self.space.method, point, self.decimals)
        cached = key in self.cache
        if not cached:
            if self.exhausted:
                return None
            out = self.objective(dict(point))
            score, info = (out if isinstance(out, tuple) else (out, {}))
            self.cache[key] = (float(score), dict(info))
            self.calls += 1
        score, info = self.cache[key]
        self.log.append({"index": len(self.log), "phase": phase, "coefficients": dict(point), "score": score,
                         "cached": cached, "key": key[:16], "info": info})
        if score > self.best[1]:
            self.best = (dict(point), score)
        return score


def _es(evaluate: _Evaluator, space: SearchSpace, seed: int, sigma: float, population: int,
        start: list[tuple[np.ndarray, float]], decimals: int, max_stall: int = 20) -> None:
    """An elitist (mu/mu_w + lambda)-ES in the unit cube until the budget is spent (or nothing new is proposed)."""
    rng = np.random.default_rng(seed)
    d = len(space.dims)
    lam_ = population
    mu = max(1, lam_ // 2)
    w = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w /= w.sum()
    parents = sorted(start, key=lambda us: -us[1])[:mu]
    stall = 0
    while not evaluate.exhausted and stall < max_stall:
        mean = sum(wi * u for wi, (u, _) in zip(w[:len(parents)] / w[:len(parents)].sum(), parents))
        best_before, new = parents[0][1], 0
        offspring = []
        for _ in range(lam_):
            point = _from_unit(space, mean + sigma * rng.standard_normal(d), decimals)
            calls = evaluate.calls
            score = evaluate(point, "es")
            if score is None:
                break
            new += evaluate.calls - calls
            offspring.append((_to_unit(space, point), score))
        parents = sorted(parents + offspring, key=lambda us: -us[1])[:mu]
        sigma = sigma * 1.3 if parents[0][1] > best_before else sigma * 0.7
        stall = 0 if new else stall + 1


def evaluate_grid(objective: Callable[[dict[str, float]], float | tuple[float, dict]], space: SearchSpace, *,
                  cache: MutableMapping | None = None, decimals: int = 3) -> SearchResult:
    """Every point of the full grid (grid_points), the baseline a search is measured against."""
    points = grid_points(space)
    evaluate = _Evaluator(objective, space, len(points), cache, decimals)
    for point in points:
        evaluate(point, "grid")
    best, score = evaluate.best
    return SearchResult(best, score, evaluate.calls, evaluate.log)


def search(objective: Callable[[dict[str, float]], float | tuple[float, dict]], space: SearchSpace, budget: int, *,
           seed: int = 0, grid_share: float = 0.5, sigma: float = 0.2, population: int | None = None,
           cache: MutableMapping | None = None, decimals: int = 3) -> SearchResult:
    """Maximise objective(coefficients) with at most `budget` objective calls: grid points first (at most
    grid_share of the budget, or all of it when nothing is left to vary), then the ES from the best of them.

    cache: {evaluation_key: (score, info)} shared across searches (a repeat costs nothing).
    """
    if not isinstance(budget, int) or budget < 1:
        raise JaxfoundError(f"search: budget={budget!r}; it must be an integer >= 1 (objective calls)")
    if not 0.0 < grid_share <= 1.0:
        raise JaxfoundError(f"search: grid_share={grid_share}; it must be in (0, 1]")
    evaluate = _Evaluator(objective, space, budget, cache, decimals)
    n_grid = max(1, int(budget * grid_share)) if space.dims else 1
    # the grid, staged: the scalars at equal weights, then the weight patterns at the best scalars so far
    start, combos, patterns = [], _scalar_combos(space), _weight_patterns(space)
    for point in [{**c, **patterns[0]} for c in combos][:n_grid]:
        start.append((_to_unit(space, point), evaluate(point, "grid")))
    best_scalars = space.scalars(evaluate.best[0])
    for weights in patterns[1:][:max(0, n_grid - len(start))]:
        point = {**best_scalars, **weights}
        start.append((_to_unit(space, point), evaluate(point, "grid")))
    start = [(u, s) for u, s in start if s is not None]
    if space.dims and start:  # a small budget gets a small population, so that at least two generations run
        population = population or max(2, min(4 + int(3 * math.log(len(space.dims))), (budget - len(start)) // 2))
        _es(evaluate, space, seed, sigma, population, start, decimals)
    best, score = evaluate.best
    return SearchResult(best, score, evaluate.calls, evaluate.log)
