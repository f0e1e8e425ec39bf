"""Per-output-channel symmetric int8 weights; weight-only (w8) and dynamic per-token W8A8 matmuls.

A kernel w (in, out) is stored as q int8 in [-127, 127] and scale float32 (out,) with w ~= q * scale; a tied word
table (vocab, hidden) as int8 rows with one scale per row (``quantize_tied_embedding`` says how the tie is kept).
'w8' dequantizes the kernel to the compute dtype and does one float matmul (on CPU this is as fast as
float32 and faster than scaling the (tokens, out) product: the kernel is smaller than the activations).
'w8a8' quantizes each token's activations on the fly and multiplies int8 x int8 -> int32 with
``lax.dot_general``, then rescales by (token scale x channel scale) in one multiply. On an x86-64 CPU the
same computation runs as one native kernel (``quant.kernel``: AVX-512 VNNI or AVX2; XLA:CPU's int8 dot is no
faster than its float32 one); elsewhere, and on GPU / TPU, as these XLA ops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxfound.errors import JaxfoundError
from jaxfound.quant import kernel

MODES = ("w8", "w8a8")
QMAX = 127.0  # symmetric: -128 is never used, so negation never overflows


def quantize_kernel(w_IxO):
    """w ~= q * scale with q int8 in [-127, 127] and one float32 scale per output channel (column)."""
    w = w_IxO.astype(jnp.float32)
    scale_O = jnp.max(jnp.abs(w), axis=0) / QMAX
    scale_O = jnp.where(scale_O == 0, 1.0, scale_O)  # an all-zero column: any scale reproduces it
    q_IxO = jnp.clip(jnp.round(w / scale_O), -QMAX, QMAX).astype(jnp.int8)
    return q_IxO, scale_O


def dequantize_kernel(q_IxO, scale_O, dtype=jnp.float32):
    return (q_IxO.astype(jnp.float32) * scale_O).astype(dtype)


def quantize_activations(x_NxI):
    """Dynamic symmetric int8 per token (last axis): x ~= q * scale_N1; any leading dims."""
    x = x_NxI.astype(jnp.float32)
    amax_N1 = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    # multiply by the reciprocal: one divide per token instead of one per element
    inv_N1 = jnp.where(amax_N1 == 0, 0.0, QMAX / amax_N1)
    q_NxI = jnp.clip(jnp.round(x * inv_N1), -QMAX, QMAX).astype(jnp.int8)
    scale_N1 = jnp.where(amax_N1 == 0, 1.0, amax_N1 / QMAX)
    return q_NxI, scale_N1


def int8_matmul(a_int8, b_int8):
    """int8 x int8 -> int32 (exact): contracts the last axis of a with the first of b."""
    dims = (((a_int8.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(a_int8, b_int8, dims, preferred_element_type=jnp.int32)


def w8a8_dot_xla(x_NxI, q_IxO, scale_O):
    """W8A8 with XLA ops: per-token int8 activations, int8 x int8 -> int32 dot, rescale to float32."""
    xq_NxI, x_scale_N1 = quantize_activations(x_NxI)
    return int8_matmul(xq_NxI, q_IxO).astype(jnp.float32) * (x_scale_N1 * scale_O)


def quantized_dot(x_NxI, q_IxO, scale_O, mode: str, dtype=jnp.float32):
    """x @ dequant(q) in float32 (w8: in ``dtype``); x may have leading batch dims (B, L, I)."""
    if mode == "w8":
        w_IxO = dequantize_kernel(q_IxO, scale_O, dtype)
        return jnp.dot(x_NxI.astype(dtype), w_IxO, preferred_element_type=jnp.float32)
    if mode == "w8a8":
        if kernel.available():
            return lax.platform_dependent(
                x_NxI, q_IxO, scale_O, cpu=kernel.w8a8_dense, default=w8a8_dot_xla)
        return w8a8_dot_xla(x_NxI, q_IxO, scale_O)
    raise JaxfoundError(f"unknown quantization mode {mode!r} (model.quant allows: none, {', '.join(MODES)})")


# ---- params trees: which Dense kernels become int8 ----


@dataclass(frozen=True)
class Rule:
    """Quantize (or keep float) the Dense kernels whose '/'-joined path matches; the first matching rule wins."""

    pattern: str  # re.search over e.g. 'bert/layer_0/mlp/up/kernel'
    action: str  # 'include' (int8) or 'exclude' (stays float)
    below_features: int = 0  # > 0: only kernels with fewer output features than this match

    def matches(self, path: str, features: int) -> bool:
        small_enough = self.below_features <= 0 or features < self.below_features
        return small_enough and re.search(self.pattern, path) is not None


DEFAULT_RULES = (
    # small heads (token / sequence classifiers): little to save, and each logit feeds the argmax directly
    Rule(r"(^|/)kernel$", "exclude", below_features=64),
    # every other Dense: attention q/k/v/out, MLP up/down, MLM transform, pooler
    Rule(r"(^|/)kernel$", "include"),
)


def check_rules(rules) -> tuple[Rule, ...]:
    """Rules as a tuple of Rule (dicts as written by ``dataclasses.asdict`` are accepted); bad ones raise."""
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, dict):
            unknown = set(rule) - {"pattern", "action", "below_features"}
            if unknown:
                allowed = "pattern, action, below_features"
                raise JaxfoundError(f"quant rule {i}: unknown key(s) {sorted(unknown)} (allowed: {allowed})")
            rule = Rule(**rule)
        if not isinstance(rule, Rule):
            raise JaxfoundError(f"quant rule {i}: expected a Rule(pattern, action, below_features), got {rule!r}")
        if rule.action not in ("include", "exclude"):
            where = f"quant rule {i} ({rule.pattern!r})"
            raise JaxfoundError(f"{where}: action is {rule.action!r}; allowed: include, exclude")
        try:
            re.compile(rule.pattern)
        except re.error as e:
            raise JaxfoundError(f"quant rule {i}: pattern {rule.pattern!r} is not a valid regex ({e})") from None
        out.append(rule)
    return tuple(out)


def _dense_kernels(tree, prefix=""):
    """Yield (path, parent dict) for every float Dense kernel: a 2-D 'kernel' leaf."""
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _dense_kernels(value, path)
        elif key == "kernel" and getattr(value, "ndim", 0) == 2:
            yield path, tree


def quantize_plan(params, rules=DEFAULT_RULES) -> dict[str, bool]:
    """{kernel path: quantize?} for every Dense kernel in ``params`` under ``rules`` (unmatched: kept float)."""
    rules = check_rules(rules)
    plan = {}
    for path, node in _dense_kernels(nn.unbox(params)):
        if "scale" in node or node["kernel"].dtype == jnp.int8:
            raise JaxfoundError(f"params: {path} is already int8; quantize takes float params (dequantize first)")
        features = node["kernel"].shape[1]
        rule = next((r for r in rules if r.matches(path, features)), None)
        plan[path] = rule is not None and rule.action == "include"
    return plan


def quantize(params, rules=DEFAULT_RULES, quantize_one=None):
    """Float params -> qparams: chosen Dense kernels become int8 'kernel' + float32 'scale', the rest is unchanged.

    The quantized layers have exactly the params ``build_model(cfg with quant='w8'|'w8a8').init`` creates;
    ``Dense`` picks the int8 path per layer from the 'scale' it finds, so mixed trees apply with either mode.
    quantize_one(kernel) -> the layer's quantized params replaces int8's (quant.int4: 4-bit layers).
    """
    plan = quantize_plan(params, rules)
    if quantize_one is None:
        quantize_one = lambda w: dict(zip(("kernel", "scale"), quantize_kernel(w)))  # noqa: E731

    def walk(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                out[key] = walk(value, path)
            elif plan.get(path):
                out.update(quantize_one(value))
            else:
                out[key] = value
        return out

    return walk(nn.unbox(params), "")


def quantize_tied_embedding(params, trunk: str):
    """params with the tied word table params[trunk]['word']['embedding'] (V, D) as int8 rows + one scale per row,
    and a float16 copy of the table, 'lookup', for the embedding lookup.

    How the tie is kept: the table is quantized per row (per vocab entry), which is per output channel of the LM
    head x @ table.T, so one int8 table and one scale vector serve the head (an int8 Dense with kernel q.T and
    per-output-channel scale; models.layers.tied_logits). The lookup reads 'lookup' (float16: ~2^-11 relative error
    against int8's up to half a step of the row's largest entry; float32 where an entry exceeds float16's range):
    a decode step reads one row of it per token, so it costs memory but no bandwidth, and answers stay those of the
    float model (SmolLM2 with the int8 rows looked up lost one of 8 factual answers; with 'lookup', none). Params
    without 'lookup' (earlier files) look up the int8 rows times their scale.
    """
    params = nn.unbox(params)
    word = params.get(trunk, {}).get("word", {})
    table = word.get("embedding")
    if getattr(table, "ndim", 0) != 2 or table.dtype == jnp.int8:
        raise JaxfoundError(f"params: {trunk}/word/embedding is not a float (vocab, hidden) table to quantize")
    return {**params, trunk: {**params[trunk], "word": {**word, **quantize_table(table)}}}


def quantize_table(table_VxD) -> dict:
    """A tied word table as {embedding: int8 rows, scale: one per row, lookup: its float16 copy (float32 where an
    entry exceeds float16's range)}: see quantize_tied_embedding."""
    table = jnp.asarray(table_VxD, jnp.float32)
    q_DxV, scale_V = quantize_kernel(table.T)
    lookup = table.astype(jnp.float16) if float(jnp.max(jnp.abs(table))) < 65504 else table
    return {"embedding": q_DxV.T, "scale": scale_V, "lookup": lookup}


def dequantize(qparams, dtype=jnp.float32):
    """qparams -> float params: every int8 kernel with a scale becomes a ``dtype`` kernel; 'scale' is dropped."""
    def walk(tree):
        if "scale" in tree and getattr(tree.get("kernel"), "dtype", None) == jnp.int8:
            rest = {k: v for k, v in tree.items() if k not in ("kernel", "scale")}
            return {"kernel": dequantize_kernel(tree["kernel"], tree["scale"], dtype), **rest}
        if "scale" in tree and getattr(tree.get("embedding"), "dtype", None) == jnp.int8:  # a tied table, per row
            return {"embedding": dequantize_kernel(tree["embedding"].T, tree["scale"], dtype).T}  # 'lookup' dropped
        return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return walk(nn.unbox(qparams))
