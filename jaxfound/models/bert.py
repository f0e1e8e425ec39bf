"""BERT as in the original: post-LayerNorm encoder, learned positions, token types, GELU; and RoBERTa as its variant.

Params: ``bert`` (or ``roberta``: the shared trunk) plus one head: ``mlm`` (transform + tied decoder + bias),
``classifier`` (token classification) or ``pooler`` + ``classifier`` (sequence classification).
With model.scan_layers, layers 0 .. n-2 are one ``layers`` subtree stacked on a leading axis of size n-1
(models.scan) and the last stays ``layer_{n-1}``: it may compute only the masked rows.

RoBERTa (``cfg.arch == "roberta"``) is the same network with three differences, all here:
- positions count from ``pad_token_id + 1`` over the non-padding tokens (padding sits at ``pad_token_id``), as
  transformers' ``create_position_ids_from_input_ids``; one token type;
- its LM head's activation is always the exact GELU (``RobertaLMHead``), whatever ``activation`` says;
- its classification head reads ``<s>`` through dropout -> dense -> tanh -> dropout -> out_proj (``pooler`` and
  ``classifier`` here), where BERT's pooler has no dropout before it.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxfound.models import scan
from jaxfound.models.layers import (
    ACTIVATIONS,
    DTYPES,
    MLP,
    Dropout,
    Embed,
    SelfAttention,
    attention_mask,
    constrain,
    dense,
    layer_norm,
    tied_logits,
)

ACT = ("act_batch", "act_len", "act_embed")


def position_ids(ids_BxL, cfg, positions_BxL=None):
    """BERT: 0 .. L-1. RoBERTa: pad_token_id + 1, + 2, ... over the non-padding tokens; padding at pad_token_id.
    positions_BxL: each token's position in its own example (packed rows), in BERT's count."""
    if cfg.arch != "roberta":
        return jnp.arange(ids_BxL.shape[1])[None] if positions_BxL is None else positions_BxL
    real_BxL = (ids_BxL != cfg.pad_token_id).astype(jnp.int32)
    if positions_BxL is not None:
        return jnp.where(real_BxL > 0, positions_BxL + cfg.pad_token_id + 1, cfg.pad_token_id)
    return jnp.cumsum(real_BxL, axis=1) * real_BxL + cfg.pad_token_id


class BertLayer(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, h_BxLxD, mask, deterministic: bool, positions_BxP=None):
        """positions_BxP: compute outputs only at these rows (B, P, D); keys and values still use every row."""
        cfg = self.cfg
        drop = Dropout(cfg.dropout)
        h_query = None
        if positions_BxP is not None:
            h_query = jnp.take_along_axis(h_BxLxD, positions_BxP[..., None], axis=1)
            if mask is not None and mask.shape[2] > 1:  # (B, 1, L, L) -> the query rows (B, 1, P, L)
                mask = jnp.take_along_axis(mask, positions_BxP[:, None, :, None], axis=2)
        a_BxLxD = SelfAttention(cfg, name="attention")(h_BxLxD, mask, h_query)
        h_BxLxD = h_BxLxD if h_query is None else h_query
        h_BxLxD = layer_norm(cfg, "attention_ln")(h_BxLxD + drop(a_BxLxD, deterministic=deterministic))
        m_BxLxD = MLP(cfg, name="mlp")(h_BxLxD)
        h_BxLxD = layer_norm(cfg, "mlp_ln")(h_BxLxD + drop(m_BxLxD, deterministic=deterministic))
        return constrain(h_BxLxD, ACT)


class BertEncoder(nn.Module):
    """Embeddings + encoder layers -> last hidden state (B, L, D)."""

    cfg: object

    @nn.compact
    def __call__(self, ids_BxL, attention_mask_BxL=None, token_type_ids_BxL=None, segment_ids_BxL=None,
                 deterministic: bool = True, output_positions_BxP=None, positions_BxL=None):
        """output_positions_BxP: the last layer computes only these rows -> (B, P, D) (exact: no later layer
        reads the others; at 15% masking this skips most of the last layer's work)."""
        cfg = self.cfg
        if token_type_ids_BxL is None:
            token_type_ids_BxL = jnp.zeros_like(ids_BxL)
        h_BxLxD = (
            Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="word")(ids_BxL)
            + Embed(cfg.max_position, cfg.hidden_size, ("pos", "embed"), cfg.dtype, cfg.param_dtype, name="position")(
                position_ids(ids_BxL, cfg, positions_BxL))
            + Embed(cfg.type_vocab_size, cfg.hidden_size, ("types", "embed"), cfg.dtype, cfg.param_dtype,
                    name="token_type")(token_type_ids_BxL)
        )
        h_BxLxD = layer_norm(cfg, "embed_ln")(h_BxLxD)
        h_BxLxD = constrain(Dropout(cfg.dropout)(h_BxLxD, deterministic=deterministic), ACT)
        mask = attention_mask(attention_mask_BxL, segment_ids_BxL)
        block = scan.checkpointed(BertLayer, cfg, static_argnums=(3,))
        scanned = scan.num_scanned(cfg.arch, cfg.num_layers) if cfg.scan_layers else 0
        if scanned:  # layers 0 .. n-2 as one scan; the last may compute fewer rows, so it stays its own module
            h_BxLxD, _ = scan.scanned_blocks(BertLayer, cfg, scanned, (3,), 2, scan.STACKED)(h_BxLxD, mask,
                                                                                               deterministic)
        for i in range(scanned, cfg.num_layers):
            last = i == cfg.num_layers - 1
            h_BxLxD = block(cfg, name=f"layer_{i}")(h_BxLxD, mask, deterministic,
                                                     output_positions_BxP if last else None)
        return h_BxLxD


class Bert(nn.Module):
    """BERT (or RoBERTa) with a head: 'none' (hidden states), 'mlm', 'token_cls' or 'seq_cls' (logits)."""

    cfg: object
    head: str = "mlm"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, segment_ids=None,
                 masked_positions=None, deterministic: bool = True, positions=None):
        """masked_positions (B, P): MLM logits only at those positions (B, P, V), else at all (B, L, V).
        positions (B, L): each token's position in its example (packed rows, with segment_ids)."""
        cfg = self.cfg
        roberta = cfg.arch == "roberta"
        encoder = BertEncoder(cfg, name=cfg.arch)
        mlm_positions = masked_positions if self.head == "mlm" else None
        h_BxLxD = encoder(input_ids, attention_mask, token_type_ids, segment_ids, deterministic, mlm_positions,
                          positions)
        if self.head == "none":
            return h_BxLxD
        if self.head == "mlm":  # with masked_positions, h is already (B, P, D)
            act = ACTIVATIONS["gelu" if roberta else cfg.activation]
            x = act(dense(cfg, cfg.hidden_size, ("embed", "mlp"), "transform")(h_BxLxD))
            x = layer_norm(cfg, "transform_ln")(x)
            logits = tied_logits(x, encoder.variables["params"]["word"]["embedding"], cfg)
            bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                              (cfg.vocab_size,), DTYPES[cfg.param_dtype])
            return constrain(logits + bias, ("act_batch", "act_len", "act_vocab"))
        drop = Dropout(cfg.dropout)
        if self.head == "token_cls":
            h_BxLxD = drop(h_BxLxD, deterministic=deterministic)
            return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(h_BxLxD).astype(jnp.float32)
        if self.head == "seq_cls":
            first_BxD = drop(h_BxLxD[:, 0], deterministic=deterministic) if roberta else h_BxLxD[:, 0]
            pooled_BxD = jnp.tanh(dense(cfg, cfg.hidden_size, ("embed", "mlp"), "pooler")(first_BxD))
            pooled_BxD = drop(pooled_BxD, deterministic=deterministic)
            return dense(cfg, cfg.num_labels, ("embed", "labels"), "classifier")(pooled_BxD).astype(jnp.float32)
        raise ValueError(f"unknown BERT head {self.head!r}")
