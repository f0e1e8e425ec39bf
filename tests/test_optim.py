"""AdamW: decoupled weight decay masked off biases and norms; warm-up then decay; clipping."""

import jax.numpy as jnp
import numpy as np

from jaxfound.config import TrainConfig
from jaxfound.train.optim import decay_mask, lr_schedule, make_optimizer


def test_decay_mask_skips_biases_and_layernorm():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "ln": {"scale": jnp.ones(2),
              "bias": jnp.ones(2)}, "word": {"embedding": jnp.ones((3, 2))}, "mlm_bias": jnp.ones(3)}
    mask = decay_mask(params)
    assert mask["dense"]["kernel"] and mask["word"]["embedding"]
    assert not mask["dense"]["bias"] and not mask["ln"]["scale"] and not mask["ln"]["bias"] and not mask["mlm_bias"]


def test_schedule_warms_up_then_decays_linearly():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule="linear")
    s = lr_schedule(cfg, 110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_one_adamw_step_matches_hand_computation():
    cfg = TrainConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, b1=0.9, b2=0.999, eps=1e-8,
                      clip_norm=0.0)
    tx = make_optimizer(cfg, 10)
    params = {"w": {"kernel": jnp.array([1.0, -2.0])}, "b": {"bias": jnp.array([3.0])}}
    grads = {"w": {"kernel": jnp.array([0.5, 0.5])}, "b": {"bias": jnp.array([1.0])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # first Adam step: m_hat = g, v_hat = g^2 -> g/(|g|+eps) = sign(g); decay lr*wd*w only on the kernel
    np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * (np.sign([0.5, 0.5]) + 0.5 * np.array([1.0, -2.0])),
                               atol=1e-5)
    np.testing.assert_allclose(updates["b"]["bias"], [-0.1], rtol=1e-5)


def test_global_norm_clipping():
    cfg = TrainConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0, b1=0.0,
                      b2=0.0, eps=0.0)
    tx = make_optimizer(cfg, 10)
    params = {"k": {"kernel": jnp.zeros(2)}}
    updates, _ = tx.update({"k": {"kernel": jnp.array([30.0, 40.0])}}, tx.init(params), params)
    np.testing.assert_allclose(updates["k"]["kernel"], [-1.0, -1.0], rtol=1e-5)  # sign after b1=b2=0
