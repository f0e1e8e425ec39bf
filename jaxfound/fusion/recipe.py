"""mergekit-style merge recipes: a YAML mapping of models, a method, a base and parameters, validated with errors
that name the file and key, then applied to loaded params.

    recipe = parse_recipe(read_yaml(path), str(path))
    params = merge_recipe(recipe, [m.params for m in models], base.params, names=transformers_names(model))

Parameters follow mergekit (config.py, parameter_resolver.py): a value is a number or bool, a gradient (a list of
numbers interpolated over the layers: layer i of L gets position i / (L - 1); tensors outside the layers get 0), or
a list of `{filter: S, value: V}` whose first entry with S in the tensor's transformers name (or no filter) applies.
A model's own parameters come before the recipe's `parameters`, then mergekit's default. With `names` (jaxfound path
-> transformers name) filters match mergekit's names ('self_attn', 'mlp', 'model.layers.3.'); without, they match
jaxfound paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax

from jaxfound.errors import JaxfoundError
from jaxfound.fusion import aligned, merge

RECIPE_METHODS = merge.METHODS
RECIPE_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "tokenizer_source", "out_dtype")
# mergekit's parameters per method: (shared ones, given under `parameters`; per-model ones, also under each model)
_GTA_SHARED = ("lambda", "normalize", "rescale", "int8_mask")
METHOD_PARAMETERS = {
    "linear": (("normalize",), ("weight",)),
    "slerp": (("t",), ()),
    "model_stock": (("filter_wise",), ()),
    **{m: (_GTA_SHARED, ("weight", "density")) for m in ("task_arithmetic", "ties", "dare_linear", "dare_ties")},
    **{m: (_GTA_SHARED, ("weight", "density", "gamma")) for m in ("breadcrumbs", "breadcrumbs_ties")},
    **{m: (_GTA_SHARED, ("weight", "density", "epsilon")) for m in ("della", "della_linear")},
}
RECIPE_PARAMETERS = tuple(dict.fromkeys(name for shared, own in METHOD_PARAMETERS.values() for name in shared + own))
BOOLEAN_PARAMETERS = ("normalize", "rescale", "int8_mask", "filter_wise")
DEFAULTS = {"weight": 1.0, "density": 1.0, "gamma": merge.GAMMA, "epsilon": merge.EPSILON, "lambda": 1.0}
_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


@dataclass(frozen=True)
class Recipe:
    """A mergekit-style recipe: models with their parameters, a method, a base, global parameters.

    weights / densities: each model's setting as written (a number, a gradient or filters; the default if absent).
    """

    source: str
    method: str
    models: tuple[str, ...]
    weights: tuple = ()
    densities: tuple = ()
    base: str | None = None
    lam: float | list | dict = 1.0  # lambda as written
    normalize: bool | None = None  # None: mergekit's default for the method
    parameters: Mapping = field(default_factory=dict)  # the recipe's `parameters`, validated
    model_parameters: tuple = ()  # each model's `parameters`, validated


# ---------------------------------------------------------------- validation


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_scalar(value, name: str, where: str, source: str):
    if name in BOOLEAN_PARAMETERS:
        if not isinstance(value, bool):
            raise JaxfoundError(f"{source}: {where} must be true or false, got {value!r}")
    elif not _is_number(value):
        raise JaxfoundError(f"{source}: {where} must be a number, got {value!r}")


def _check_setting(value, name: str, where: str, source: str, nested: bool = False) -> None:
    """A mergekit ParameterSetting: scalar, gradient (list of numbers) or filters ({filter, value} or a list)."""
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        return _check_scalar(value, name, where, source)
    if not value:
        raise JaxfoundError(f"{source}: {where} is an empty list; give a value, a gradient [v0, ..., vn] or filters")
    if all(not isinstance(v, (Mapping, list)) for v in value):
        if name in BOOLEAN_PARAMETERS:
            raise JaxfoundError(f"{source}: {where} must be true or false (one value for every tensor), got {value!r}")
        for i, v in enumerate(value):
            _check_scalar(v, name, f"{where}[{i}]", source)
        return None
    if nested:
        raise JaxfoundError(f"{source}: {where}: a filter's value must be a number or a gradient, got {value!r}")
    for i, cond in enumerate(value):
        if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise JaxfoundError(f"{source}: {where}[{i}] must be {{filter: <part of a tensor name>, value: ...}} "
                                f"(filter optional), got {cond!r}")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise JaxfoundError(f"{source}: {where}[{i}].filter must be a string, got {cond['filter']!r}")
        if name in BOOLEAN_PARAMETERS:
            raise JaxfoundError(f"{source}: {where} must be true or false (one value for every tensor), got filters")
        _check_setting(cond["value"], name, f"{where}[{i}].value", source, nested=True)
    return None


def _params_of(raw, where: str, source: str, allowed: tuple[str, ...]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise JaxfoundError(f"{source}: {where} must be a mapping ({', '.join(allowed)}), got {raw!r}")
    for k in raw:
        if k not in allowed:
            raise JaxfoundError(f"{source}: unknown key '{where}.{k}' (allowed: {', '.join(allowed) or 'none'})")
        _check_setting(raw[k], k, f"{where}.{k}", source)
    return dict(raw)


def _check_ranges(method: str, settings: list[dict], source: str) -> None:
    """density in (0, 1]; for della, density -/+ epsilon inside (0, 1): checked on every number a setting holds."""
    def numbers(value):
        if isinstance(value, Mapping):
            value = [value]
        if isinstance(value, list):
            for v in value:
                yield from numbers(v["value"] if isinstance(v, Mapping) else v)
        else:
            yield value

    for where, params in settings:
        for d in numbers(params.get("density", 1.0)):
            if not 0.0 < d <= 1.0:
                raise JaxfoundError(f"{source}: {where}.density is {d}; it must be in (0, 1]")
        for g in numbers(params.get("gamma", 0.0)):
            if not 0.0 <= g < 1.0:
                raise JaxfoundError(f"{source}: {where}.gamma is {g}; it must be in [0, 1)")
        for e in numbers(params.get("epsilon", 0.0)):
            if not 0.0 <= e < 1.0:
                raise JaxfoundError(f"{source}: {where}.epsilon is {e}; it must be in [0, 1)")


def parse_recipe(raw, source: str = "<recipe>", needs_base: bool = True) -> Recipe:
    """Validate a recipe read from YAML; every problem names source and the key. dtype, out_dtype and
    tokenizer_source are accepted and ignored (merges run in float32 and the tokenizer comes from the first model).
    needs_base=False: base_model may be left out whatever the method (a merge of LoRA adapters, which carry it)."""
    if not isinstance(raw, Mapping):
        raise JaxfoundError(f"{source}: the top level must be a mapping with keys {', '.join(RECIPE_KEYS)}")
    for k in raw:
        if k not in RECIPE_KEYS:
            raise JaxfoundError(f"{source}: unknown key '{k}' (allowed: {', '.join(RECIPE_KEYS)})")
    method = raw.get("merge_method")
    if method not in RECIPE_METHODS:
        raise JaxfoundError(f"{source}: key 'merge_method' is {method!r}; allowed: {', '.join(RECIPE_METHODS)}")
    shared, own = METHOD_PARAMETERS[method]
    glob = _params_of(raw.get("parameters"), "parameters", source, tuple(dict.fromkeys(shared + own)))
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise JaxfoundError(f"{source}: key 'models' must be a non-empty list of {{model: path, parameters: ...}}")
    paths, per_model = [], []
    for i, item in enumerate(models):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            raise JaxfoundError(f"{source}: models[{i}] needs 'model: <path>' (a jaxfound run dir or a "
                                f"transformers dir), got {item!r}")
        for k in item:
            if k not in ("model", "parameters"):
                raise JaxfoundError(f"{source}: unknown key 'models[{i}].{k}' (allowed: model, parameters)")
        paths.append(item["model"])
        per_model.append(_params_of(item.get("parameters"), f"models[{i}].parameters", source, own))
    _check_ranges(method, [("parameters", glob)] + [(f"models[{i}].parameters", p) for i, p in enumerate(per_model)],
                  source)
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise JaxfoundError(f"{source}: key 'base_model' must be a path, got {base!r}")
    if base is None and method != "linear" and needs_base:
        raise JaxfoundError(f"{source}: merge_method {method} needs key 'base_model' (the model the task vectors "
                            "are taken from)")
    others = [p for p in paths if p != base]
    if method == "slerp":
        if len(others) != 1:
            raise JaxfoundError(f"{source}: merge_method slerp interpolates base_model and one other model; key "
                                f"'models' names {len(others)} models besides the base")
        if "t" not in glob:
            raise JaxfoundError(f"{source}: merge_method slerp needs key 'parameters.t' (0: base_model, 1: the other "
                                "model; a number, a gradient over the layers or filters)")
    if method == "model_stock" and len(others) < 2:
        raise JaxfoundError(f"{source}: merge_method model_stock needs at least 2 models besides base_model in key "
                            f"'models', got {len(others)}")
    return Recipe(source, method, tuple(paths),
                  weights=tuple(p.get("weight", glob.get("weight", 1.0)) for p in per_model),
                  densities=tuple(p.get("density", glob.get("density", 1.0)) for p in per_model),
                  base=base, lam=glob.get("lambda", 1.0), normalize=glob.get("normalize"),
                  parameters=glob, model_parameters=tuple(per_model))


# ---------------------------------------------------------------- resolution per tensor


def evaluate_setting(setting, tensor_name: str, t: float):
    """mergekit's evaluate_setting: a scalar as is; a gradient interpolated at t in [0, 1]; the first filter whose
    string is in tensor_name (or that has none); None when no filter matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(v, Mapping) for v in setting):
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def layer_position(path: str, num_layers: int) -> float:
    """mergekit's t for a tensor: i / (L - 1) in layer i of L (1 when L = 1), 0 outside the layers."""
    found = _LAYER.search(path)
    if not found:
        return 0.0
    return int(found.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def count_layers(params: Mapping) -> int:
    return len({m.group(1) for path in aligned.flat_paths(params) if (m := _LAYER.search(path))})


def resolver(recipe: Recipe, name_of: Callable[[str], str], num_layers: int):
    """value(parameter, path, model index or None) by mergekit's precedence: the model's own, the recipe's, default."""
    def value(parameter: str, path: str, model: int | None = None):
        t = layer_position(path, num_layers)
        scopes = ([recipe.model_parameters[model]] if model is not None else []) + [recipe.parameters]
        for scope in scopes:
            if parameter in scope:
                got = evaluate_setting(scope[parameter], name_of(path), t)
                if got is not None:
                    return got
        if parameter in DEFAULTS:
            return DEFAULTS[parameter]
        raise JaxfoundError(f"{recipe.source}: no value of '{parameter}' applies to tensor '{name_of(path)}' (its "
                            "filters match none); add an entry without filter, e.g. {value: 0.5}")
    return value


def _method_kwargs(recipe: Recipe, value, models: list[int], seed: int) -> tuple[object, dict]:
    """(weights, kwargs) for merge.merge; coefficients are functions of the parameter path."""
    method = recipe.method
    if method == "slerp":
        return None, {"t": lambda path: value("t", path)}
    if method == "model_stock":
        return None, {"filter_wise": bool(recipe.parameters.get("filter_wise", False))}
    weights = (lambda path: [value("weight", path, i) for i in models])
    if method == "linear":
        normalize = recipe.parameters.get("normalize", True)
        return weights, {"normalize": normalize}
    kwargs = {"lam": lambda path: value("lambda", path)}
    for flag in ("normalize", "rescale"):
        if flag in recipe.parameters:
            kwargs[flag] = recipe.parameters[flag]
    for name in ("density", "gamma", "epsilon"):
        if name in METHOD_PARAMETERS[method][1]:
            kwargs[name] = (lambda n: lambda path: [value(n, path, i) for i in models])(name)
    if method in merge.RANDOM_METHODS:
        kwargs["key"] = jax.random.key(seed)
    return weights, kwargs


def _same_structure(a: dict, b: dict) -> bool:
    try:
        merge.check_compatible([a, b])
        return True
    except JaxfoundError:
        return False


def merge_recipe(recipe: Recipe, params: list[dict], base_params: dict | None = None, seed: int = 0,
                 names: Mapping[str, str] | None = None) -> dict:
    """The recipe applied to the models' params (in recipe order) -> one params dict.

    names: jaxfound parameter path -> transformers tensor name, which filters match (default: the path itself).
    The base model, when also listed under models, is the base only (as in mergekit). linear merges every tensor.
    The other methods merge the trunk against the base's trunk; the heads (absent from a bare pretrained base) are
    merged the same way when the base has identical heads, else averaged with the normalised weights (slerp: the
    other model's head). Models with heads of different shapes cannot be merged into one model.
    """
    names = dict(names or {})
    merge.check_compatible(params, list(recipe.models))
    value = resolver(recipe, lambda path: names.get(path, path), count_layers(params[0]))
    if recipe.method == "linear":
        weights, kwargs = _method_kwargs(recipe, value, list(range(len(params))), seed)
        return merge.linear(params, weights, **kwargs)
    chosen = [i for i, p in enumerate(recipe.models) if p != recipe.base]
    weights, kwargs = _method_kwargs(recipe, value, chosen, seed)
    key, _, base_heads = merge.split_trunk(base_params)
    trunks, heads = zip(*[merge.split_trunk(params[i])[1:] for i in chosen])
    trunk = merge.merge(recipe.method, [{key: t} for t in trunks], weights, base={key: base_params[key]}, **kwargs)
    if base_heads and heads[0] and _same_structure(base_heads, heads[0]):
        head = merge.merge(recipe.method, list(heads), weights, base=base_heads, **kwargs)
    elif heads[0]:
        head = merge.linear(list(heads), weights)
    else:
        head = {}
    return {**trunk, **head}
