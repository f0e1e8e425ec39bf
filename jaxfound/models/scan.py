"""Scanned layers (model.scan_layers): one block compiled once and run by nn.scan over params stacked on a leading
'layers' axis; and the exact conversion of params trees between that layout and the unrolled one.

    unrolled: {'gpt': {'layer_0': {...}, ..., 'layer_11': {...}, 'ln_f': ...}}
    scanned:  {'gpt': {'layers': {...every leaf (12, ...)}, 'ln_f': ...}}

BERT and RoBERTa keep their last layer unscanned under its own name 'layer_{n-1}' (with masked positions it computes
only those rows, a shape the other layers do not have): their 'layers' stacks layers 0 .. n-2.
The conversions take any tree shaped like the params (a checkpoint's params, an optimizer moment).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STACKED = "layers"  # the scanned trunk's subtree, and the logical name of its leading axis
LAST_UNSCANNED = ("bert", "roberta")  # trunks whose last layer stays its own module
CACHE_NEEDS_UNROLLED = ("a KV cache needs unrolled layers: decode with model.scan_layers=false and "
                        "jaxfound.models.scan.unstack_layers(params) (runs.open_run does both)")
# Activations a block names for remat policies (jax.ad_checkpoint.checkpoint_name), each (batch, len, features):
#   attn_in / mlp_in    the normed input of the attention / MLP sublayer (the decoder blocks tag them)
#   qkv                 the query, key and value projections      (layers.SelfAttention, llama.LlamaAttention)
#   attn_out            the attention kernel's output, the input of the out-projection
#   mlp_up              the MLP's up (and gate) projection, before the activation  (layers.MLP, llama.SwiGLU)
#   mlp_act             the activated MLP hidden, the input of the down-projection
_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {  # model.remat -> what a rematerialised block saves for the backward pass (None: nothing)
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # bf16 activations by name: the backward recomputes the norms' and the activation's elementwise work only
    "save_activations": _save("attn_in", "qkv", "attn_out", "mlp_in", "mlp_up", "mlp_act"),
    # the projections' outputs only: the backward recomputes the norms and the activation, no product but the
    # attention kernel's forward
    "save_projections": _save("qkv", "attn_out", "mlp_up"),
}


def num_scanned(trunk: str, num_layers: int) -> int:
    """How many of a trunk's layers the scan runs ('bert', 'roberta': all but the last)."""
    return num_layers - 1 if trunk in LAST_UNSCANNED else num_layers


def checkpointed(block_cls, cfg, static_argnums: tuple[int, ...]):
    """block_cls rematerialised in the backward pass as cfg.remat says; the class itself for 'none'.
    static_argnums count self as 0, as nn.remat does."""
    if cfg.remat == "none":
        return block_cls
    # inside a scan the loop already keeps XLA from merging the recomputation into the forward pass
    return nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat], static_argnums=static_argnums,
                    prevent_cse=not cfg.scan_layers)


def _carried(block_cls):
    """block_cls with the (carry, output) signature nn.scan needs: h -> (h, None)."""

    class Carried(block_cls):
        def __call__(self, h, *args):
            return block_cls.__call__(self, h, *args), None

    Carried.__name__ = Carried.__qualname__ = block_cls.__name__
    return Carried


def scanned_blocks(block_cls, cfg, length: int, static_argnums: tuple[int, ...], num_broadcast: int, name: str):
    """length blocks as one nn.scan module: the hidden state is the carry, the next num_broadcast arguments (mask,
    positions, deterministic) are the same for every layer, params and dropout keys differ per layer."""
    scan = nn.scan(checkpointed(_carried(block_cls), cfg, static_argnums), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * num_broadcast,
                   length=length, metadata_params={nn.PARTITION_NAME: STACKED})
    return scan(cfg, name=name)


def is_scanned(params: Mapping) -> bool:
    """Whether a params tree holds a trunk in the scanned layout."""
    return any(isinstance(t, Mapping) and STACKED in t for t in params.values())


def _stack(*xs):
    return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def stack_layers(params: Mapping, num_layers: int) -> dict:
    """Unrolled -> scanned: each trunk's layer_0 .. layer_{k-1} become one 'layers' subtree with a leading axis of
    size k (k = num_layers, or num_layers - 1 for BERT / RoBERTa); heads and a scanned trunk pass through."""
    out = dict(params)
    for key, trunk in params.items():
        if not isinstance(trunk, Mapping) or "layer_0" not in trunk:
            continue
        names = [f"layer_{i}" for i in range(num_scanned(key, num_layers))]
        if f"layer_{num_layers - 1}" not in trunk or f"layer_{num_layers}" in trunk:
            have = sum(k.startswith("layer_") for k in trunk)
            raise ValueError(f"params '{key}' have {have} layers, not num_layers={num_layers}; "
                             "give the model config's num_layers")
        if names:
            stacked = jax.tree.map(_stack, *(trunk[n] for n in names))
            out[key] = {k: v for k, v in trunk.items() if k not in names} | {STACKED: stacked}
    return out


def unstack_layers(params: Mapping) -> dict:
    """Scanned -> unrolled: each trunk's 'layers' subtree (leading axis k) becomes layer_0 .. layer_{k-1}; the
    inverse of stack_layers, exactly."""
    out = dict(params)
    for key, trunk in params.items():
        if not isinstance(trunk, Mapping) or STACKED not in trunk:
            continue
        stacked = trunk[STACKED]
        k = jax.tree.leaves(stacked)[0].shape[0]
        layers = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(k)}
        out[key] = {n: v for n, v in trunk.items() if n != STACKED} | layers
    return out


__all__ = ["CACHE_NEEDS_UNROLLED", "LAST_UNSCANNED", "REMAT_POLICIES", "STACKED", "checkpointed", "is_scanned",
           "num_scanned", "scanned_blocks", "stack_layers", "unstack_layers"]
