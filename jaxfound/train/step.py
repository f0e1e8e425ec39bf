"""The pure, sharded train / eval steps over any loss of jaxfound.losses."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.sharding import LOGICAL_RULES, activation_sharding, batch_sharding


def _split_micro(batch: dict, n: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def train_step(state, batch, *, model, tx, loss_fn, seed: int, grad_accum: int = 1, labels=None):
    """One update: (state, batch) -> (state, metrics). Pure; dropout rng is a function of (seed, step).

    labels: params -> 'train' / 'frozen' per leaf (optim.trainable_labels); frozen leaves get no gradient, so no
    weight-gradient product is computed for them.
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def grad_sums(micro, rng):
        def f(params):
            if labels is not None:
                params = jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                                      params, labels(params))
            sums = loss_fn(model, params, micro, rng, True)
            return sums["loss_sum"], sums
        return jax.grad(f, has_aux=True)(state.params)

    if grad_accum == 1:
        grads, sums = grad_sums(batch, rng)
    else:
        def body(carry, xs):
            i, micro = xs
            g, s = grad_sums(micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (g, s)), None
        zeros = jax.tree.map(jnp.zeros_like, (state.params, {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}))
        zeros = (zeros[0], jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zeros[1]))
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), _split_micro(batch, grad_accum)))

    # gradients are sums over the batch's tokens: the mean is a scalar factor applied inside the update, where
    # it fuses into the optimizer's one read of each gradient (scaling them here would write every one out again)
    count = jnp.maximum(sums["count"], 1.0)
    inv_count = 1.0 / count
    loss = sums["loss_sum"] * inv_count
    grad_norm = optax.tree.norm(grads) * inv_count
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state, summed_grads):
        mean_grads = jax.tree.map(lambda g: g * inv_count.astype(g.dtype), summed_grads)
        updates, opt_state = optax.with_extra_args_support(tx).update(mean_grads, opt_state, params,
                                                                      grad_norm=grad_norm)
        return optax.apply_updates(params, updates), opt_state

    # a NaN/inf batch leaves params and optimizer state untouched; the driver decides skip or stop.
    # (lax.cond rather than a jnp.where over every leaf: the select costs a full extra pass and copies)
    new_params, new_opt_state = jax.lax.cond(finite, update, lambda p, o, g: (p, o), state.params, state.opt_state,
                                             grads)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "accuracy": sums["correct"] / count,
        "tokens": sums["count"],
        "grad_norm": grad_norm,
        # after the update: the old params' norm would keep them alive past the in-place update, and XLA copies
        # every parameter (0.44 GB a BERT-base step) to allow it. With frozen leaves (LoRA, freeze=trunk), the norm
        # of the trained ones: the frozen ones never change, and reading them costs a pass over the whole model
        "param_norm": optax.tree.norm(new_params if labels is None else _trained(new_params, labels)),
        "finite": finite,
    }
    return new_state, metrics


def _trained(params, labels) -> list:
    """The leaves labels(params) marks 'train'."""
    return [p for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels(params))) if label == "train"]


def eval_step(params, batch, *, model, loss_fn) -> dict:
    """Sums over one held-out batch (deterministic: no dropout)."""
    return loss_fn(model, params, batch, jax.random.key(0), False)


def _with_rules(fn, mesh):
    """Trace fn under the logical-axis rules and mesh, so activation constraints resolve to mesh axes."""
    def wrapped(*args):
        with activation_sharding(mesh, LOGICAL_RULES):
            return fn(*args)
    return wrapped


def make_train_step(model, tx, loss_fn, mesh, shardings, seed: int, grad_accum: int = 1, labels=None):
    """train_step jitted with in/out shardings over the mesh and the state donated."""
    fn = partial(train_step, model=model, tx=tx, loss_fn=loss_fn, seed=seed, grad_accum=grad_accum, labels=labels)
    replicated = NamedSharding(mesh, P())
    return jax.jit(_with_rules(fn, mesh), in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(model, loss_fn, mesh, param_shardings):
    fn = partial(eval_step, model=model, loss_fn=loss_fn)
    return jax.jit(_with_rules(fn, mesh), in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))
