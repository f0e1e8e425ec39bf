"""GPT-2: pre-LayerNorm causal decoder with learned positions and a tied LM head.

Params: ``gpt`` (the trunk: word/position embeddings, layer_i, final LayerNorm); the LM head is tied
to the word embeddings; ``classifier`` for token / sequence classification heads. With model.scan_layers the layers
are one ``layers`` subtree stacked on a leading axis of size num_layers (models.scan); a KV cache then needs the
unrolled layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxfound.models import cache as kv_cache
from jaxfound.models import layers, scan

ACT = ("act_batch", "act_len", "act_embed")


class GPTBlock(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, deterministic: bool, cache=None, index_B=None):
        cfg = self.cfg
        drop = layers.Dropout(cfg.dropout)
        attend = layers.SelfAttention(cfg, causal=True, name="attention")
        # names for remat policies: models.scan.REMAT_POLICIES
        x_BxLxD = checkpoint_name(layers.layer_norm(cfg, "ln_1")(h_BxLxD), "attn_in")
        a_BxLxD = attend(x_BxLxD, mask, cache=cache, index_B=index_B)
        if cache is not None:
            a_BxLxD, cache = a_BxLxD
        h_BxLxD = h_BxLxD + drop(a_BxLxD, deterministic=deterministic)
        x_BxLxD = checkpoint_name(layers.layer_norm(cfg, "ln_2")(h_BxLxD), "mlp_in")
        m_BxLxD = layers.MLP(cfg, name="mlp")(x_BxLxD)
        h_BxLxD = layers.constrain(h_BxLxD + drop(m_BxLxD, deterministic=deterministic), ACT)
        return h_BxLxD if cache is None else (h_BxLxD, cache)


class GPTDecoder(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, ids_BxL, attention_mask_BxL=None, segment_ids_BxL=None, deterministic: bool = True,
                 cache=None, index_B=None, positions_BxL=None):
        cfg = self.cfg
        L = ids_BxL.shape[1]
        word = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            name="word")
        if cache is not None:
            positions = kv_cache.positions(index_B, L)
        else:
            positions = jnp.arange(L)[None] if positions_BxL is None else positions_BxL
        h_BxLxD = word(ids_BxL) + layers.Embed(
            cfg.max_position, cfg.hidden_size, ("pos", "embed"), cfg.dtype, cfg.param_dtype, name="position"
        )(positions)
        h_BxLxD = layers.constrain(layers.Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic), ACT)
        mask = layers.attention_mask(attention_mask_BxL, segment_ids_BxL)
        if cfg.scan_layers:
            if cache is not None:
                raise ValueError(scan.CACHE_NEEDS_UNROLLED)
            h_BxLxD, _ = scan.scanned_blocks(GPTBlock, cfg, cfg.num_layers, (3,), 2, scan.STACKED)(
                h_BxLxD, mask, deterministic)
            return layers.layer_norm(cfg, "ln_f")(h_BxLxD)
        block = scan.checkpointed(GPTBlock, cfg, static_argnums=(3,))
        new_cache = {}
        for i in range(cfg.num_layers):
            name = f"layer_{i}"
            if cache is None:
                h_BxLxD = block(cfg, name=name)(h_BxLxD, mask, deterministic)
            else:
                h_BxLxD, new_cache[name] = block(cfg, name=name)(h_BxLxD, mask, deterministic, cache[name], index_B)
        h_BxLxD = layers.layer_norm(cfg, "ln_f")(h_BxLxD)
        return h_BxLxD if cache is None else (h_BxLxD, new_cache)


class GPT(nn.Module):
    """GPT-2 with a head: 'none' (hidden states), 'lm' (tied logits), 'token_cls' or 'seq_cls'."""

    cfg: object
    head: str = "lm"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, segment_ids=None,
                 masked_positions=None, deterministic: bool = True, cache=None, cache_index=None,
                 vocab_major: bool = False, positions=None):
        """cache / cache_index (B,): decode over a KV cache (models.cache); returns (logits, new cache). cache_index
        None: the cache is fresh (prefill from slot 0; the rows' padding is on the right).
        masked_positions (B, P): LM logits only at those positions. vocab_major: LM logits as (V, B * P) (see
        layers.tied_logits). positions (B, L): token positions (default 0..L-1; packed rows reset them per example)."""
        cfg = self.cfg
        decoder = GPTDecoder(cfg, name="gpt")
        if cache is not None:
            if self.head != "lm":
                raise ValueError("a KV cache needs the 'lm' head")
            h_BxLxD, cache = decoder(input_ids, attention_mask, segment_ids, deterministic, cache, cache_index)
        else:
            h_BxLxD = decoder(input_ids, attention_mask, segment_ids, deterministic, positions_BxL=positions)
        out = layers.decoder_head(cfg, self.head, h_BxLxD, decoder.variables["params"]["word"],
                                  True, input_ids, attention_mask, masked_positions, vocab_major)
        return out if cache is None else (out, cache)
