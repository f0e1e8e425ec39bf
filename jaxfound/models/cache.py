"""The KV cache of a decoder: per layer, keys and values (B, S, K, H) where slot s holds position s of row b.

A step writes its Q new tokens of row b at slots index_B[b] .. index_B[b] + Q - 1 (their positions) and attends to
every slot at or before its own position (within the sliding window, when the model has one). Slots after a row's
position hold garbage from padding or nothing: the causal condition alone hides them, so rows of different lengths
share one cache and a row may be reset by writing from slot 0 again (continuous batching).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxfound.sharding import constrain

CACHE_AXES = ("cache_batch", "cache_len", "cache_heads", None)


def kv_shape(cfg) -> tuple[int, int]:
    """(key/value heads, head dim) of a decoder config (GPT-2 and the Llama family)."""
    if cfg.arch != "llama":
        return cfg.num_heads, cfg.hidden_size // cfg.num_heads
    return cfg.num_kv_heads or cfg.num_heads, cfg.head_dim or cfg.hidden_size // cfg.num_heads


def init_cache(cfg, batch: int, length: int) -> dict:
    """Zeros for every layer: {'layer_i': {'k': (B, S, K, H), 'v': (B, S, K, H)}} in the compute dtype.
    Every leaf is its own buffer, so the whole cache can be donated to a step."""
    K, H = kv_shape(cfg)

    def zeros():
        return jnp.zeros((batch, length, K, H), jnp.dtype(cfg.dtype))

    return {f"layer_{i}": {"k": zeros(), "v": zeros()} for i in range(cfg.num_layers)}


def cache_logical_axes(cfg) -> dict:
    """The logical axis names of init_cache's arrays (for shardings on a mesh)."""
    return {f"layer_{i}": {"k": CACHE_AXES, "v": CACHE_AXES} for i in range(cfg.num_layers)}


def positions(index_B, Q: int):
    """Positions of the Q new tokens of each row: index_B[b] + 0 .. Q - 1."""
    return index_B[:, None] + jnp.arange(Q, dtype=index_B.dtype)[None]


def write(layer_cache: dict, k_BxQxKxH, v_BxQxKxH, index_B) -> dict:
    """The layer's cache with each row's new keys and values written from slot index_B[b] on (in place when donated)."""
    def put(cache_SxKxH, new_QxKxH, i):
        return lax.dynamic_update_slice_in_dim(cache_SxKxH, new_QxKxH.astype(cache_SxKxH.dtype), i, axis=0)

    k = constrain(jax.vmap(put)(layer_cache["k"], k_BxQxKxH, index_B), CACHE_AXES)
    v = constrain(jax.vmap(put)(layer_cache["v"], v_BxQxKxH, index_B), CACHE_AXES)
    return {"k": k, "v": v}


def visible(positions_BxQ, S: int, window: int = 0):
    """(B, 1, Q, S) bool: slot s is visible from a query at position p when s <= p (and p - s < window)."""
    slots_S = jnp.arange(S)
    mask = slots_S[None, None, :] <= positions_BxQ[:, :, None]
    if window:
        mask &= slots_S[None, None, :] > positions_BxQ[:, :, None] - window
    return mask[:, None]


__all__ = ["CACHE_AXES", "cache_logical_axes", "init_cache", "kv_shape", "positions", "visible", "write"]
