"""Merging LoRA adapters that share a base.

A weighted sum of adapters is itself an adapter, exactly: sum_i w_i (alpha_i / r_i) A_i B_i = (alpha / R) A B with A
the A_i side by side and B the B_i stacked, each scaled by w_i (alpha_i / r_i) / (alpha / R), R = sum r_i.

    params, lora_cfg = linear_adapters([params_1, params_2], [lora_1, lora_2], weights=[0.5, 0.5])

`merge_adapters(method, ...)` serves every method of jaxfound.fusion.merge. linear and task_arithmetic keep the
rank (their result is the weighted sum above: an adapter of rank sum r_i). The others do not, and run on the folded
models, whose deltas from the shared base are the adapters' updates (alpha_i / r_i) A_i B_i: TIES, DARE, Breadcrumbs
and DELLA mask and re-weight entries of those updates; SLERP mixes the two folded models, base included; Model Stock
gives base + t * mean update with t from the updates' angles. They return a folded model (no adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxfound.config import LoraConfig
from jaxfound.errors import JaxfoundError
from jaxfound.fusion import merge
from jaxfound.models import lora

RANK_KEEPING = ("linear", "task_arithmetic")


def _adapter_paths(adapters: Mapping, prefix: tuple = ()) -> dict[tuple, dict]:
    out = {}
    for key, value in adapters.items():
        if isinstance(value, Mapping) and "lora_a" in value:
            out[prefix + (key,)] = value
        elif isinstance(value, Mapping):
            out |= _adapter_paths(value, prefix + (key,))
    return out


def linear_adapters(params: Sequence[Mapping], configs: Sequence[LoraConfig], weights: Sequence[float] | None = None
                    ) -> tuple[dict, LoraConfig]:
    """(params whose adapters are the exact weighted sum of the inputs' adapters, its LoraConfig: rank = the sum of
    ranks, alpha = rank). Base weights and other leaves (heads) come from the first params, averaged by weights
    when they differ (a trained head is part of each adapter)."""
    n = len(params)
    if n < 2 or len(configs) != n:
        raise JaxfoundError(f"linear_adapters needs >= 2 params with one LoraConfig each, got {n} and {len(configs)}")
    weights = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, np.float64)
    bases, adapters = zip(*(lora.split(jax.device_get(dict(p))) for p in params))
    found = [_adapter_paths(a) for a in adapters]
    if any(set(f) != set(found[0]) for f in found):
        raise JaxfoundError("the adapters sit on different layers; merge adapters trained with the same targets")
    for i, b in enumerate(bases[1:], 1):
        if jax.tree.structure(b) != jax.tree.structure(bases[0]):
            raise JaxfoundError(f"adapter {i}'s base params differ in structure from adapter 0's: not the same base")
    rank = sum(c.rank for c in configs)
    merged = {}
    for path in found[0]:
        a = np.concatenate([np.asarray(f[path]["lora_a"], np.float32) for f in found], axis=-1)
        b = np.concatenate([np.asarray(f[path]["lora_b"], np.float32) * np.float32(w * c.alpha / c.rank)
                            for f, c, w in zip(found, configs, weights)], axis=-2)
        node = merged
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"lora_a": a, "lora_b": b}  # alpha = rank: scale 1, the weights live in B
    def average(*xs):  # in the leaves' own dtype (the float64 weights would otherwise widen them)
        mean = sum(w * np.asarray(x, np.float32) for w, x in zip(weights, xs)) / weights.sum()
        return mean.astype(np.asarray(xs[0]).dtype)

    heads = jax.tree.map(average, *bases)
    cfg = LoraConfig(rank=rank, alpha=float(rank), dropout=configs[0].dropout, targets=configs[0].targets)
    return lora.combine(heads, merged), cfg


def merge_adapters(method: str, params: Sequence[Mapping], configs: Sequence[LoraConfig],
                   weights: Sequence[float] | None = None, **kwargs) -> tuple[dict, LoraConfig | None]:
    """Adapters of one base merged by a mergekit method -> (params, LoraConfig): an adapter for RANK_KEEPING methods
    (lambda and normalize of task_arithmetic fold into the weights), else (folded params, None).

    kwargs go to jaxfound.fusion.merge.merge (density, lam, t, key, ...). The base is the adapters' shared base
    weights; slerp interpolates the two folded models (t = 0: the first); heads are averaged with the weights.
    """
    if method not in merge.METHODS:
        raise JaxfoundError(f"merge method {method!r} is unknown; valid methods: {', '.join(merge.METHODS)}")
    n = len(params)
    if len(configs) != n:
        raise JaxfoundError(f"merge_adapters: got {n} params and {len(configs)} LoraConfigs; give one per adapter")
    if method in RANK_KEEPING:
        w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
        if kwargs.pop("normalize", method == "linear"):  # mergekit's defaults: linear normalises, task_arithmetic not
            w = w / w.sum()
        w = w * float(kwargs.pop("lam", 1.0))
        if kwargs:
            raise JaxfoundError(f"{method} of adapters takes weights, lam and normalize; got {', '.join(kwargs)}")
        return linear_adapters(params, configs, list(w))
    folded = [lora.fold(jax.device_get(dict(p)), c.alpha) for p, c in zip(params, configs)]
    key, base_trunk, _ = merge.split_trunk(lora.split(jax.device_get(dict(params[0])))[0])
    trunks = [{key: merge.split_trunk(f)[1]} for f in folded]
    if method == "slerp":
        trunk = merge.merge(method, trunks, base=None, **kwargs)
    else:
        trunk = merge.merge(method, trunks, weights, base={key: base_trunk}, **kwargs)
    heads = [merge.split_trunk(f)[2] for f in folded]
    head = merge.linear(heads, weights) if heads[0] else {}
    return {**trunk, **head}, None


__all__ = ["RANK_KEEPING", "linear_adapters", "merge_adapters"]
