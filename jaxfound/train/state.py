"""TrainState and an init that is born sharded: no full copy of the params on one host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.errors import JaxfoundError
from jaxfound.models import abstract_params, lora
from jaxfound.sharding import logical_shardings


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_steps: jax.Array  # updates skipped because the loss or a gradient was NaN/inf


def _path_keys(path) -> tuple:
    """The trailing dict keys of a tree path: an optimizer leaf's path ends with its param's path."""
    keys = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(entry.key)
    return tuple(reversed(keys))


def state_shardings(model, tx: optax.GradientTransformation, mesh, seq_len: int) -> TrainState:
    """NamedShardings for every leaf of the TrainState: params by logical names, Adam moments alike."""
    boxed = abstract_params(model, seq_len)
    param_sh = logical_shardings(boxed, mesh)
    by_path = {_path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
    opt_abstract = jax.eval_shape(tx.init, nn.unbox(boxed))
    replicated = NamedSharding(mesh, P())

    def match(path, leaf):
        keys = _path_keys(path)
        sharding = by_path.get(keys)
        return sharding if sharding is not None and getattr(leaf, "ndim", 0) > 0 else replicated

    opt_sh = jax.tree_util.tree_map_with_path(match, opt_abstract)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, nonfinite_steps=replicated)


def init_state(model, tx, mesh, seq_len: int, seed: int, shardings: TrainState | None = None,
               params=None) -> TrainState:
    """A fresh TrainState created directly in its sharded layout (jit with out_shardings).

    params: start from these (e.g. pretrained weights) instead of a random init.
    """
    shardings = shardings or state_shardings(model, tx, mesh, seq_len)

    def make(rng, given):
        p = given if given is not None else nn.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          nonfinite_steps=jnp.zeros((), jnp.int32))

    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed), params)


def init_params(model, seq_len: int, seed: int, pretrained: dict, source: str) -> dict:
    """Pretrained parts copied in; the rest (the new head) drawn as BERT does: N(0, 0.02) weights, zero biases;
    LoRA adapters as PEFT draws them (A kaiming-uniform, B = 0: the adapted model starts as its base)."""
    shapes = nn.unbox(abstract_params(model))
    rng = np.random.default_rng([seed, 17])
    adapter_rng = np.random.default_rng([seed, 18])

    def fresh_adapter(path, x):
        if getattr(path[-1], "key", "") == "lora_a":
            bound = 1.0 / np.sqrt(x.shape[-2])
            return adapter_rng.uniform(-bound, bound, x.shape).astype(x.dtype)
        return np.zeros(x.shape, x.dtype)

    def fresh(path, x):
        name = getattr(path[-1], "key", "")
        if name in ("kernel", "embedding"):
            return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
        return np.ones(x.shape, x.dtype) if name == "scale" else np.zeros(x.shape, x.dtype)

    params = jax.tree_util.tree_map_with_path(fresh, {k: v for k, v in shapes.items() if k not in pretrained})
    for key, value in pretrained.items():
        if key in shapes:
            base, adapters = lora.split(shapes[key]) if isinstance(shapes[key], Mapping) else (shapes[key], {})
            if jax.tree.map(lambda x: tuple(x.shape), base) != jax.tree.map(lambda x: tuple(np.shape(x)), value):
                raise JaxfoundError(f"{source}: pretrained '{key}' params do not match the model config")
            params[key] = lora.combine(value, jax.tree_util.tree_map_with_path(fresh_adapter, adapters)) \
                if adapters else value
    return {k: params[k] for k in shapes}
