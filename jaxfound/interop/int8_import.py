"""int8 params straight from a GGUF file or a transformers directory, one tensor at a time.

``quantize(from_pretrained(path))`` holds the whole model in float32 first (4 bytes per weight: 28 GB for a 7B
model). ``int8_from_pretrained`` reads one tensor, quantizes it as ``quantize`` (the same rules) and
``quantize_tied_embedding`` would, and drops the float copy before it reads the next, so at most one float tensor is
alive: the params equal ``quantize_tied_embedding(quantize(float params))`` exactly.

GGUF block formats (Q8_0, Q4_0, Q4_1: 32 weights per block, each block its own scale) do not map onto jaxfound's
int8 layout (one scale per output channel, which the native kernels read), so each tensor passes through float32 on
its way (dequantize, re-quantize per channel); it is that one tensor, never the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxfound.interop.hf import from_pretrained, load_hf_config
from jaxfound.quant import int4
from jaxfound.quant.int8 import DEFAULT_RULES, check_rules, quantize_kernel, quantize_table


def int8_converter(arch: str, tied: bool, rules=DEFAULT_RULES, mode: str = "w8a8") -> Callable:
    """convert(path, float array) -> {name: array} | None for interop.hf.params_from_weights: a Dense kernel the
    rules include becomes {kernel int8, scale} (mode 'w4': {kernel, scale, offset} 4-bit where its rows split into
    groups, quant.int4); the tied word table (tied: GPT-2, or tie_embeddings) becomes int8 rows, one scale per row and
    a float16 lookup copy; anything else stays as it is (None)."""
    rules = check_rules(rules)

    def convert(path: tuple, value: np.ndarray):
        name = "/".join(path)
        if path[-1] == "kernel" and value.ndim == 2:
            rule = next((r for r in rules if r.matches(name, value.shape[1])), None)
            if rule is None or rule.action != "include":
                return None
            if mode == "w4" and int4.w4_fits(value.shape[0], int4.GROUP):
                return int4.quantize_w4(value, int4.GROUP)
            q, scale = quantize_kernel(jnp.asarray(value))
            return {"kernel": np.asarray(q), "scale": np.asarray(scale)}
        if tied and path == (arch, "word", "embedding"):
            return {k: np.asarray(v) for k, v in quantize_table(value).items()}
        return None

    return convert


def int8_from_pretrained(path, rules=DEFAULT_RULES, head: str | None = None, mode: str = "w8a8"):
    """(float model, int8 params) of a GGUF file or transformers directory, read one tensor at a time; apply the
    params with the model's config given quant 'w8' or 'w8a8' (``dataclasses.replace(model.cfg, quant=...)``);
    mode 'w4': 4-bit params (quant.int4), applied with quant 'w4'."""
    cfg = load_hf_config(path, head).model
    tied = cfg.arch == "gpt" or cfg.tie_embeddings
    return from_pretrained(path, head, convert=int8_converter(cfg.arch, tied, rules, mode))
