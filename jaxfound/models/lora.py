"""LoRA as a parameter transform: low-rank adapters on any Dense of any jaxfound model.

A Dense whose module path matches ``model.lora.targets`` holds ``lora_a`` (in, r) and ``lora_b`` (r, out) beside its
kernel and computes ``y = x W + b + (alpha / r) * dropout(x) A B`` (PEFT's LoRA, with A drawn as PEFT draws it,
kaiming-uniform, and B = 0, so an adapted model starts equal to its base). Everything else is a function of the
params tree:

    trainable_labels(params, arch)   # 'train' for adapters (and new task heads), 'frozen' for the rest
    fold(params, lora)               # W + (alpha / r) A B, adapters dropped: a plain model's params
    split(params) / combine(base, adapters)

Targets: 'all-linear' (every Dense of the trunk, as PEFT's all-linear: not the output or classification heads), or a
regular expression searched in the module path, e.g. 'attention/(query|value)' or 'mlp'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_NAMES = ("lora_a", "lora_b")
ALL_LINEAR = "all-linear"
# heads trained in full beside the adapters: new task heads, as PEFT's modules_to_save for classification tasks
# (RoBERTa's classification head is dense ('pooler' here) + out_proj; BERT's pooler belongs to the base model)
TRAINED_HEADS = {"bert": ("classifier",), "roberta": ("classifier", "pooler"), "gpt": ("classifier",),
                 "llama": ("classifier",)}


def targets_module(targets: str, module_path: tuple[str, ...], arch: str) -> bool:
    """Whether the Dense at module_path (e.g. ('llama', 'layer_0', 'attention', 'query')) gets an adapter; the
    trunk's top-level key is the architecture's name."""
    if targets == ALL_LINEAR:
        return bool(module_path) and module_path[0] == arch
    return re.search(targets, "/".join(module_path)) is not None


def init_a(rng, shape, dtype=jnp.float32):
    """PEFT's default init of A: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) (fan_in = in)."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(rng, shape, dtype, -bound, bound)


def _leaf_name(path) -> str:
    return getattr(path[-1], "key", "")


def is_adapter(path) -> bool:
    return _leaf_name(path) in ADAPTER_NAMES


def trainable_labels(params: Mapping, arch: str) -> dict:
    """'train' for every adapter leaf and every leaf of a trained head (TRAINED_HEADS), 'frozen' elsewhere."""
    heads = TRAINED_HEADS[arch]

    def label(path, _):
        return "train" if is_adapter(path) or getattr(path[0], "key", "") in heads else "frozen"
    return jax.tree_util.tree_map_with_path(label, dict(params))


def split(params: Mapping) -> tuple[dict, dict]:
    """(base params without adapters, the adapters alone: {module path: {'lora_a', 'lora_b'}} as nested dicts)."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            if "lora_a" in value:
                adapters[key] = {n: value[n] for n in ADAPTER_NAMES}
                base[key] = {n: v for n, v in value.items() if n not in ADAPTER_NAMES}
                continue
            sub_base, sub_adapters = split(value)
            base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        else:
            base[key] = value
    return base, adapters


def combine(base: Mapping, adapters: Mapping) -> dict:
    """The inverse of split: adapters put back beside their kernels."""
    out = dict(base)
    for key, value in adapters.items():
        if key not in out:
            raise KeyError(f"adapter for '{key}' has no module in the base params")
        out[key] = dict(out[key]) | dict(value) if "lora_a" in value else combine(out[key], value)
    return out


def delta(a, b, alpha: float):
    """The adapter's weight update (alpha / r) A B, (in, out) — batched over leading axes of stacked layers."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return (alpha / a.shape[-1]) * jnp.matmul(a, b)


def fold(params: Mapping, alpha: float) -> dict:
    """W + (alpha / r) A B for every adapted Dense, adapters dropped: the params of the same model without LoRA."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and "lora_a" in value:
            kernel = value["kernel"]
            if kernel.dtype == jnp.int8:
                raise ValueError("cannot fold an adapter into an int8 kernel; fold before quantizing")
            merged = (jnp.asarray(kernel, jnp.float32) + delta(value["lora_a"], value["lora_b"], alpha))
            out[key] = {n: v for n, v in value.items() if n not in ADAPTER_NAMES} | {"kernel": merged.astype(
                kernel.dtype)}
        elif isinstance(value, Mapping):
            out[key] = fold(value, alpha)
        else:
            out[key] = value
    return out


def count(params: Mapping, labels: Mapping) -> tuple[int, int]:
    """(trainable, total) parameter counts under trainable_labels."""
    sizes = jax.tree.leaves(jax.tree.map(lambda x: int(np.prod(np.shape(x))), dict(params)))
    flags = jax.tree.leaves(labels)
    return sum(s for s, f in zip(sizes, flags) if f == "train"), sum(sizes)


def describe(params: Mapping, arch: str, lora_cfg) -> tuple[dict, str]:
    """({trainable_params, total_params, lora_modules}, a one-line report as PEFT's print_trainable_parameters)."""
    trainable, total = count(params, trainable_labels(params, arch))
    modules = sum(is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(params))[0]) // 2
    line = (f"LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g}, targets {lora_cfg.targets!r}: {modules} adapted "
            f"layers; trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return {"trainable_params": trainable, "total_params": total, "lora_modules": modules}, line


__all__ = ["ADAPTER_NAMES", "ALL_LINEAR", "TRAINED_HEADS", "combine", "count", "delta", "describe", "fold",
           "init_a", "is_adapter", "split", "targets_module", "trainable_labels"]
