"""Every attention kernel that runs on CPU against a float64 numpy reference: the XLA einsum form,
jax.nn.dot_product_attention's XLA implementation, and the Pallas splash kernel in interpreter mode (the kernel TPUs
run), with padding, packed documents, causal and sliding-window masks, MHA and grouped-query heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfound.models.attention import attention, splash_applies
from jaxfound.models.layers import attention_mask

B, L, H = 2, 128, 32  # splash tiles the sequence in blocks of 128


def reference(q, k, v, segments, causal, window):
    """softmax(q k^T / sqrt(H) over the keys a query may see) v, in float64, per query head."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    N, K = q.shape[2], k.shape[2]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T / np.sqrt(q.shape[-1])
            i, j = np.arange(L)[:, None], np.arange(L)[None, :]
            seen = (segments[b][:, None] == segments[b][None, :]) & (segments[b][None, :] > 0)
            if causal:
                seen &= j <= i
            if window:
                seen &= j > i - window
            logits = np.where(seen, logits, -1e300)  # padding rows see nothing: finite, and never compared
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, kv]
    return out


def _segments():
    """Row 0: two packed documents then padding; row 1: one document then padding."""
    seg = np.zeros((B, L), np.int32)
    seg[0, :50], seg[0, 50:100] = 1, 2
    seg[1, :77] = 1
    return seg


def _dense_mask(seg, causal, window):
    mask = attention_mask(None, jnp.asarray(seg))
    if window:
        i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
        mask = mask & (j > i - window)
    return mask


CASES = [(4, 4, False, 0), (4, 4, True, 0), (6, 2, True, 0), (4, 1, True, 16), (6, 3, False, 0)]


@pytest.mark.parametrize(("N", "K", "causal", "window"), CASES)
@pytest.mark.parametrize("impl", ["xla", "dot_product", "splash", "auto"])
def test_attention_kernel_matches_reference(impl, N, K, causal, window):
    rng = np.random.default_rng(N * 10 + K + window)
    q = rng.standard_normal((B, L, N, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, L, K, H)).astype(np.float32) for _ in range(2))
    seg = _segments()
    mask = _dense_mask(seg, causal, window)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, causal, impl=impl,
                    segment_ids_BxL=jnp.asarray(seg), window=window, interpret=True)
    real = seg > 0  # padding rows are nobody's output
    diff = np.abs(np.asarray(out, np.float64) - reference(q, k, v, seg, causal, window))[real].max()
    print(f"{impl} N={N} K={K} causal={causal} window={window}: max|diff| {diff:.2e}")
    assert diff < 2e-5


def test_splash_gradients_match_the_xla_form():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, L, 2, H)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(_segments()[:1])
    mask = _dense_mask(np.asarray(seg), True, 0)
    w = jnp.asarray(rng.standard_normal((1, L, 2, H)), jnp.float32) * (seg > 0)[..., None, None]

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * attention(q, k, v, mask, True, impl=impl, segment_ids_BxL=seg,
                                                     interpret=True))
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_splash = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_xla, g_splash):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_splash_falls_back_where_its_tiling_does_not_apply():
    q = jnp.ones((1, 40, 2, 8))
    assert not splash_applies(q, q) and splash_applies(jnp.ones((1, 256, 2, 8)), jnp.ones((1, 256, 2, 8)))
    out = attention(q, q, q, None, True, impl="splash")
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q, q, q, None, True)), atol=1e-6)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="attention implementation 'flash'; choose one of auto, xla"):
        attention(jnp.ones((1, 4, 1, 2)), jnp.ones((1, 4, 1, 2)), jnp.ones((1, 4, 1, 2)), impl="flash")


@pytest.mark.parametrize("kind", ["padding", "packed", "packed_causal", "causal_window"])
def test_segments_read_off_a_dense_mask_give_back_the_same_mask(kind):
    from jaxfound.models.attention import segments_from_mask

    seg = jnp.asarray(_segments())
    i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    mask = {"padding": attention_mask(seg > 0, None), "packed": attention_mask(None, seg),
            "packed_causal": attention_mask(None, seg) & (j <= i),
            "causal_window": jnp.broadcast_to((j <= i) & (j > i - 8), (1, 1, L, L))}[kind]
    got = segments_from_mask(mask, B, L)
    expect = {"padding": (seg > 0).astype(jnp.int32), "causal_window": jnp.ones((B, L), jnp.int32)}.get(kind, seg)
    rebuilt = attention_mask(None, got)
    assert bool(jnp.all(rebuilt == attention_mask(None, expect)))


@pytest.mark.parametrize("arch", ["bert", "gpt", "llama"])
def test_models_give_the_same_logits_with_every_cpu_kernel(arch):
    import dataclasses

    import flax.linen as nn

    from jaxfound.config import ModelConfig
    from jaxfound.models import build_model

    cfg = ModelConfig(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2 if arch == "llama" else 0, intermediate_size=48, max_position=L, dropout=0.0,
                      activation="silu" if arch == "llama" else "gelu", sliding_window=16 if arch == "llama" else 0)
    head = "mlm" if arch == "bert" else "lm"
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 97, (B, L)), jnp.int32)
    seg = jnp.asarray(_segments())
    params = nn.unbox(build_model(cfg, head).init(jax.random.key(0), ids)["params"])
    out = {impl: np.asarray(build_model(dataclasses.replace(cfg, attention=impl), head).apply(
        {"params": params}, ids, segment_ids=seg)) for impl in ("xla", "dot_product", "auto")}
    real = np.asarray(seg) > 0
    for impl in ("dot_product", "auto"):
        assert np.abs(out[impl] - out["xla"])[real].max() < 1e-4, impl


def test_asking_for_cudnn_without_a_gpu_says_so():
    x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention=cudnn: .*needs a CUDA GPU with cuDNN"):
        attention(x, x, x, impl="cudnn")
