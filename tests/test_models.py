"""Model properties that must hold: gathered MLM logits, causality, packed documents, dtypes, remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.config import ModelConfig
from jaxfound.models import build_model

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position=32,
                  dropout=0.0)


def _init(cfg, head, L=16):
    model = build_model(cfg, head)
    return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"])


def test_every_param_has_logical_axes():
    model = build_model(CFG, "mlm")
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


def test_mlm_gathered_logits_equal_full_logits_at_those_positions():
    model, params = _init(CFG, "mlm")
    ids = jax.random.randint(jax.random.key(1), (3, 16), 0, 97)
    pos = jnp.array([[0, 5, 9], [1, 2, 15], [7, 7, 3]])
    full = model.apply({"params": params}, ids)
    gathered = model.apply({"params": params}, ids, masked_positions=pos)
    np.testing.assert_allclose(gathered, jnp.take_along_axis(full, pos[..., None], axis=1), atol=1e-5)


def test_sparse_last_layer_is_exact_with_masks_remat_and_gradients():
    """With masked_positions the last layer runs only at those rows: logits and gradients equal the dense path's."""
    ids = jax.random.randint(jax.random.key(6), (2, 16), 0, 97)
    pos = jnp.array([[0, 5, 9, 12], [1, 2, 15, 3]])
    seg = jnp.array([[1] * 7 + [2] * 9, [1] * 12 + [0] * 4])
    am = (seg > 0).astype(jnp.int32)
    for remat, kws in (("none", ({"segment_ids": seg}, {"attention_mask": am})), ("full", ({"segment_ids": seg},))):
        model, params = _init(dataclasses.replace(CFG, remat=remat), "mlm")
        for kw in kws:
            def dense(p, model=model, kw=kw):
                return jnp.take_along_axis(model.apply({"params": p}, ids, **kw), pos[..., None], axis=1)

            def sparse(p, model=model, kw=kw):
                return model.apply({"params": p}, ids, masked_positions=pos, **kw)
            np.testing.assert_allclose(sparse(params), dense(params), atol=1e-5)
            g_dense = jax.grad(lambda p: jnp.sum(jnp.tanh(dense(p))))(params)
            g_sparse = jax.grad(lambda p: jnp.sum(jnp.tanh(sparse(p))))(params)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_sparse, g_dense)


def test_gpt_is_causal():
    cfg = dataclasses.replace(CFG, arch="gpt", activation="gelu_new", layer_norm_eps=1e-5)
    model, params = _init(cfg, "lm")
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
    changed = ids.at[:, 10:].set((ids[:, 10:] + 1) % 97)
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_packed_documents_do_not_attend_across_boundaries():
    model, params = _init(CFG, "none")
    ids = jax.random.randint(jax.random.key(3), (1, 16), 5, 97)
    seg = jnp.array([[1] * 6 + [2] * 10])
    packed = model.apply({"params": params}, ids, segment_ids=seg)
    # the second document alone, at the same absolute positions, sees the same context
    other = ids.at[:, :6].set(0)
    alone = model.apply({"params": params}, other, segment_ids=seg)
    np.testing.assert_allclose(packed[:, 6:], alone[:, 6:], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
    model, params = _init(CFG, "mlm")
    bf16 = build_model(dataclasses.replace(CFG, dtype="bfloat16"), "mlm")
    ids = jax.random.randint(jax.random.key(4), (2, 16), 0, 97)
    a = model.apply({"params": params}, ids)
    b = bf16.apply({"params": params}, ids)
    assert b.dtype == jnp.float32 or b.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(a - b.astype(jnp.float32)))) < 0.1


def test_remat_gives_the_same_gradients():
    model, params = _init(CFG, "mlm")
    remat = build_model(dataclasses.replace(CFG, remat="full"), "mlm")
    ids = jax.random.randint(jax.random.key(5), (2, 16), 0, 97)
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)
    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(remat))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_dropout_rate_mean_and_determinism():
    """16-bit dropout: drops ~rate of the entries, keeps the mean (inverted scaling), same key -> same mask."""
    from jaxfound.models.layers import Dropout, uniform_u16

    x = jnp.ones((64, 32, 257))  # odd width: the last 32-bit word gives one used half
    for rate in (0.1, 0.5):
        y = Dropout(rate).apply({}, x, False, rngs={"dropout": jax.random.key(0)})
        dropped = float(jnp.mean(y == 0))
        assert abs(dropped - rate) < 4 * (rate * (1 - rate) / x.size) ** 0.5 + 1e-4
        assert abs(float(jnp.mean(y)) - 1.0) < 0.01
        kept = np.unique(np.asarray(y[y != 0]))
        np.testing.assert_allclose(kept, 65536 / (65536 - round(rate * 65536)), rtol=1e-6)
        again = Dropout(rate).apply({}, x, False, rngs={"dropout": jax.random.key(0)})
        np.testing.assert_array_equal(y, again)
    np.testing.assert_array_equal(Dropout(0.1).apply({}, x, True), x)
    u = np.asarray(uniform_u16(jax.random.key(1), (1000, 33)), np.float64)
    assert u.shape == (1000, 33) and abs(u.mean() / 65535 - 0.5) < 0.01  # uniform over [0, 65535]


def test_hashed_bits_are_balanced_uncorrelated_and_keyed():
    """Dropout's counter hash: every bit is 1 half the time, neighbouring words and words under different keys are
    uncorrelated, and the same key gives the same words."""
    from jaxfound.models.layers import hashed_bits

    w = np.asarray(hashed_bits(jax.random.key(3), (256, 1024)), np.uint64)
    n = w.size
    bits = (w[..., None] >> np.arange(32, dtype=np.uint64)) & 1
    assert np.all(np.abs(bits.mean(axis=(0, 1)) - 0.5) < 5 * (0.25 / n) ** 0.5)  # each of the 32 bits balanced
    u = w.astype(np.float64).ravel() / 2**32
    for lag in (1, 2, 1024):  # neighbours along a row and down a column
        assert abs(np.corrcoef(u[:-lag], u[lag:])[0, 1]) < 5 / n**0.5
    v = np.asarray(hashed_bits(jax.random.key(4), (256, 1024)), np.float64).ravel() / 2**32
    assert abs(np.corrcoef(u, v)[0, 1]) < 5 / n**0.5
    assert np.mean((u < 0.1) == (v < 0.1)) == pytest.approx(0.1**2 + 0.9**2, abs=5 * (0.18 / n) ** 0.5)
    np.testing.assert_array_equal(np.asarray(hashed_bits(jax.random.key(3), (256, 1024))), w.astype(np.uint32))


def test_lora_dot_equals_the_unmerged_adapter_and_its_gradients():
    """layers.lora_dot (one product with W + s A B, a written-out backward) = x W + s (x A) B and autodiff's gradients
    of that for x, W, A and B (float32, to rounding); with B = 0 it is x W exactly; bf16 operands stay bf16."""
    from jaxfound.models.layers import lora_dot

    kx, kw, ka, kb, kg = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(kx, (4, 8, 48), jnp.float32)  # 32 tokens: bf16 takes the 3-D view transposes
    w = jax.random.normal(kw, (48, 40), jnp.float32)
    a = jax.random.normal(ka, (48, 4), jnp.float32)
    b = jax.random.normal(kb, (4, 40), jnp.float32)
    g = jax.random.normal(kg, (4, 8, 40), jnp.float32)
    scale = 0.75

    def unmerged(x, w, a, b):
        return x @ w + scale * (x @ a) @ b

    def loss(f, *args):
        return jnp.sum(f(*args) * g)

    np.testing.assert_allclose(lora_dot(x, w, a, b, scale), unmerged(x, w, a, b), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(lora_dot(x, w, a, jnp.zeros_like(b), scale), jnp.dot(x, w))
    reference = jax.grad(lambda *p: loss(unmerged, *p), argnums=(0, 1, 2, 3))(x, w, a, b)
    got = jax.jit(jax.grad(lambda *p: loss(lambda *q: lora_dot(*q, scale), *p), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for name, r, o in zip("xWAB", reference, got):
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-4, atol=1e-3, err_msg=name)
    bf = [t.astype(jnp.bfloat16) for t in (x, w, a, b)]
    assert lora_dot(*bf, scale).dtype == jnp.float32
    grads = jax.grad(lambda *p: jnp.sum(lora_dot(*p, scale) * g), argnums=(0, 1, 2, 3))(*bf)
    assert [t.dtype for t in grads] == [jnp.bfloat16] * 4
    for name, r, o in zip("xWAB", reference, grads):  # bf16 operands: to bf16 rounding of the inputs and sums
        err = np.abs(np.asarray(o, np.float32) - np.asarray(r))
        assert np.max(err) <= 0.03 * np.max(np.abs(np.asarray(r))), name


def test_mixed_dot_gradients_equal_autodiff():
    """layers.mixed_dot's backward (the kernel's gradient as one 2-D product over the tokens) = autodiff. float32:
    to float32 rounding. bfloat16 (bf16 operands, float32 accumulation) = autodiff of the same product with float32
    operands: the cotangent it rounds to bf16 is a bf16 value already, and bf16 products are exact in float32, so
    only the summation order differs, and the bf16 results round alike but for sums on a rounding edge."""
    from jaxfound.models.layers import mixed_dot

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    g = jax.random.normal(kg, (4, 8, 40), jnp.float32)  # weights of the loss: a non-trivial cotangent
    for dtype in (jnp.float32, jnp.bfloat16):  # 32 tokens, 48 inputs: bf16 takes the 3-D view transposes
        x = jax.random.normal(kx, (4, 8, 48), jnp.float32).astype(dtype)
        w = jax.random.normal(kw, (48, 40), jnp.float32).astype(dtype)

        def loss(dot, x, w, dtype=dtype):
            return jnp.sum(dot(x, w).astype(dtype).astype(jnp.float32) * g)

        def wide(a, b):
            return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))

        reference = jax.grad(lambda x, w, wide=wide: loss(wide, x, w), argnums=(0, 1))(x, w)
        got = jax.jit(jax.grad(lambda x, w: loss(mixed_dot, x, w), argnums=(0, 1)))(x, w)
        forward = jnp.dot(x, w, preferred_element_type=jnp.float32)
        assert mixed_dot(x, w).dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(mixed_dot(x, w)), np.asarray(forward), rtol=1e-6)
        for r, o in zip(reference, got):
            assert o.dtype == dtype
            r32, o32 = np.asarray(r, np.float32), np.asarray(o, np.float32)
            if dtype == jnp.float32:
                np.testing.assert_allclose(o32, r32, rtol=1e-5, atol=1e-5)
            else:
                assert np.mean(r32 == o32) > 0.97
                np.testing.assert_allclose(o32, r32, rtol=1e-2, atol=1e-2)
