"""AdamW with decoupled weight decay (not on biases and LayerNorms), warm-up + decay, clipping."""

from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("bias", "scale", "mlm_bias")  # LayerNorm scale/bias and every bias


def decay_mask(params):
    """True where weight decay applies: matrices and embeddings, not biases and norm parameters."""
    def keep(path, _):
        return getattr(path[-1], "key", None) not in NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(keep, params)


def lr_schedule(train_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up to train.lr, then linear or cosine decay to 0 at total_steps (or constant)."""
    warmup = int(train_cfg.warmup_ratio * total_steps) if train_cfg.warmup_ratio > 0 else train_cfg.warmup_steps
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if train_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(train_cfg.lr, decay_steps)
    elif train_cfg.schedule == "linear":
        decay = optax.linear_schedule(train_cfg.lr, 0.0, decay_steps)
    else:
        decay = optax.constant_schedule(train_cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.lr, warmup), decay], [warmup])


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping -> AdamW (decoupled decay masked off biases and norms)."""
    adamw = optax.adamw(
        lr_schedule(train_cfg, total_steps),
        b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
        weight_decay=train_cfg.weight_decay, mask=decay_mask,
    )
    if train_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), adamw)
    return adamw
