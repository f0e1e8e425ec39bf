"""The leaves of models to merge, aligned: compatibility checks, a per-leaf map, coefficients per parameter path.

Every merge method of jaxfound.fusion.merge is a function of one tensor's leaves mapped over the models' pytrees; the
helpers here are what those functions share.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfound.errors import JaxfoundError
from jaxfound.models import TRUNK_KEYS

Params = Mapping[str, Any]


# ---------------------------------------------------------------- compatibility


def path_str(path) -> str:
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


def leaf_spec(x) -> tuple[tuple[int, ...], Any]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), jnp.dtype(x.dtype)
    return tuple(np.shape(x)), np.asarray(x).dtype


def flat(tree) -> dict[str, Any]:
    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_paths(tree) -> list[str]:
    """Every leaf's path, 'llama/layer_0/attention/query/kernel', in tree order."""
    return list(flat(tree))


def check_compatible(trees: Sequence[Params], names: Sequence[str] | None = None) -> None:
    """Raise JaxfoundError at the first parameter whose key, shape or dtype differs from the first model's."""
    if not trees:
        raise JaxfoundError("nothing to merge: the list of models is empty")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(trees))]
    if len(names) != len(trees):
        raise JaxfoundError(f"names: got {len(names)} names for {len(trees)} models; give one name per model")
    ref = flat(trees[0])
    ref_trunk = [k for k in TRUNK_KEYS if k in trees[0]]
    for name, tree in zip(names[1:], trees[1:]):
        trunk = [k for k in TRUNK_KEYS if k in tree]
        if trunk and ref_trunk and trunk != ref_trunk:
            raise JaxfoundError(
                f"{name} is a '{trunk[0]}' model but {names[0]} is a '{ref_trunk[0]}' model: different "
                "architectures never merge (their parameters mean different things even where shapes agree, e.g. "
                "RoBERTa's positions start after the pad id and it has one token type); merge fine-tunes of one base"
            )
        leaves = flat(tree)
        for path, leaf in ref.items():
            if path not in leaves:
                raise JaxfoundError(
                    f"{name} has no parameter '{path}', which {names[0]} has; models to merge need the same keys"
                )
            (ref_shape, ref_dtype), (shape, dtype) = leaf_spec(leaf), leaf_spec(leaves[path])
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


# ---------------------------------------------------------------- coefficients


def weights_vector(weights, n: int):
    """Weights as a float32 vector of length n (None: all ones)."""
    if weights is None:
        return jnp.ones((n,), jnp.float32)
    got = np.shape(weights)[0] if np.ndim(weights) else None
    if got != n:
        raise JaxfoundError(f"weights: got {got if got is not None else 'a scalar'} for {n} models; give one per model")
    return jnp.asarray(weights, jnp.float32)


def densities_per_model(density, n: int) -> list[float]:
    """One Python float in (0, 1] per model; density is static because it fixes top-k sizes."""
    values = list(density) if isinstance(density, (list, tuple)) else [density] * n
    if len(values) != n:
        raise JaxfoundError(f"density: got {len(values)} values for {n} models; give one or one per model")
    for d in values:
        if not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise JaxfoundError(f"density must be a Python number in (0, 1], got {d!r}")
    return [float(d) for d in values]


def at(value, path: str):
    """A coefficient for one tensor: value(path) when it is a function of the parameter path, else value."""
    return value(path) if callable(value) else value


def output_axis(path: str, leaf) -> int:
    """The axis of a jaxfound leaf that is torch's leading (output) axis: the last one of a Dense kernel ((in, out))
    and of LoRA's A and B, 0 for everything else, GPT-2's trunk included (transformers stores its Conv1D as
    (in, out) too)."""
    name = path.rsplit("/", 1)[-1]
    if np.ndim(leaf) >= 2 and name in ("kernel", "lora_a", "lora_b") and not path.startswith("gpt/"):
        return -1
    return 0


def compute_dtype(dtype):
    # bf16 / f16 checkpoints are merged in f32 and cast back, like mergekit's `.to(base.dtype)`
    return jnp.promote_types(dtype, jnp.float32)


def broadcast(w_N, x_NxS):
    return w_N.reshape((-1,) + (1,) * (x_NxS.ndim - 1)).astype(x_NxS.dtype)


def map_leaves(fn: Callable, base: Params | None, trees: Sequence[Params]):
    """fn(leaf_index, path, base_leaf, leaves) over aligned leaves (base_leaf None without a base)."""
    names = [f"model {i}" for i in range(len(trees))]
    check_compatible(list(trees), names) if base is None else check_compatible([base, *trees], ["base", *names])
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    base_leaves = jax.tree_util.tree_leaves(base) if base is not None else [None] * len(paths_leaves)
    flats = [jax.tree_util.tree_leaves(t) for t in trees]
    out = [fn(i, path_str(path), base_leaves[i], [f[i] for f in flats]) for i, (path, _) in enumerate(paths_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def deltas(base_leaf, leaves):
    """Task vectors of one tensor stacked on a leading model axis, in the compute dtype."""
    dtype = compute_dtype(base_leaf.dtype)
    return jnp.stack([x.astype(dtype) for x in leaves]) - base_leaf.astype(dtype)


def per_model(value, n: int, name: str, lo: float, hi: float) -> list[float]:
    """One Python float per model in [lo, hi) (gamma, epsilon)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise JaxfoundError(f"{name}: got {len(values)} values for {n} models; give one or one per model")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi:
            raise JaxfoundError(f"{name} must be a Python number in [{lo}, {hi}), got {v!r}")
    return [float(v) for v in values]
