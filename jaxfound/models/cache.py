"""The KV cache of a decoder: per layer, keys and values (B, K, S, H) where slot s holds position s of row b.

A step writes its Q new tokens of row b at slots index_B[b] .. index_B[b] + Q - 1 (their positions) and attends to
every slot at or before its own position (within the sliding window, when the model has one). Slots after a row's
position hold garbage from padding or nothing: the causal condition alone hides them, so rows of different lengths
share one cache and a row may be reset by writing from slot 0 again (continuous batching). A step given no index
(None) fills a fresh cache from slot 0 and attends among its own tokens only (prefill: no work over empty slots).
Heads before slots: the two attention products are then batched matmuls over (B, K) with no transpose of the cache
(2x faster decode attention on XLA:CPU than (B, S, K, H)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxfound.models import native
from jaxfound.sharding import constrain, current_activation_mesh

CACHE_AXES = ("cache_batch", "cache_heads", "cache_len", None)


def kv_shape(cfg) -> tuple[int, int]:
    """(key/value heads, head dim) of a decoder config (GPT-2 and the Llama family)."""
    if cfg.arch != "llama":
        return cfg.num_heads, cfg.hidden_size // cfg.num_heads
    return cfg.num_kv_heads or cfg.num_heads, cfg.head_dim or cfg.hidden_size // cfg.num_heads


def cache_shape(cfg, batch: int, length: int) -> tuple[int, int, int, int]:
    """(B, K, S, H) of each key and value array."""
    K, H = kv_shape(cfg)
    return batch, K, length, H


def init_cache(cfg, batch: int, length: int) -> dict:
    """Zeros for every layer: {'layer_i': {'k': (B, K, S, H), 'v': (B, K, S, H)}} in the compute dtype.
    Every leaf is its own buffer, so the whole cache can be donated to a step."""

    def zeros():
        return jnp.zeros(cache_shape(cfg, batch, length), jnp.dtype(cfg.dtype))

    return {f"layer_{i}": {"k": zeros(), "v": zeros()} for i in range(cfg.num_layers)}


def cache_logical_axes(cfg) -> dict:
    """The logical axis names of init_cache's arrays (for shardings on a mesh)."""
    return {f"layer_{i}": {"k": CACHE_AXES, "v": CACHE_AXES} for i in range(cfg.num_layers)}


def positions(index_B, Q: int):
    """Positions of the Q new tokens of each row: index_B[b] + 0 .. Q - 1 (index_B None: a fresh cache, 0 .. Q - 1)."""
    if index_B is None:
        return jnp.arange(Q)[None]
    return index_B[:, None] + jnp.arange(Q, dtype=index_B.dtype)[None]


def write(layer_cache: dict, k_BxQxKxH, v_BxQxKxH, index_B) -> dict:
    """The layer's cache with each row's new keys and values written from slot index_B[b] on (in place when donated).
    index_B None: every row from slot 0 (a fresh cache: one plain slice update instead of a per-row scatter)."""
    if index_B is None:
        def put_all(cache_BxKxSxH, new_BxQxKxH):
            new_BxKxQxH = new_BxQxKxH.swapaxes(1, 2).astype(cache_BxKxSxH.dtype)
            return lax.dynamic_update_slice_in_dim(cache_BxKxSxH, new_BxKxQxH, 0, axis=2)

        return {"k": constrain(put_all(layer_cache["k"], k_BxQxKxH), CACHE_AXES),
                "v": constrain(put_all(layer_cache["v"], v_BxQxKxH), CACHE_AXES)}

    def put(cache_KxSxH, new_QxKxH, i):
        new_KxQxH = new_QxKxH.swapaxes(0, 1).astype(cache_KxSxH.dtype)
        return lax.dynamic_update_slice_in_dim(cache_KxSxH, new_KxQxH, i, axis=1)

    k = constrain(jax.vmap(put)(layer_cache["k"], k_BxQxKxH, index_B), CACHE_AXES)
    v = constrain(jax.vmap(put)(layer_cache["v"], v_BxQxKxH, index_B), CACHE_AXES)
    return {"k": k, "v": v}


def attend(q_BxQxNxH, layer_cache: dict, mask_Bx1xQxS):
    """softmax(q k^T / sqrt(H), masked) v over the cache's keys and values, grouped-query (query head n reads key /
    value head n // (N / K)); logits and softmax in float32."""
    B, Q, N, H = q_BxQxNxH.shape
    k_BxKxSxH, v_BxKxSxH = layer_cache["k"], layer_cache["v"]
    K = k_BxKxSxH.shape[1]
    q_BxKxGxQxH = (q_BxQxNxH * jnp.asarray(H ** -0.5, q_BxQxNxH.dtype)).reshape(B, Q, K, N // K, H).transpose(
        0, 2, 3, 1, 4)
    logits = jnp.einsum("bkgqh,bksh->bkgqs", q_BxKxGxQxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    logits = jnp.where(mask_Bx1xQxS[:, :, None], logits, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits, axis=-1)
    if Q == 1 and jax.default_backend() == "cpu":  # a decode step on XLA:CPU (where update_and_attend's native
        # kernel does not run): as a dot, XLA:CPU re-lays the value cache out for it, four copies of it per step; as
        # a multiply-reduce it reads the cache where it is (SmolLM2 attention at batch 1: 1.7x faster)
        out_BxKxGxQxH = jnp.sum(probs[..., None] * v_BxKxSxH[:, :, None, None].astype(jnp.float32), axis=-2)
        out_BxKxGxQxH = out_BxKxGxQxH.astype(v_BxKxSxH.dtype)
    else:
        out_BxKxGxQxH = jnp.einsum("bkgqs,bksh->bkgqh", probs.astype(v_BxKxSxH.dtype), v_BxKxSxH)
    return out_BxKxGxQxH.transpose(0, 3, 1, 2, 4).reshape(B, Q, N, H)


def update_and_attend(q_BxQxNxH, layer_cache: dict, k_BxQxKxH, v_BxQxKxH, index_B, window: int = 0):
    """(attention output (B, Q, N, H), the layer's cache with the new keys and values written): ``write`` then
    ``attend`` over the slots each query sees. On the CPU backend, for float32 caches outside a multi-device mesh,
    one native call (models.native: written in place, only the visible slots read); elsewhere XLA ops."""
    def xla(q, k_cache, v_cache, k_new, v_new, index):
        cache = write({"k": k_cache, "v": v_cache}, k_new, v_new, index)
        mask = visible(positions(index, q.shape[1]), cache["k"].shape[2], window)
        return attend(q, cache, mask), cache["k"], cache["v"]

    def cpu(q, k_cache, v_cache, k_new, v_new, index):
        out, k, v = native.decode_attention(q, k_new, v_new, k_cache, v_cache, index, window)
        return out.astype(q.dtype), k, v

    args = (q_BxQxNxH, layer_cache["k"], layer_cache["v"], k_BxQxKxH, v_BxQxKxH, index_B)
    mesh = current_activation_mesh()
    if (jax.default_backend() == "cpu" and (mesh is None or mesh.size == 1) and layer_cache["k"].dtype == jnp.float32
            and native.available()):
        out, k, v = lax.platform_dependent(*args, cpu=cpu, default=xla)
    else:
        out, k, v = xla(*args)
    return out, {"k": constrain(k, CACHE_AXES), "v": constrain(v, CACHE_AXES)}


def visible(positions_BxQ, S: int, window: int = 0):
    """(B, 1, Q, S) bool: slot s is visible from a query at position p when s <= p (and p - s < window)."""
    slots_S = jnp.arange(S)
    mask = slots_S[None, None, :] <= positions_BxQ[:, :, None]
    if window:
        mask &= slots_S[None, None, :] > positions_BxQ[:, :, None] - window
    return mask[:, None]


__all__ = ["CACHE_AXES", "attend", "cache_logical_axes", "cache_shape", "init_cache", "kv_shape", "positions",
           "update_and_attend", "visible", "write"]
