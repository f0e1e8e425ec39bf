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


def test_clip_by_global_norm_matches_optax_with_and_without_a_given_norm():
    import jax
    import optax

    from jaxfound.train.optim import clip_by_global_norm

    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.asarray(rng.standard_normal(5))}
    for max_norm in (0.1, 1.0, 100.0):  # clipped hard, clipped a little (norm ~4.2), not clipped
        want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
        ours = clip_by_global_norm(max_norm)
        got, state = ours.update(tree, ours.init(tree))
        given, _ = ours.update(tree, state, grad_norm=optax.tree.norm(tree))
        assert state == optax.EmptyState()
        for g in (got, given):
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), g, want)
    zeros = jax.tree.map(jnp.zeros_like, tree)  # norm 0: min(1, max/0) = 1, no NaN
    got, _ = clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(got))


def test_train_step_equals_mean_gradients_through_optax_clip_and_adamw():
    """The train step's update (token-mean gradient as a scalar factor inside the update, the norm passed to the
    clip) against the textbook order: mean loss -> jax.grad -> optax.clip_by_global_norm -> optax.adamw."""
    import jax
    import optax

    from jaxfound.config import ModelConfig
    from jaxfound.losses import mlm_loss
    from jaxfound.models import build_model
    from jaxfound.train.optim import decay_mask
    from jaxfound.train.state import TrainState
    from jaxfound.train.step import train_step

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position=16, dropout=0.0)
    model = build_model(cfg, "mlm")
    rng = np.random.default_rng(1)
    batch = {"input_ids": rng.integers(5, 64, (4, 16)).astype(np.int32),
             "segment_ids": np.ones((4, 16), np.int32),
             "mlm_positions": np.sort(rng.choice(16, (4, 3)), axis=1).astype(np.int32),
             "mlm_labels": rng.integers(5, 64, (4, 3)).astype(np.int32),
             "mlm_weights": np.array([[1, 1, 0]] * 4, np.float32)}  # 8 predicted tokens: the mean divides by 8
    params = model.init(jax.random.key(0), batch["input_ids"], segment_ids=batch["segment_ids"],
                        masked_positions=batch["mlm_positions"])["params"]
    # eps near the gradients' size: Adam's first step g / (|g| + eps) then depends on the clip and the 1/count
    # scale (with a tiny eps it would be ~sign(g), blind to both)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=0.05, eps=1e-3)
    tx = make_optimizer(tcfg, 10)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_steps=jnp.int32(0))
    new_state, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, loss_fn=mlm_loss, seed=0))(
        state, batch)

    def mean_loss(p):
        sums = mlm_loss(model, p, batch, jax.random.key(0), True)
        return sums["loss_sum"] / sums["count"]
    grads = jax.grad(mean_loss)(params)
    ref_tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                                                                      weight_decay=0.1, mask=decay_mask))
    updates, _ = ref_tx.update(grads, ref_tx.init(params), params)
    want = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert float(metrics["grad_norm"]) > 0.05  # the clip is active
    np.testing.assert_allclose(metrics["param_norm"], optax.tree.norm(want), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), new_state.params, want)

    # with frozen leaves param_norm is the trained leaves' norm, by hand (here the kernels train, the rest is frozen)
    def kernels(p):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if "'kernel'" in jax.tree_util.keystr(path) else "frozen", p)
    frozen_state, frozen_metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, loss_fn=mlm_loss, seed=0,
                                                                   labels=kernels))(state, batch)
    labels = jax.tree.leaves(kernels(params))
    trained = [p for p, label in zip(jax.tree.leaves(frozen_state.params), labels) if label == "train"]
    assert 0 < len(trained) < len(labels)
    by_hand = np.sqrt(sum(np.sum(np.square(np.asarray(p, np.float64))) for p in trained))
    np.testing.assert_allclose(frozen_metrics["param_norm"], by_hand, rtol=1e-5)
