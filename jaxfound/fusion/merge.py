"""Model merging over parameter pytrees: linear soups, task arithmetic, TIES, DARE, greedy soups.

Every merge is a pure function of plain nested dicts of arrays: it runs eagerly or under `jax.jit`
on sharded arrays without moving them to the host. Hyper-parameters that shape the computation
(`density`, `normalize`, `combine`) are Python values; bind them with `functools.partial` before jitting.
The semantics follow mergekit's `linear`, `task_arithmetic`, `ties`, `dare_linear` and `dare_ties`
(generalized_task_arithmetic.py, sparsify.py): per-tensor sparsification, weights applied to the task
vectors before sign election, and `normalize` dividing by the summed weights of the entries kept.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.errors import JaxfoundError
from jaxfound.models import TRUNK_KEYS

Params = Mapping[str, Any]
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


# ---------------------------------------------------------------- compatibility


def _path_str(path) -> str:
    """'bert/layer_0/attn/kernel' for a pytree key path."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_spec(x) -> tuple[tuple[int, ...], Any]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), jnp.dtype(x.dtype)
    return tuple(np.shape(x)), np.asarray(x).dtype


def _flat(tree) -> dict[str, Any]:
    return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_compatible(trees: Sequence[Params], names: Sequence[str] | None = None) -> None:
    """Raise JaxfoundError at the first parameter whose key, shape or dtype differs from the first model's."""
    if not trees:
        raise JaxfoundError("nothing to merge: the list of models is empty")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(trees))]
    if len(names) != len(trees):
        raise JaxfoundError(f"names: got {len(names)} names for {len(trees)} models; give one name per model")
    ref = _flat(trees[0])
    ref_trunk = [k for k in TRUNK_KEYS if k in trees[0]]
    for name, tree in zip(names[1:], trees[1:]):
        trunk = [k for k in TRUNK_KEYS if k in tree]
        if trunk and ref_trunk and trunk != ref_trunk:
            raise JaxfoundError(
                f"{name} is a '{trunk[0]}' model but {names[0]} is a '{ref_trunk[0]}' model: different "
                "architectures never merge (their parameters mean different things even where shapes agree, e.g. "
                "RoBERTa's positions start after the pad id and it has one token type); merge fine-tunes of one base"
            )
        leaves = _flat(tree)
        for path, leaf in ref.items():
            if path not in leaves:
                raise JaxfoundError(
                    f"{name} has no parameter '{path}', which {names[0]} has; models to merge need the same keys"
                )
            (ref_shape, ref_dtype), (shape, dtype) = _leaf_spec(leaf), _leaf_spec(leaves[path])
            if shape != ref_shape:
                raise JaxfoundError(
                    f"parameter '{path}' of {name} has shape {shape}, but {names[0]} has {ref_shape}; "
                    "models to merge need one architecture"
                )
            if dtype != ref_dtype:
                raise JaxfoundError(
                    f"parameter '{path}' of {name} has dtype {dtype}, but {names[0]} has {ref_dtype}; "
                    "cast the models to one dtype before merging"
                )
        extra = [path for path in leaves if path not in ref]
        if extra:
            raise JaxfoundError(
                f"{name} has parameter '{extra[0]}', which {names[0]} lacks; models to merge need the same keys"
            )


# ---------------------------------------------------------------- argument checks


def _weights_N(weights, n: int):
    """Weights as a float32 vector of length n (None: all ones)."""
    if weights is None:
        return jnp.ones((n,), jnp.float32)
    got = np.shape(weights)[0] if np.ndim(weights) else None
    if got != n:
        raise JaxfoundError(f"weights: got {got if got is not None else 'a scalar'} for {n} models; give one per model")
    return jnp.asarray(weights, jnp.float32)


def _densities(density, n: int) -> list[float]:
    """One Python float in (0, 1] per model; density is static because it fixes top-k sizes."""
    values = list(density) if isinstance(density, (list, tuple)) else [density] * n
    if len(values) != n:
        raise JaxfoundError(f"density: got {len(values)} values for {n} models; give one or one per model")
    for d in values:
        if not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise JaxfoundError(f"density must be a Python number in (0, 1], got {d!r}")
    return [float(d) for d in values]


def _compute_dtype(dtype):
    # bf16 / f16 checkpoints are merged in f32 and cast back, like mergekit's `.to(base.dtype)`
    return jnp.promote_types(dtype, jnp.float32)


def _broadcast(w_N, x_NxS):
    return w_N.reshape((-1,) + (1,) * (x_NxS.ndim - 1)).astype(x_NxS.dtype)


def _map_leaves(fn: Callable, base: Params | None, trees: Sequence[Params]):
    """fn(leaf_index, path, base_leaf, leaves) over aligned leaves (base_leaf None without a base)."""
    names = [f"model {i}" for i in range(len(trees))]
    check_compatible(list(trees), names) if base is None else check_compatible([base, *trees], ["base", *names])
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    base_leaves = jax.tree_util.tree_leaves(base) if base is not None else [None] * len(paths_leaves)
    flats = [jax.tree_util.tree_leaves(t) for t in trees]
    out = [fn(i, _path_str(path), base_leaves[i], [f[i] for f in flats]) for i, (path, _) in enumerate(paths_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _deltas(base_leaf, leaves):
    """Task vectors of one tensor stacked on a leading model axis, in the compute dtype."""
    dtype = _compute_dtype(base_leaf.dtype)
    return jnp.stack([x.astype(dtype) for x in leaves]) - base_leaf.astype(dtype)


# ---------------------------------------------------------------- linear and task arithmetic


def linear(trees: Sequence[Params], weights=None, normalize: bool = True) -> Params:
    """Weighted average of models (a model soup): sum_i w_i theta_i, divided by sum_i w_i when normalize."""
    w_N = _weights_N(weights, len(trees))

    def leaf(_i, _path, _base, leaves):
        x_NxS = jnp.stack([x.astype(_compute_dtype(x.dtype)) for x in leaves])
        w = _broadcast(w_N, x_NxS)
        mixed = (w * x_NxS).sum(0)
        if normalize:
            total = w_N.sum()
            mixed = mixed / jnp.where(jnp.abs(total) < 1e-8, 1.0, total)
        return mixed.astype(leaves[0].dtype)

    return _map_leaves(leaf, None, trees)


def task_vectors(base: Params, trees: Sequence[Params]) -> list[Params]:
    """tau_i = theta_i - theta_base for each model, in f32 (or wider) so small deltas survive."""
    check_compatible([base, *trees], ["base"] + [f"model {i}" for i in range(len(trees))])
    return [jax.tree.map(lambda x, b: x.astype(_compute_dtype(b.dtype)) - b.astype(_compute_dtype(b.dtype)), t, base)
            for t in trees]


def _combine(deltas_NxS, w_N, consensus: bool, normalize: bool):
    """mergekit's mixing step: weight, optionally elect a sign per entry, sum, optionally normalise."""
    w = _broadcast(w_N, deltas_NxS)
    weighted = deltas_NxS * w
    if consensus:
        # TIES sign election by summed (weighted) mass; a zero sum elects +
        majority = jnp.where(weighted.sum(0) >= 0, 1.0, -1.0).astype(weighted.dtype)
        agree = jnp.sign(weighted) == majority  # trimmed (zero) entries never agree, so they leave the mean
        mixed = jnp.where(agree, weighted, 0).sum(0)
        divisor = jnp.where(agree, w, 0).sum(0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(0)
        divisor = w_N.sum().astype(weighted.dtype)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    return mixed / divisor if normalize else mixed


def task_arithmetic(base: Params, trees: Sequence[Params], weights=None, lam=1.0, normalize: bool = False) -> Params:
    """theta_base + lam * sum_i w_i tau_i (divided by sum_i w_i when normalize)."""
    w_N = _weights_N(weights, len(trees))

    def leaf(_i, _path, b, leaves):
        mixed = _combine(_deltas(b, leaves), w_N, consensus=False, normalize=normalize)
        return (b.astype(mixed.dtype) + lam * mixed).astype(b.dtype)

    return _map_leaves(leaf, base, trees)


# ---------------------------------------------------------------- TIES and DARE


def trim_mask(tau, density: float, path: str = "tensor"):
    """Boolean mask of the int(density * size) largest-magnitude entries of one tensor (mergekit `magnitude`)."""
    if density >= 1.0:
        return jnp.ones(tau.shape, bool)
    k = int(density * tau.size)
    if k == 0:
        raise JaxfoundError(
            f"density={density} keeps no entry of parameter '{path}' ({tau.size} entries); "
            f"use density >= {1.0 / tau.size:.3g}"
        )
    _, idx = jax.lax.top_k(jnp.abs(tau).reshape(-1), k)
    return jnp.zeros((tau.size,), bool).at[idx].set(True).reshape(tau.shape)


def ties(base: Params, trees: Sequence[Params], weights=None, density=1.0, lam=1.0, normalize: bool = True) -> Params:
    """TIES-merging: trim each task vector per tensor to its top density fraction, elect signs, disjoint mean.

    density: one float or one per model. With normalize (mergekit's default for `ties`) each entry is
    divided by the summed weights of the models whose trimmed, weighted delta agrees with the elected sign.
    """
    w_N = _weights_N(weights, len(trees))
    densities = _densities(density, len(trees))

    def leaf(_i, path, b, leaves):
        deltas = _deltas(b, leaves)
        trimmed = jnp.stack([jnp.where(trim_mask(t, d, path), t, 0) for t, d in zip(deltas, densities)])
        mixed = _combine(trimmed, w_N, consensus=True, normalize=normalize)
        return (b.astype(mixed.dtype) + lam * mixed).astype(b.dtype)

    return _map_leaves(leaf, base, trees)


def drop_and_rescale(tau, density: float, key):
    """DARE: keep each entry with probability density and divide the survivors by density."""
    if density >= 1.0:
        return tau
    keep = jax.random.bernoulli(key, density, tau.shape)
    return jnp.where(keep, tau / density, 0).astype(tau.dtype)


def dare(base: Params, trees: Sequence[Params], weights=None, density=1.0, key=None, combine: str = "linear",
         lam=1.0, normalize: bool = False) -> Params:
    """DARE (drop rate 1 - density, 1/density rescale) then a task-arithmetic ('linear') or TIES ('ties') combine.

    The mask of model i on leaf j uses fold_in(fold_in(key, j), i), so it is fixed by (key, tree layout).
    normalize defaults to False as in mergekit's `dare_linear` and `dare_ties`.
    """
    if combine not in ("linear", "ties"):
        raise JaxfoundError(f"combine: got {combine!r}; valid values are 'linear' and 'ties'")
    if key is None:
        raise JaxfoundError("dare needs key=jax.random.key(seed): the dropped entries are random")
    w_N = _weights_N(weights, len(trees))
    densities = _densities(density, len(trees))

    def leaf(j, _path, b, leaves):
        leaf_key = jax.random.fold_in(key, j)
        deltas = _deltas(b, leaves)
        dropped = jnp.stack([drop_and_rescale(t, d, jax.random.fold_in(leaf_key, i))
                             for i, (t, d) in enumerate(zip(deltas, densities))])
        mixed = _combine(dropped, w_N, consensus=combine == "ties", normalize=normalize)
        return (b.astype(mixed.dtype) + lam * mixed).astype(b.dtype)

    return _map_leaves(leaf, base, trees)


def merge(method: str, trees: Sequence[Params], weights=None, *, base: Params | None = None, **kwargs) -> Params:
    """Dispatch by mergekit method name: linear, task_arithmetic, ties, dare_linear, dare_ties."""
    if method not in METHODS:
        raise JaxfoundError(f"merge method {method!r} is unknown; valid methods: {', '.join(METHODS)}")
    if method == "linear":
        return linear(trees, weights, **kwargs)
    if base is None:
        raise JaxfoundError(f"merge method {method!r} needs base= (the model the task vectors are taken from)")
    if method == "task_arithmetic":
        return task_arithmetic(base, trees, weights, **kwargs)
    if method == "ties":
        return ties(base, trees, weights, **kwargs)
    return dare(base, trees, weights, combine=method.removeprefix("dare_"), **kwargs)


# ---------------------------------------------------------------- soups


def greedy_soup(candidates: Sequence[Params], score_fn: Callable[[Params], float]):
    """Greedy soup (Wortsman et al. 2022): visit candidates best-first, keep one if the uniform average still scores.

    score_fn maps params to a held-out score (higher is better); a candidate joins when the soup's score
    does not drop (>=). Returns (params, chosen candidate indices, soup score after each visit).
    """
    if not candidates:
        raise JaxfoundError("greedy_soup: the list of candidates is empty")
    check_compatible(candidates)
    own = [float(score_fn(c)) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -own[i])
    chosen, soup, best = [order[0]], candidates[order[0]], own[order[0]]
    history = [best]
    for i in order[1:]:
        trial = linear([candidates[j] for j in chosen + [i]])
        score = float(score_fn(trial))
        if score >= best:
            chosen, soup, best = chosen + [i], trial, score
        history.append(best)
    return soup, chosen, history


# ---------------------------------------------------------------- trunk and heads


def split_trunk(params: Params) -> tuple[str, Params, dict]:
    """(trunk key, trunk subtree, task heads): the trunk is params['bert'] or params['gpt']."""
    found = [k for k in TRUNK_KEYS if k in params]
    if len(found) != 1:
        raise JaxfoundError(
            f"params must hold exactly one trunk key out of {TRUNK_KEYS}; found {found or 'none'} "
            f"among top-level keys {sorted(params)}"
        )
    key = found[0]
    return key, params[key], {k: v for k, v in params.items() if k != key}


def merge_trunk(method: str, models: Sequence[Params], weights=None, *, base: Params | None = None,
                names: Sequence[str] | None = None, **kwargs) -> list[dict]:
    """Merge only the trunks of task models; return one params dict per model: the shared trunk with its own heads.

    Heads (classifier, pooler, ...) differ in shape between tasks, so they are never averaged.
    """
    if not models:
        raise JaxfoundError("merge_trunk: the list of models is empty")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    split = [split_trunk(m) for m in models]
    key = split[0][0]
    for name, (k, _, _) in zip(names, split):
        if k != key:
            raise JaxfoundError(f"{name} has trunk '{k}' but {names[0]} has '{key}'; merge one family at a time")
    trunks = [t for _, t, _ in split]
    check_compatible(trunks, names)
    base_trunk = None
    if base is not None:
        base_key, base_trunk, _ = split_trunk(base)
        if base_key != key:
            raise JaxfoundError(f"base has trunk '{base_key}' but the models have '{key}'")
    merged = merge(method, trunks, weights, base=base_trunk, **kwargs)
    return [{key: merged, **heads} for _, _, heads in split]
