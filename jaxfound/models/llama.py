"""The Llama decoder family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 — one module, switched by ModelConfig.

RMSNorm before attention and MLP, rotary positions (default, linear or llama3 scaling), grouped-query attention
(num_kv_heads), a SwiGLU MLP without biases, optional q/k/v biases (Qwen2), optional per-head RMSNorm of q and k
(Qwen3), an optional sliding window (Mistral), and an LM head tied to the word embeddings or its own.

Params: ``llama`` (the trunk: word embedding, layer_i/{input_norm, attention/{query, key, value, out, q_norm,
k_norm}, post_attention_norm, mlp/{gate, up, down}}, norm), ``lm_head`` when untied (decode steps on int8 weights may
read attention/qkv and mlp/gate_up instead: the siblings fused by quant.packed.fuse_projections), ``classifier`` for the
token / sequence classification heads. With model.scan_layers the layers are one ``layers`` subtree, every leaf
stacked on a leading axis of size num_layers (models.scan); a KV cache then needs the unrolled layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxfound.models import cache as kv_cache
from jaxfound.models import layers, scan

ACT = ("act_batch", "act_len", "act_embed")


def head_dims(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim)."""
    return cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim or cfg.hidden_size // cfg.num_heads


class LlamaAttention(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, positions_BxL, cache=None, index_B=None):
        cfg = self.cfg
        B, L, _ = h_BxLxD.shape
        N, K, H = head_dims(cfg)

        fused = None
        if not self.is_initializing() and self.has_variable("params", "qkv"):  # decoding form: quant.packed
            fused = layers.dense(cfg, (N + 2 * K) * H, ("embed", "heads"), "qkv", use_bias=cfg.attention_bias)(
                h_BxLxD).reshape(B, L, N + 2 * K, H)
            fused = {"query": fused[:, :, :N], "key": fused[:, :, N:N + K], "value": fused[:, :, N + K:]}

        def project(name, heads):
            if fused is not None:
                x = fused[name]
            else:
                x = layers.dense(cfg, heads * H, ("embed", "heads"), name, use_bias=cfg.attention_bias)(h_BxLxD)
                x = checkpoint_name(x, "qkv").reshape(B, L, heads, H)  # remat names: models.scan.REMAT_POLICIES
            if cfg.qk_norm and name != "value":
                x = layers.rms_norm(cfg, name[0] + "_norm", ("head_dim",))(x)
            return layers.constrain(x, ("act_batch", "act_len", "act_heads", None))

        inv_freq = layers.rope_frequencies(cfg, H)
        q_BxLxNxH = layers.apply_rope(project("query", N), positions_BxL, inv_freq)
        k_BxLxKxH = layers.apply_rope(project("key", K), positions_BxL, inv_freq)
        v_BxLxKxH = project("value", K)
        if cache is not None and index_B is not None:  # a step over a filled cache
            out_BxLxNxH, cache = kv_cache.update_and_attend(q_BxLxNxH, cache, k_BxLxKxH, v_BxLxKxH, index_B,
                                                            cfg.sliding_window)
        else:  # training, or a fresh cache's prefill: the new tokens attend among themselves
            if cache is not None:
                cache = kv_cache.write(cache, k_BxLxKxH, v_BxLxKxH, index_B)
            # the mask already holds causal order and the window; they are repeated for kernels that need them
            out_BxLxNxH = layers.attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask, True, impl=cfg.attention,
                                           window=cfg.sliding_window)
        out_BxLxD = layers.dense(cfg, cfg.hidden_size, ("heads", "embed"), "out", use_bias=False)(
            checkpoint_name(out_BxLxNxH.reshape(B, L, N * H), "attn_out"))
        return out_BxLxD if cache is None else (out_BxLxD, cache)


class SwiGLU(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD):
        cfg = self.cfg
        F = cfg.intermediate_size
        if not self.is_initializing() and self.has_variable("params", "gate_up"):  # decoding form: quant.packed
            gate_up = layers.dense(cfg, 2 * F, ("embed", "mlp"), "gate_up", use_bias=False)(h_BxLxD)
            gate_BxLxF, up_BxLxF = gate_up[..., :F], gate_up[..., F:]
        else:
            gate_BxLxF = checkpoint_name(layers.dense(cfg, F, ("embed", "mlp"), "gate", use_bias=False)(h_BxLxD),
                                         "mlp_up")
            up_BxLxF = checkpoint_name(layers.dense(cfg, F, ("embed", "mlp"), "up", use_bias=False)(h_BxLxD), "mlp_up")
        x_BxLxF = layers.constrain(layers.ACTIVATIONS[cfg.activation](gate_BxLxF) * up_BxLxF,
                                   ("act_batch", "act_len", "act_mlp"))
        return layers.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down", use_bias=False)(
            checkpoint_name(x_BxLxF, "mlp_act"))


class LlamaBlock(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, positions_BxL, deterministic: bool, cache=None, index_B=None):
        cfg = self.cfg
        drop = layers.Dropout(cfg.dropout)
        # names for remat policies: models.scan.REMAT_POLICIES
        x_BxLxD = checkpoint_name(layers.rms_norm(cfg, "input_norm")(h_BxLxD), "attn_in")
        a_BxLxD = LlamaAttention(cfg, name="attention")(x_BxLxD, mask, positions_BxL, cache, index_B)
        if cache is not None:
            a_BxLxD, cache = a_BxLxD
        h_BxLxD = h_BxLxD + drop(a_BxLxD, deterministic=deterministic)
        x_BxLxD = checkpoint_name(layers.rms_norm(cfg, "post_attention_norm")(h_BxLxD), "mlp_in")
        m_BxLxD = SwiGLU(cfg, name="mlp")(x_BxLxD)
        h_BxLxD = layers.constrain(h_BxLxD + drop(m_BxLxD, deterministic=deterministic), ACT)
        return h_BxLxD if cache is None else (h_BxLxD, cache)


def _training_mask(attention_mask_BxL, segment_ids_BxL, L: int, window: int):
    """(B|1, 1, L, L) causal mask with padding, packed documents and the sliding window applied."""
    q_L, k_L = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
    causal_LxL = k_L <= q_L
    if window:
        causal_LxL &= k_L > q_L - window
    mask = layers.attention_mask(attention_mask_BxL, segment_ids_BxL)
    return causal_LxL[None, None] if mask is None else mask & causal_LxL


class LlamaDecoder(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, ids_BxL, attention_mask_BxL=None, segment_ids_BxL=None, deterministic: bool = True,
                 cache=None, index_B=None, positions_BxL=None):
        cfg = self.cfg
        L = ids_BxL.shape[1]
        word = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            name="word")
        h_BxLxD = layers.constrain(layers.Dropout(cfg.dropout)(word(ids_BxL), deterministic=deterministic), ACT)
        if cache is None:
            positions_BxL = jnp.arange(L)[None] if positions_BxL is None else positions_BxL
            mask = _training_mask(attention_mask_BxL, segment_ids_BxL, L, cfg.sliding_window)
        elif index_B is None:  # a fresh cache: rows are right-padded, so causal order alone hides the padding
            positions_BxL, mask = kv_cache.positions(None, L), _training_mask(None, None, L, cfg.sliding_window)
        else:
            positions_BxL, mask = kv_cache.positions(index_B, L), None
        if cfg.scan_layers:
            if cache is not None:
                raise ValueError(scan.CACHE_NEEDS_UNROLLED)
            h_BxLxD, _ = scan.scanned_blocks(LlamaBlock, cfg, cfg.num_layers, (4,), 3, scan.STACKED)(
                h_BxLxD, mask, positions_BxL, deterministic)
            return layers.rms_norm(cfg, "norm")(h_BxLxD)
        block = scan.checkpointed(LlamaBlock, cfg, static_argnums=(4,))
        new_cache = {}
        for i in range(cfg.num_layers):
            name = f"layer_{i}"
            if cache is None:
                h_BxLxD = block(cfg, name=name)(h_BxLxD, mask, positions_BxL, deterministic)
            else:
                h_BxLxD, new_cache[name] = block(cfg, name=name)(h_BxLxD, mask, positions_BxL, deterministic,
                                                                  cache[name], index_B)
        h_BxLxD = layers.rms_norm(cfg, "norm")(h_BxLxD)
        return h_BxLxD if cache is None else (h_BxLxD, new_cache)


class Llama(nn.Module):
    """A Llama-family decoder with a head: 'none' (hidden states), 'lm' (logits), 'token_cls' or 'seq_cls'."""

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
        decoder = LlamaDecoder(cfg, name="llama")
        if cache is not None:
            if self.head != "lm":
                raise ValueError("a KV cache needs the 'lm' head")
            h_BxLxD, cache = decoder(input_ids, attention_mask, segment_ids, deterministic, cache, cache_index)
        else:
            h_BxLxD = decoder(input_ids, attention_mask, segment_ids, deterministic, positions_BxL=positions)
        out = layers.decoder_head(cfg, self.head, h_BxLxD, decoder.variables["params"]["word"],
                                  cfg.tie_embeddings, input_ids, attention_mask, masked_positions, vocab_major)
        return out if cache is None else (out, cache)
