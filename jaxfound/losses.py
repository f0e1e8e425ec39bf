"""Losses per task: each returns sums (loss_sum, count, correct) rather than means, so that gradient accumulation
and evaluation over many batches weight every token exactly once."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _rngs(rng, train: bool) -> dict:
    """Dropout keys while training only: a Dense's LoRA dropout applies when a 'dropout' rng is given."""
    return {"dropout": rng} if train else {}


def _sums(logits, labels, weights) -> dict:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * weights), "count": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


def mlm_loss(model, params, batch, rng, train: bool) -> dict:
    """Masked LM: vocabulary logits only at the (B, P) masked positions."""
    logits_BxPxV = model.apply(
        {"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
        masked_positions=batch["mlm_positions"], deterministic=not train, rngs=_rngs(rng, train),
    )
    return _sums(logits_BxPxV, batch["mlm_labels"], batch["mlm_weights"])


def clm_loss(model, params, batch, rng, train: bool) -> dict:
    """Causal LM: predict token t+1 from tokens <= t, never across a document boundary."""
    ids_BxL, seg_BxL = batch["input_ids"], batch["segment_ids"]
    logits_BxLxV = model.apply({"params": params}, ids_BxL, segment_ids=seg_BxL, deterministic=not train,
                               rngs=_rngs(rng, train))
    weights = (seg_BxL[:, 1:] == seg_BxL[:, :-1]) & (seg_BxL[:, 1:] > 0)
    return _sums(logits_BxLxV[:, :-1], ids_BxL[:, 1:], weights)


def token_cls_loss(model, params, batch, rng, train: bool) -> dict:
    """Token classification: labels -100 (padding, non-first subwords) are ignored. A packed batch (segment_ids,
    positions: several windows per row) attends and counts positions within each window."""
    if "segment_ids" in batch:
        logits_BxLxC = model.apply({"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
                                   positions=batch["positions"], deterministic=not train, rngs=_rngs(rng, train))
    else:
        logits_BxLxC = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                   batch.get("token_type_ids"), deterministic=not train, rngs=_rngs(rng, train))
    labels = batch["labels"]
    return _sums(logits_BxLxC, labels, labels >= 0)


def seq_cls_loss(model, params, batch, rng, train: bool) -> dict:
    logits_BxC = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                             batch.get("token_type_ids"), deterministic=not train, rngs=_rngs(rng, train))
    labels = batch["labels"]
    return _sums(logits_BxC, labels, labels >= 0)


def sft_loss(model, params, batch, rng, train: bool) -> dict:
    """Instruction tuning on packed rows (data.sft.pack): next-token loss where loss_mask says (assistant or
    completion tokens), attention and positions reset per example."""
    logits_BxLxV = model.apply({"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"], deterministic=not train, rngs=_rngs(rng, train))
    return _sums(logits_BxLxV, batch["targets"], batch["loss_mask"])
