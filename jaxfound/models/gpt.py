"""GPT-2: pre-LayerNorm causal decoder with learned positions and a tied LM head.

Params: ``gpt`` (the trunk: word/position embeddings, layers, final LayerNorm); the LM head is tied
to the word embeddings; ``classifier`` for token / sequence classification heads.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxfound.models import layers

ACT = ("act_batch", "act_len", "act_embed")


class GPTBlock(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, deterministic: bool):
        cfg = self.cfg
        drop = layers.Dropout(cfg.dropout)
        attend = layers.SelfAttention(cfg, causal=True, name="attention")
        a_BxLxD = attend(layers.layer_norm(cfg, "ln_1")(h_BxLxD), mask)
        h_BxLxD = h_BxLxD + drop(a_BxLxD, deterministic=deterministic)
        m_BxLxD = layers.MLP(cfg, name="mlp")(layers.layer_norm(cfg, "ln_2")(h_BxLxD))
        return layers.constrain(h_BxLxD + drop(m_BxLxD, deterministic=deterministic), ACT)


class GPTDecoder(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, ids_BxL, attention_mask_BxL=None, segment_ids_BxL=None, deterministic: bool = True):
        cfg = self.cfg
        L = ids_BxL.shape[1]
        word = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            name="word")
        h_BxLxD = word(ids_BxL) + layers.Embed(
            cfg.max_position, cfg.hidden_size, ("pos", "embed"), cfg.dtype, cfg.param_dtype, name="position"
        )(jnp.arange(L)[None])
        h_BxLxD = layers.constrain(layers.Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic), ACT)
        mask = layers.attention_mask(attention_mask_BxL, segment_ids_BxL)
        block = nn.remat(GPTBlock, static_argnums=(3,)) if cfg.remat else GPTBlock
        for i in range(cfg.num_layers):
            h_BxLxD = block(cfg, name=f"layer_{i}")(h_BxLxD, mask, deterministic)
        return layers.layer_norm(cfg, "ln_f")(h_BxLxD)


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
            logits = layers.tied_logits(h_BxLxD, decoder.variables["params"]["word"]["embedding"], cfg)
            return layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))
        if self.head == "token_cls":
            return layers.dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxLxD).astype(jnp.float32)
        if self.head == "seq_cls":
            # the last real token summarises the sequence in a causal model
            if attention_mask is None:
                last_B = jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
            else:
                last_B = jnp.sum(attention_mask, axis=1) - 1
            h_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
            return layers.dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxD).astype(jnp.float32)
        raise ValueError(f"unknown GPT head {self.head!r}")
