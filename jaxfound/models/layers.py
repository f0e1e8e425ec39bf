"""Building blocks shared by BERT and GPT: Dense, embeddings, attention, MLP, with logical axis names."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxfound.models import cache as kv_cache
from jaxfound.models import lora as lora_lib
from jaxfound.models.attention import attention  # noqa: F401  (layers.attention: the models' one entry point)
from jaxfound.quant import int4
from jaxfound.quant.int8 import quantized_dot
from jaxfound.quant.packed import packed_dot, packed_rows
from jaxfound.sharding import constrain  # noqa: F401  (re-exported for bert.py / gpt.py)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def gelu(x):
    """Exact GELU as torch writes it, x (1 + erf(x / sqrt 2)) / 2. (jax.nn.gelu's exact form goes through erfc, which
    XLA:CPU computes with an exp and two fusions: 2.7x slower for MiniLM's (6, 128, 1536) activations; the two agree
    to 1e-6.)"""
    return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}
init_normal = nn.initializers.normal(0.02)


def mixed_dot(x, kernel):
    """x (..., K) @ kernel (K, N) accumulated in float32 (the result is float32), as
    ``jnp.dot(x, kernel, preferred_element_type=float32)``, with a backward written for XLA:CPU.

    Autodiff contracts the (..., K) input and the (..., N) cotangent over all leading axes at once; XLA:CPU then
    transposes the cotangent into (N, tokens) inside a loop fusion with the elementwise backward ops before it, 80x
    slower than a plain copy (170 ms per LoRA'd MLP layer of SmolLM2 at 2048 tokens; the whole step 1.4x longer). Here
    the kernel's gradient is one 2-D product over the flattened tokens, which XLA:CPU runs without any transpose.
    bfloat16 operands: the backward products take bfloat16 operands too (the cotangent rounded to bfloat16: exact
    where the caller casts the result to bfloat16, as Dense does; bf16 x bf16 products are exact in float32), since
    XLA:CPU's fast bf16 matmuls (AMX / AVX512-BF16 through YNNPACK) take bf16 operands only, and autodiff would widen
    the kernel to float32. Operands of different dtypes: plain autodiff."""
    if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        return jnp.dot(x, kernel, preferred_element_type=jnp.float32)
    return _dot(x, kernel)


@jax.custom_vjp
def _dot(x, kernel):
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32)


def _dot_fwd(x, kernel):
    return jnp.dot(x, kernel, preferred_element_type=jnp.float32), (x, kernel)


def _dot_bwd(saved, g):
    x, kernel = saved
    g = g.astype(x.dtype)
    x_TxK, g_TxN = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = _matmul(g, _transposed(kernel))
    dk = _matmul(_transposed(x_TxK), g_TxN)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _matmul(a, b_KxN):
    """a (..., K) @ b (K, N) accumulated in float32."""
    return jax.lax.dot_general(a, b_KxN, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed(a_MxN):
    """a.T (N, M). For bfloat16, a row-major copy XLA:CPU keeps: it folds a plain transpose into the product's
    dimension numbers, decides before layout assignment that such a product (contracting the operand's major axis)
    has no bf16 kernel, and widens both operands to float32 (~200 GFLOP/s here); through a 3-D view the transpose
    stays an op, the product is a plain (N, M) x (M, K) one and takes the fast bf16 matmul (AMX / AVX512-BF16,
    ~1100 GFLOP/s). float32 products are left to XLA's layouts."""
    M, N = a_MxN.shape
    s = next((d for d in (16, 8, 4, 2) if M % d == 0 and M > d), 0)
    if a_MxN.dtype != jnp.bfloat16 or not s:
        return a_MxN.T
    return a_MxN.reshape(M // s, s, N).transpose(2, 0, 1).reshape(N, M)


_dot.defvjp(_dot_fwd, _dot_bwd)


def lora_dot(x, kernel, a, b, scale: float):
    """x (..., K) @ (kernel (K, N) + scale A (K, r) B (r, N)) accumulated in float32: a frozen kernel with a LoRA
    adapter, the adapter's dropout off. Equal to ``x W + scale (x A) B`` up to rounding (B = 0: exactly x W).

    The forward runs one product with the merged kernel (K r N flops to merge) instead of the product, a rank-r
    product that writes a second (..., N) output, a scale pass and an add. The backward is written out: the input's
    gradient is one product with the merged kernel; A's and B's come from rank-r products; the kernel's gradient
    (x^T g, the full-size product LoRA exists to avoid) is only computed when asked for (XLA drops it when the
    kernel is frozen). MiniLM's LoRA step on XLA:CPU: see benchmarks/ner_conll03.py."""
    if len({x.dtype, kernel.dtype, a.dtype, b.dtype}) > 1 or x.dtype not in (jnp.float32, jnp.bfloat16):
        xa = mixed_dot(x, a.astype(x.dtype)) * scale
        return mixed_dot(x, kernel.astype(x.dtype)) + mixed_dot(xa.astype(x.dtype), b.astype(x.dtype))
    return _lora(x, kernel, a, b, scale)


def _merged(kernel, a, b, scale):
    ab = jnp.dot(a, b, preferred_element_type=jnp.float32)
    return (kernel.astype(jnp.float32) + scale * ab).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora(x, kernel, a, b, scale):
    return jnp.dot(x, _merged(kernel, a, b, scale), preferred_element_type=jnp.float32)


def _lora_fwd(x, kernel, a, b, scale):
    return _lora(x, kernel, a, b, scale), (x, kernel, a, b)


def _lora_bwd(scale, saved, g):
    x, kernel, a, b = saved
    g = g.astype(x.dtype)
    w = _merged(kernel, a, b, scale)  # recomputed: K r N flops, not kept alive from the forward
    dx = _matmul(g, _transposed(w))
    x_TxK, g_TxN = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    xt_KxT = _transposed(x_TxK)
    gb_Txr = _matmul(g_TxN, b.T)
    xa_Txr = _matmul(x_TxK, a)
    da = _matmul(xt_KxT, gb_Txr.astype(x.dtype)) * scale
    db = _matmul(_transposed(xa_Txr.astype(x.dtype)), g_TxN) * scale
    dk = _matmul(xt_KxT, g_TxN)  # dropped by XLA when the kernel is frozen
    return dx.astype(x.dtype), dk.astype(kernel.dtype), da.astype(a.dtype), db.astype(b.dtype)


_lora.defvjp(_lora_fwd, _lora_bwd)


def int8_mode(quant: str) -> str:
    """How an int8 layer runs in a model with this quant: 'none' weight-only (w8), 'w4' (its int8 layers: those whose
    rows do not split into groups, the tied head) w8a8, else as named."""
    return {"none": "w8", "w4": "w8a8"}.get(quant, quant)


class Dense(nn.Module):
    """y = x @ kernel + bias; kernel (in, out) with logical axes; int8 kernel + scale per layer when quantized.

    A layer is quantized when its params hold a 'scale' (so ``quantize`` may leave some layers float);
    at init that is when quant != 'none'. An int8 layer applied with quant 'none' runs weight-only (w8).
    Params {packed, comp, scale} (quant.packed.pack_params, for decoding) run on the native kernel in the same mode.
    4-bit layers (quant.int4: {kernel uint8, scale, offset}; at init when quant is 'w4') run W4A8, their decoding form
    {w4_packed} on the native kernel; int8 layers of a w4 model run w8a8.
    A layer has a LoRA adapter (models.lora) when its params hold 'lora_a'; at init when lora.rank > 0 and
    lora.targets match its path. The adapter's dropout applies when a 'dropout' rng is given (training).
    """

    features: int
    axes: tuple[str, str]
    dtype: str = "float32"
    param_dtype: str = "float32"
    quant: str = "none"
    use_bias: bool = True
    lora: object = None  # a config.LoraConfig, or None
    arch: str = ""  # the trunk's top-level key, for lora.targets 'all-linear'

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.features)
        dtype = DTYPES[self.dtype]
        part = nn.with_logical_partitioning
        quantized = self.quant != "none" if self.is_initializing() else self.has_variable("params", "scale")
        get = lambda name: self.get_variable("params", name)  # noqa: E731
        int8 = int8_mode(self.quant)
        if not self.is_initializing() and self.has_variable("params", "w4_packed"):
            y = int4.packed_w4_dot(x, get("w4_packed"), self.features).astype(dtype)
        elif not self.is_initializing() and self.has_variable("params", "packed"):
            y = packed_dot(x, get("packed"), get("comp"), get("scale"), int8).astype(dtype)
        elif self._w4(shape[0]):
            G = int4.GROUP
            kernel = self.param("kernel", part(nn.initializers.zeros, self.axes), (shape[0] // 2, shape[1]), jnp.uint8)
            scale = self.param("scale", part(nn.initializers.ones, (None, self.axes[1])), (shape[0] // G, shape[1]),
                               jnp.float16)
            offset = self.param("offset", part(nn.initializers.zeros, (None, self.axes[1])), (shape[0] // G, shape[1]),
                                jnp.float16)
            y = int4.w4_dot(x, kernel, scale, offset).astype(dtype)
        elif not quantized:
            kernel = self.param("kernel", part(init_normal, self.axes), shape, DTYPES[self.param_dtype])
            if self._adapted() and not self._adapter_dropout():  # the adapter merged into the product
                return self._merged_adapter(x, kernel, dtype)
            # the bias added to the float32 product (for bf16: its gradient is a float32 sum, which XLA:CPU runs
            # ~10x faster than the precision-split reduce-window it makes of a bf16 one)
            y = self._bias(mixed_dot(x.astype(dtype), kernel.astype(dtype)), jnp.float32).astype(dtype)
            return y + self._adapter(x, dtype) if self._adapted() else y
        else:
            qkernel = self.param("kernel", part(nn.initializers.zeros, self.axes), shape, jnp.int8)
            scale = self.param("scale", part(nn.initializers.ones, self.axes[1:]), (self.features,), jnp.float32)
            y = quantized_dot(x, qkernel, scale, int8, dtype).astype(dtype)
        y = self._bias(y, dtype)
        if self._adapted():
            y = y + self._adapter(x, dtype)
        return y

    def _bias(self, y, dtype):
        return y + self._bias_param().astype(dtype) if self.use_bias else y

    def _bias_param(self):
        return self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                          (self.features,), DTYPES[self.param_dtype])

    def _w4(self, in_features: int) -> bool:
        """4-bit weights (quant.int4): at init when quant is 'w4' and the input rows split into groups; after, when the
        params hold an 'offset'."""
        if self.is_initializing():
            return self.quant == "w4" and int4.w4_fits(in_features, int4.GROUP)
        return self.has_variable("params", "offset")

    def _adapted(self) -> bool:
        if self.is_initializing():
            return self.lora is not None and self.lora.rank > 0 and lora_lib.targets_module(
                self.lora.targets, self.path, self.arch)
        if self.has_variable("params", "lora_a") and self.lora is None:
            raise ValueError(f"{'/'.join(self.path)} has a LoRA adapter but the model config has no lora (rank, "
                             "alpha): build the model from the config it was trained with")
        return self.has_variable("params", "lora_a")

    def _adapter_dropout(self) -> bool:
        return self.lora.dropout > 0 and self.has_rng("dropout")

    def _lora_params(self, in_features: int):
        """A (in, r) and B (r, out) with the kernel's logical axes on in / out, declared after the bias (their init
        rngs stay those of every earlier version)."""
        part = nn.with_logical_partitioning
        r, param_dtype = self.lora.rank, DTYPES[self.param_dtype]
        a = self.param("lora_a", part(lora_lib.init_a, (self.axes[0], None)), (in_features, r), param_dtype)
        b = self.param("lora_b", part(nn.initializers.zeros, (None, self.axes[1])), (r, self.features), param_dtype)
        return a, b

    def _merged_adapter(self, x, kernel, dtype):
        """x (W + (alpha / r) A B) + bias (lora_dot); the params declared in their usual order (bias, A, B)."""
        bias = self._bias_param() if self.use_bias else None
        a, b = self._lora_params(x.shape[-1])
        cast = lambda t: t.astype(dtype)  # noqa: E731
        y = lora_dot(cast(x), cast(kernel), cast(a), cast(b), self.lora.alpha / a.shape[-1])
        return (y if bias is None else y + bias.astype(jnp.float32)).astype(dtype)

    def _adapter(self, x, dtype):
        """(alpha / r) dropout(x) A B (the scale applied to the rank-r product, not to the (..., out) one)."""
        a, b = self._lora_params(x.shape[-1])
        if self._adapter_dropout():
            x = dropout(x, self.lora.dropout, self.make_rng("dropout"))
        xa = mixed_dot(x.astype(dtype), a.astype(dtype)) * (self.lora.alpha / a.shape[-1])
        return mixed_dot(xa.astype(dtype), b.astype(dtype)).astype(dtype)


class Embed(nn.Module):
    """A lookup table (num, features) with logical axes; ``tied_logits`` gives tied output logits.

    Quantized tables (int8.quantize_tied_embedding) hold int8 'embedding' rows and one 'scale' per row (the head) and
    a float16 'lookup' copy that the lookup reads; packed ones (quant.packed.pack_params) hold the head's panels of
    that int8 table. Without 'lookup' (earlier files) the lookup gathers int8 rows (from the panels) times their scale.
    """

    num: int
    features: int
    axes: tuple[str, str] = ("vocab", "embed")
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, ids):
        dtype = DTYPES[self.dtype]
        if self.is_initializing() or not self.has_variable("params", "scale"):
            init = nn.with_logical_partitioning(init_normal, self.axes)
            table = self.param("embedding", init, (self.num, self.features), DTYPES[self.param_dtype])
            return jnp.take(table, ids, axis=0).astype(dtype)
        get = lambda name: self.get_variable("params", name)  # noqa: E731
        if self.has_variable("params", "lookup"):  # the table's float copy beside the int8 head
            return jnp.take(get("lookup"), ids, axis=0).astype(dtype)
        if self.has_variable("params", "packed"):
            rows = packed_rows(get("packed"), ids, self.features)
        else:
            rows = jnp.take(get("embedding"), ids, axis=0)
        return (rows.astype(jnp.float32) * jnp.take(get("scale"), ids)[..., None]).astype(dtype)


def _mix32(h):
    """lowbias32 (C. Wellons' hash prospector): a bijection of uint32 whose every output bit flips with ~1/2
    probability when any input bit does."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hashed_bits(rng, shape: tuple[int, ...]):
    """Uniform uint32 of `shape` for dropout masks: element i (row-major index) gets mix(mix(i + k0) ^ k1), with the
    two key words drawn from rng, so a mask is a function of the key alone (and of no mesh or sharding: SPMD gives
    each device the indices of its slice). ~10x cheaper than jax.random.bits (threefry, 20 rounds per pair of
    words) on XLA:CPU, where threefry's fusions took 3-5% of the thunk time of a MiniLM fine-tuning step (a profile
    on a busy machine); a statistical hash, not a stream for cryptography or for sampling."""
    k = jax.random.bits(rng, (2,), jnp.uint32)
    size = int(np.prod(shape))
    if size >= 2**32:
        raise ValueError(f"hashed_bits: {size} elements; indices must fit 32 bits")
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return _mix32(_mix32(index + k[0]) ^ k[1])


def uniform_u16(rng, shape: tuple[int, ...]):
    """Uniform uint16 of `shape`: each 32-bit random word gives two (half the hashing of one word per element)."""
    D = shape[-1]
    half = -(-D // 2)
    words = hashed_bits(rng, tuple(shape[:-1]) + (half,))
    return jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(tuple(shape[:-1]) + (2 * half,))[..., :D]


class Dropout(nn.Module):
    """Inverted dropout from 16-bit uniforms: drops with probability round(rate * 2^16) / 2^16 (within 8e-6 of rate)
    and scales the kept by the exact inverse keep probability, so E[output] = input. Keys: the 'dropout' rng."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def dropout(x, rate: float, rng):
    """Dropout's function: x with elements dropped with probability ~rate (16-bit uniforms), the kept rescaled."""
    threshold = round(rate * 65536)
    if threshold >= 65536:
        return jnp.zeros_like(x)
    keep = uniform_u16(rng, x.shape) >= threshold
    return jnp.where(keep, x * (65536 / (65536 - threshold)), 0).astype(x.dtype)


def layer_norm(cfg, name):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def dense(cfg, features, axes, name, use_bias=True):
    lora = getattr(cfg, "lora", None)
    return Dense(features, axes, cfg.dtype, cfg.param_dtype, cfg.quant, use_bias, lora if lora and lora.rank else None,
                 cfg.arch, name=name)


def tied_logits(x, embedding, cfg, vocab_major: bool = False):
    """Logits against the tied word embeddings, accumulated in float32: (..., V), or with vocab_major (V, N) for the
    N rows of x flattened — an M = vocab product, 11% faster decode steps at batch 8 on XLA:CPU when the consumer
    reduces over the vocabulary in that layout (the generation engine).

    embedding: the float table (V, D), or the word params: {embedding} float, {embedding int8, scale} (one scale per
    vocab entry, so the head is an int8 Dense with kernel q.T and per-output-channel scale: int8.quantized_dot), or
    {packed, comp, scale} (the same head packed for the native kernel: quant.packed)."""
    dtype = DTYPES[cfg.dtype]
    word = embedding if isinstance(embedding, dict) else {"embedding": embedding}
    if "scale" in word:
        mode = int8_mode(cfg.quant)
        if "packed" in word:
            logits = packed_dot(x, word["packed"], word["comp"], word["scale"], mode)
        else:
            logits = quantized_dot(x, nn.unbox(word["embedding"]).T, word["scale"], mode, dtype)
        if vocab_major:
            return constrain(logits.reshape(-1, logits.shape[-1]).T, ("act_vocab", "act_batch"))
        return logits
    table_VxD = nn.unbox(word["embedding"]).astype(dtype)
    if vocab_major:
        x_NxD = x.reshape(-1, x.shape[-1]).astype(dtype)
        return constrain(jnp.dot(table_VxD, x_NxD.T, preferred_element_type=jnp.float32), ("act_vocab", "act_batch"))
    return mixed_dot(x.astype(dtype), table_VxD.T)


def decoder_head(cfg, head: str, h_BxLxD, embedding, tied: bool, ids_BxL, attention_mask_BxL=None,
                 masked_positions_BxP=None, vocab_major: bool = False):
    """The heads of a causal decoder (GPT-2, the Llama family), called inside the model's compact __call__:
    'none' (hidden states), 'lm' (logits against the tied embedding or an 'lm_head' Dense; at masked_positions only;
    vocab_major: (V, B * P), see tied_logits), 'token_cls', 'seq_cls' (the last real token summarises the sequence)."""
    if head == "none":
        return h_BxLxD
    if head == "lm":
        if masked_positions_BxP is not None:
            h_BxLxD = jnp.take_along_axis(h_BxLxD, masked_positions_BxP[:, :, None], axis=1)
        if tied:
            logits = tied_logits(h_BxLxD, embedding, cfg, vocab_major)
        else:
            logits = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", use_bias=False)(h_BxLxD)
            logits = logits.astype(jnp.float32)
            logits = logits.reshape(-1, cfg.vocab_size).T if vocab_major else logits
        return logits if vocab_major else constrain(logits, ("act_batch", "act_len", "act_vocab"))
    if head == "token_cls":
        return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxLxD).astype(jnp.float32)
    if head == "seq_cls":
        if attention_mask_BxL is None:
            last_B = jnp.full((ids_BxL.shape[0],), ids_BxL.shape[1] - 1)
        else:
            last_B = jnp.sum(attention_mask_BxL, axis=1) - 1
        h_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
        return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxD).astype(jnp.float32)
    raise ValueError(f"unknown decoder head {head!r}")


def attention_mask(attention_mask_BxL=None, segment_ids_BxL=None):
    """Boolean (B, 1, L, L) mask, or None: padding keys are masked; packed documents don't see each other."""
    if segment_ids_BxL is not None:
        seg = segment_ids_BxL
        return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0))[:, None]
    if attention_mask_BxL is not None:
        return attention_mask_BxL.astype(bool)[:, None, None, :]
    return None


def rms_norm(cfg, name, axes=("norm",)):
    """RMSNorm as transformers' Llama computes it: in float32, scaled by the weight in the compute dtype."""
    return RMSNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, axes, name=name)


class RMSNorm(nn.Module):
    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    axes: tuple = ("norm",)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes), (x.shape[-1],),
                           DTYPES[self.param_dtype])
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        dtype = DTYPES[self.dtype]
        return scale.astype(dtype) * normed.astype(dtype)


def rope_frequencies(cfg, head_dim: int):
    """Inverse frequencies (H/2,) of the rotary embedding, with linear or llama3 scaling as transformers does."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x_BxLxNxH, positions_BxL, inv_freq):
    """Rotary position embedding, transformers' rotate-half layout (pairs are (i, i + H/2)), angles in float32."""
    angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos = jnp.cos(angles_BxLxF)[:, :, None].astype(x_BxLxNxH.dtype)
    sin = jnp.sin(angles_BxLxF)[:, :, None].astype(x_BxLxNxH.dtype)
    x1, x2 = jnp.split(x_BxLxNxH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class SelfAttention(nn.Module):
    cfg: object
    causal: bool = False

    @nn.compact
    def __call__(self, h_BxLxD, mask, h_query_BxQxD=None, cache=None, index_B=None):
        """h_query_BxQxD: attend from these rows only (default: every row of h_BxLxD); mask is then (B, 1, Q, L).
        cache: this layer's KV cache (models.cache); the new tokens are written from slot index_B on, attention runs
        over the cache and (output, new cache) is returned; index_B None: a fresh cache, written from slot 0."""
        cfg = self.cfg
        B, L, D = h_BxLxD.shape
        N = cfg.num_heads
        h_query_BxQxD = h_BxLxD if h_query_BxQxD is None else h_query_BxQxD
        def heads(name, x_BxTxD):  # remat names: models.scan.REMAT_POLICIES
            x = checkpoint_name(dense(cfg, D, ("embed", "heads"), name)(x_BxTxD), "qkv")
            x = x.reshape(B, x_BxTxD.shape[1], N, D // N)
            return constrain(x, ("act_batch", "act_len", "act_heads", None))
        q_BxQxNxH = heads("query", h_query_BxQxD)
        k_BxLxNxH, v_BxLxNxH = heads("key", h_BxLxD), heads("value", h_BxLxD)
        if cache is not None and index_B is not None:  # a step over a filled cache
            out_BxQxNxH, cache = kv_cache.update_and_attend(q_BxQxNxH, cache, k_BxLxNxH, v_BxLxNxH, index_B)
        else:  # no cache, or a fresh one's prefill (index_B None): the new tokens attend among themselves
            if cache is not None:
                cache = kv_cache.write(cache, k_BxLxNxH, v_BxLxNxH, index_B)
            out_BxQxNxH = attention(q_BxQxNxH, k_BxLxNxH, v_BxLxNxH, mask, self.causal, impl=cfg.attention)
        out_BxQxD = dense(cfg, D, ("heads", "embed"), "out")(checkpoint_name(out_BxQxNxH.reshape(B, -1, D), "attn_out"))
        return out_BxQxD if cache is None else (out_BxQxD, cache)


class MLP(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD):
        cfg = self.cfg
        up_BxLxF = checkpoint_name(dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up")(h_BxLxD), "mlp_up")
        x_BxLxF = constrain(ACTIVATIONS[cfg.activation](up_BxLxF), ("act_batch", "act_len", "act_mlp"))
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down")(checkpoint_name(x_BxLxF, "mlp_act"))
