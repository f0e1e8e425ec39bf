"""GPT-2: pre-LayerNorm causal decoder with learned positions and a tied LM head.

Params: ``gpt`` (the trunk: word/position embeddings, layers, final LayerNorm); the LM head is tied
to the word embeddings; ``classifier`` for token / sequence classification heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxfound.models.layers import (
    DTYPES,
    MLP,
    Dropout,
    Embed,
    SelfAttention,
    attention_mask,
    constrain,
    dense,
    layer_norm,
)

ACT = ("act_batch", "act_len", "act_embed")


class GPTBlock(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, deterministic: bool):
        cfg = self.cfg
        drop = Dropout(cfg.dropout)
        a_BxLxD = SelfAttention(cfg, causal=True, name="attention")(layer_norm(cfg, "ln_1")(h_BxLxD), mask)
        h_BxLxD = h_BxLxD + drop(a_BxLxD, deterministic=deterministic)
        m_BxLxD = MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(h_BxLxD))
        return constrain(h_BxLxD + drop(m_BxLxD, deterministic=deterministic), ACT)


class GPTDecoder(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, ids_BxL, attention_mask_BxL=None, segment_ids_BxL=None, deterministic: bool = True):
        cfg = self.cfg
        L = ids_BxL.shape[1]
        word = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="word")
        h_BxLxD = word(ids_BxL) + Embed(
            cfg.max_position, cfg.hidden_size, ("pos", "embed"), cfg.dtype, cfg.param_dtype, name="position"
        )(jnp.arange(L)[None])
        h_BxLxD = constrain(Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic), ACT)
        mask = attention_mask(attention_mask_BxL, segment_ids_BxL)
        block = nn.remat(GPTBlock, static_argnums=(3,)) if cfg.remat else GPTBlock
        for i in range(cfg.num_layers):
            h_BxLxD = block(cfg, name=f"layer_{i}")(h_BxLxD, mask, deterministic)
        return layer_norm(cfg, "ln_f")(h_BxLxD)


class GPT(nn.Module):
    """GPT-2 with a head: 'none' (hidden states), 'lm' (tied logits), 'token_cls' or 'seq_cls'."""

    cfg: object
    head: str = "lm"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, segment_ids=None,
                 masked_positions=None, deterministic: bool = True):
        cfg = self.cfg
        decoder = GPTDecoder(cfg, name="gpt")
        h_BxLxD = decoder(input_ids, attention_mask, segment_ids, deterministic)
        if self.head == "none":
            return h_BxLxD
        if self.head == "lm":
            word = nn.unbox(decoder.variables["params"]["word"]["embedding"])
            dtype = DTYPES[cfg.dtype]
            logits = jnp.dot(h_BxLxD.astype(dtype), word.astype(dtype).T, preferred_element_type=jnp.float32)
            return constrain(logits, ("act_batch", "act_len", "act_vocab"))
        if self.head == "token_cls":
            return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxLxD).astype(jnp.float32)
        if self.head == "seq_cls":
            # the last real token summarises the sequence in a causal model
            if attention_mask is None:
                last_B = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
            else:
                last_B = jnp.sum(attention_mask, axis=1) - 1
            h_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
            return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxD).astype(jnp.float32)
        raise ValueError(f"unknown GPT head {self.head!r}")
