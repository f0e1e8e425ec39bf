"""The native decode attention kernel (models/decode_attention.cc) against the same step as XLA ops (cache.write then
cache.attend): the written caches bit for bit, the outputs to float rounding; every row index case (slot 0, the
middle, the last slots, past the end: clamped as lax.dynamic_update_slice clamps), Q = 1 and Q > 1, grouped-query
heads, a sliding window, in place under donation. It needs only AVX2 + FMA, so it runs on both CPU families."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.models import cache as kv_cache
from jaxfound.models import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"no native decode attention here: "
                                                                f"{native.why_unavailable()}")


def xla_step(q, k_cache, v_cache, k_new, v_new, index, window):
    cache = kv_cache.write({"k": k_cache, "v": v_cache}, k_new, v_new, index)
    mask = kv_cache.visible(kv_cache.positions(index, q.shape[1]), k_cache.shape[2], window)
    return kv_cache.attend(q, cache, mask), cache["k"], cache["v"]


def native_step(q, k_cache, v_cache, k_new, v_new, index, window):
    return native.decode_attention(q, k_new, v_new, k_cache, v_cache, index, window)


@pytest.mark.parametrize("B, Q, N, K, H, S, window", [
    (1, 1, 9, 3, 64, 40, 0),   # SmolLM2's heads
    (5, 1, 4, 4, 16, 24, 0),   # multi-head (no grouping), several rows
    (3, 3, 6, 2, 12, 20, 0),   # several new tokens per row, head dim not a multiple of 8
    (4, 1, 8, 2, 32, 30, 5),   # sliding window
    (2, 2, 2, 1, 8, 9, 3),
])
def test_native_step_equals_xla_ops(B, Q, N, K, H, S, window):
    rng = np.random.default_rng(B * 100 + Q * 10 + window)
    q = jnp.asarray(rng.normal(size=(B, Q, N, H)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.normal(size=(B, Q, K, H)), jnp.float32) for _ in range(2))
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32) for _ in range(2))
    # rows at slot 0, in the middle, at the last slots, and past the end (the write clamps; every slot is visible)
    index = jnp.asarray([0, S // 2, S - Q, S + 3, 1][:B], jnp.int32)
    want = jax.jit(xla_step, static_argnums=6)(q, k_cache, v_cache, k_new, v_new, index, window)
    got = jax.jit(native_step, static_argnums=6)(q, k_cache, v_cache, k_new, v_new, index, window)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_donated_cache_is_updated_in_place_and_steps_chain():
    rng = np.random.default_rng(7)
    B, N, K, H, S = 2, 6, 3, 16, 12
    step = jax.jit(native_step, static_argnums=6, donate_argnums=(1, 2))
    ref = jax.jit(xla_step, static_argnums=6)
    caches = [jnp.zeros((B, K, S, H), jnp.float32) for _ in range(4)]
    index = jnp.asarray([0, 4], jnp.int32)
    for _ in range(6):  # six decode steps: each reads what the steps before it wrote
        q = jnp.asarray(rng.normal(size=(B, 1, N, H)), jnp.float32)
        k_new, v_new = (jnp.asarray(rng.normal(size=(B, 1, K, H)), jnp.float32) for _ in range(2))
        want, caches[2], caches[3] = ref(q, caches[2], caches[3], k_new, v_new, index, 0)
        pointer = caches[0].unsafe_buffer_pointer()
        got, caches[0], caches[1] = step(q, caches[0], caches[1], k_new, v_new, index, 0)
        assert caches[0].unsafe_buffer_pointer() == pointer  # written where it was
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        index = index + 1
    np.testing.assert_array_equal(np.asarray(caches[0]), np.asarray(caches[2]))


def test_update_and_attend_uses_xla_ops_for_bfloat16_and_agrees_with_them():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.normal(size=(2, 1, 2, 8)), jnp.float32) for _ in range(2))
    cache = {"k": jnp.asarray(rng.normal(size=(2, 2, 10, 8)), jnp.float32),
             "v": jnp.asarray(rng.normal(size=(2, 2, 10, 8)), jnp.float32)}
    index = jnp.asarray([3, 9], jnp.int32)
    out, new = jax.jit(kv_cache.update_and_attend)(q, cache, k_new, v_new, index)
    want = xla_step(q, cache["k"], cache["v"], k_new, v_new, index, 0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new["v"]), np.asarray(want[2]))
    lowered = jax.jit(kv_cache.update_and_attend).lower(q, cache, k_new, v_new, index).as_text()
    assert native.TARGET in lowered  # the float32 cache on CPU: the native kernel
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), cache)
    lowered = jax.jit(kv_cache.update_and_attend).lower(q, bf16, k_new, v_new, index).as_text()
    assert native.TARGET not in lowered
