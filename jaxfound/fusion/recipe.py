"""mergekit-style merge recipes: a YAML mapping of models, a method, a base and parameters, validated with errors
that name the file and key, then applied to loaded params.

    recipe = parse_recipe(read_yaml(path), str(path))
    params = merge_recipe(recipe, [m.params for m in models], base.params)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import merge

RECIPE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
RECIPE_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "tokenizer_source")
RECIPE_PARAMETERS = ("weight", "density", "lambda", "normalize")


@dataclass(frozen=True)
class Recipe:
    """A mergekit-style recipe: models with weight / density, a method, a base, global parameters."""

    source: str
    method: str
    models: tuple[str, ...]
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    base: str | None
    lam: float = 1.0
    normalize: bool | None = None  # None: mergekit's default for the method


def _number(value, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JaxfoundError(f"{source}: {where} must be a number, got {value!r}")
    return float(value)


def _params_of(raw, where: str, source: str, allowed: tuple[str, ...]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise JaxfoundError(f"{source}: {where} must be a mapping ({', '.join(allowed)}), got {raw!r}")
    for k in raw:
        if k not in allowed:
            raise JaxfoundError(f"{source}: unknown key '{where}.{k}' (allowed: {', '.join(allowed)})")
    return dict(raw)


def parse_recipe(raw, source: str = "<recipe>") -> Recipe:
    """Validate a recipe read from YAML; every problem names source and the key. dtype and tokenizer_source are
    accepted and ignored (merges run in float32 and the tokenizer comes from the first model)."""
    if not isinstance(raw, Mapping):
        raise JaxfoundError(f"{source}: the top level must be a mapping with keys {', '.join(RECIPE_KEYS)}")
    for k in raw:
        if k not in RECIPE_KEYS:
            raise JaxfoundError(f"{source}: unknown key '{k}' (allowed: {', '.join(RECIPE_KEYS)})")
    method = raw.get("merge_method")
    if method not in RECIPE_METHODS:
        raise JaxfoundError(f"{source}: key 'merge_method' is {method!r}; allowed: {', '.join(RECIPE_METHODS)}")
    glob = _params_of(raw.get("parameters"), "parameters", source, RECIPE_PARAMETERS)
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise JaxfoundError(f"{source}: key 'models' must be a non-empty list of {{model: path, parameters: ...}}")
    paths, weights, densities = [], [], []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            raise JaxfoundError(f"{source}: models[{i}] needs 'model: <path>' (a jaxfound run dir or a "
                                f"transformers dir), got {item!r}")
        for k in item:
            if k not in ("model", "parameters"):
                raise JaxfoundError(f"{source}: unknown key 'models[{i}].{k}' (allowed: model, parameters)")
        own = _params_of(item.get("parameters"), f"models[{i}].parameters", source, ("weight", "density"))
        where = f"models[{i}].parameters"
        weight = _number(own.get("weight", glob.get("weight", 1.0)), f"{where}.weight", source)
        density = _number(own.get("density", glob.get("density", 1.0)), f"{where}.density", source)
        if not 0.0 < density <= 1.0:
            raise JaxfoundError(f"{source}: {where}.density is {density}; it must be in (0, 1]")
        paths.append(item["model"])
        weights.append(weight)
        densities.append(density)
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise JaxfoundError(f"{source}: key 'base_model' must be a path, got {base!r}")
    if base is None and method != "linear":
        raise JaxfoundError(f"{source}: merge_method {method} needs key 'base_model' (the model the task vectors "
                            "are taken from)")
    lam = _number(glob.get("lambda", 1.0), "parameters.lambda", source)
    normalize = glob.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise JaxfoundError(f"{source}: parameters.normalize must be true or false, got {normalize!r}")
    return Recipe(source, method, tuple(paths), tuple(weights), tuple(densities), base, lam, normalize)


def _same_structure(a: dict, b: dict) -> bool:
    try:
        merge.check_compatible([a, b])
        return True
    except JaxfoundError:
        return False


def merge_recipe(recipe: Recipe, params: list[dict], base_params: dict | None = None, seed: int = 0) -> dict:
    """The recipe applied to the models' params (in recipe order) -> one params dict.

    linear merges every tensor. The other methods merge the trunk against the base's trunk; the heads (absent from
    a bare pretrained base) are merged the same way when the base has identical heads, else averaged with the
    normalised weights. Models with heads of different shapes cannot be merged into one model.
    """
    names = list(recipe.models)
    merge.check_compatible(params, names)
    normalize = recipe.normalize if recipe.normalize is not None else recipe.method in ("linear", "ties")
    if recipe.method == "linear":
        return merge.linear(params, list(recipe.weights), normalize=normalize)
    kwargs = {"lam": recipe.lam, "normalize": normalize}
    if recipe.method != "task_arithmetic":
        kwargs["density"] = list(recipe.densities)
    if recipe.method.startswith("dare"):
        kwargs["key"] = jax.random.key(seed)
    key, _, base_heads = merge.split_trunk(base_params)
    trunks, heads = zip(*[merge.split_trunk(p)[1:] for p in params])
    trunk = merge.merge(recipe.method, list(trunks), list(recipe.weights), base=base_params[key], **kwargs)
    if base_heads and heads[0] and _same_structure(base_heads, heads[0]):
        head = merge.merge(recipe.method, list(heads), list(recipe.weights), base=base_heads, **kwargs)
    else:
        head = merge.linear(list(heads), list(recipe.weights)) if heads[0] else {}
    return {key: trunk, **head}
