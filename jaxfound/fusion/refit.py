"""Head re-fit after a merge: each task's token classifier trained again as a linear probe on the merged trunk's
cached features (the trunk never changes).

    feats = trunk_features(model_cfg, "bert", trunk, split.windows, seq_len, pad_id)   # once per trunk and split
    X_NxD, y_N = labelled_tokens(feats, split.windows.labels)
    history = fit_head(params["classifier"], X_NxD, y_N, RefitConfig())               # the head after each epoch

The probe: softmax cross-entropy on every labelled token, AdamW (lr `lr`, `warmup` of the steps linear warm-up then
linear decay to 0, weight decay, global-norm clip), `batch_tokens` tokens a step, `epochs` passes in an order fixed
by the seed, starting from the head as merged. The driver keeps the epoch (0 = the head as merged) with the best
validation score, so a re-fit never lowers the validation score. Predictions are the argmax of `h @ kernel + bias`
at each token, which is what the whole model computes at evaluation (dropout off).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfound.data import finetune as ftdata
from jaxfound.errors import JaxfoundError
from jaxfound.models import build_model

HEAD_KEY = "classifier"  # the token_cls head: kernel (D, C), bias (C,)


@dataclass(frozen=True)
class RefitConfig:
    """The linear probe's hyper-parameters (recorded on the graph's head_refit_on edge)."""

    lr: float = 1e-2  # peak AdamW learning rate
    epochs: int = 2  # passes over the training tokens
    batch_tokens: int = 512  # labelled tokens per step
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps of linear warm-up
    clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # the token order of each epoch

    def __post_init__(self):
        for name in ("lr", "epochs", "batch_tokens"):
            if not getattr(self, name) > 0:
                raise JaxfoundError(f"refit {name}={getattr(self, name)!r}; it must be > 0")


def token_head(params: dict, where: str = "params") -> dict:
    """The token classifier {kernel (D, C), bias (C,)} of a token_cls model."""
    head = params.get(HEAD_KEY)
    if not isinstance(head, dict) or set(head) != {"kernel", "bias"}:
        raise JaxfoundError(f"{where}: no token classifier '{HEAD_KEY}' {{kernel, bias}} to re-fit (top-level keys "
                            f"{sorted(params)}); --refit-heads works on token_cls models (ner, pos, chunk)")
    return head


@functools.lru_cache(maxsize=8)
def _hidden_fn(model_cfg, trunk_key: str):
    model = build_model(model_cfg, "none")
    return jax.jit(lambda trunk, ids, mask, types: model.apply({"params": {trunk_key: trunk}}, ids, mask, types))


def trunk_features(model_cfg, trunk_key: str, trunk, windows: ftdata.Windows, seq_len: int, pad_id: int,
                   batch_size: int = 64) -> list[np.ndarray]:
    """Per window, the trunk's last hidden states (n, D) at its n tokens (no dropout)."""
    hidden = _hidden_fn(model_cfg, trunk_key)
    feats = [None] * len(windows.input_ids)
    for rows, b in ftdata.eval_batches(windows, batch_size, seq_len, pad_id, True):
        h_BxLxD = np.asarray(hidden(trunk, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
        for j, r in enumerate(rows):
            if r >= 0:
                feats[r] = h_BxLxD[j, :len(windows.input_ids[r])]
    return feats


def labelled_tokens(feats: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(X_NxD, y_N): the features and labels of every labelled token (label >= 0)."""
    X_NxD = np.concatenate([h[lab >= 0] for h, lab in zip(feats, labels)])
    y_N = np.concatenate([lab[lab >= 0] for lab in labels]).astype(np.int32)
    return X_NxD, y_N


def schedule(cfg: RefitConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to cfg.lr over cfg.warmup of the steps (at least one), then linear decay to 0."""
    warm = max(1, int(total_steps * cfg.warmup))
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm),
                                 optax.linear_schedule(cfg.lr, 0.0, max(1, total_steps - warm))], [warm])


def epoch_orders(cfg: RefitConfig, n_tokens: int) -> list[np.ndarray]:
    """Per epoch, the token indices of its steps (S, batch_tokens): a seeded permutation, the remainder dropped."""
    per_epoch = n_tokens // cfg.batch_tokens
    if per_epoch == 0:
        raise JaxfoundError(f"refit: {n_tokens} labelled tokens, fewer than batch_tokens={cfg.batch_tokens}; "
                            "lower batch_tokens or use more training data")
    rng = np.random.default_rng(cfg.seed)
    return [rng.permutation(n_tokens)[:per_epoch * cfg.batch_tokens].reshape(per_epoch, cfg.batch_tokens)
            for _ in range(cfg.epochs)]


def _optimizer(cfg: RefitConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(schedule(cfg, total_steps), weight_decay=cfg.weight_decay))


@functools.lru_cache(maxsize=8)
def _epoch_fn(cfg: RefitConfig, total_steps: int):
    """One jitted pass over an epoch's steps (compiled once per config and data shape, not per re-fit)."""
    tx = _optimizer(cfg, total_steps)

    def loss(p, X_NxD, y_N, idx_B):
        logits_BxC = X_NxD[idx_B] @ p["kernel"] + p["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_N[idx_B]).mean()

    @jax.jit
    def epoch(p, opt, X_NxD, y_N, order_SxB):
        def step(carry, idx_B):
            p, opt = carry
            updates, opt = tx.update(jax.grad(loss)(p, X_NxD, y_N, idx_B), opt, p)
            return (optax.apply_updates(p, updates), opt), None
        return jax.lax.scan(step, (p, opt), order_SxB)[0]
    return epoch


def fit_head(head: dict, X_NxD: np.ndarray, y_N: np.ndarray, cfg: RefitConfig = RefitConfig()) -> list[dict]:
    """The head after 0, 1, ..., cfg.epochs passes of AdamW over (X, y) (softmax cross-entropy, mean per step)."""
    orders = epoch_orders(cfg, len(y_N))
    total = cfg.epochs * len(orders[0])
    epoch = _epoch_fn(cfg, total)
    X, y = jnp.asarray(X_NxD, jnp.float32), jnp.asarray(y_N)
    p = {"kernel": jnp.asarray(head["kernel"], jnp.float32), "bias": jnp.asarray(head["bias"], jnp.float32)}
    opt, history = _optimizer(cfg, total).init(p), [p]
    for order_SxB in orders:
        p, opt = epoch(p, opt, X, y, order_SxB)
        history.append(p)
    return [jax.device_get(h) for h in history]


def predict(feats: Sequence[np.ndarray], head: dict) -> list[np.ndarray]:
    """Per window, the argmax label id of each token."""
    W_DxC, b_C = np.asarray(head["kernel"]), np.asarray(head["bias"])
    return [np.argmax(h @ W_DxC + b_C, -1) for h in feats]
