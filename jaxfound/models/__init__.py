"""Flax transformer modules: BERT (encoder, MLM and classification heads) and GPT-2 (decoder, tied LM head)."""

import jax
import jax.numpy as jnp

from jaxfound.models.bert import Bert
from jaxfound.models.gpt import GPT

TRUNK_KEYS = ("bert", "gpt")  # the shared encoder / decoder params; every other top-level key is a task head


def build_model(cfg, head: str):
    """The model for an architecture and a head ('none', 'mlm', 'lm', 'token_cls', 'seq_cls')."""
    return (Bert if cfg.arch == "bert" else GPT)(cfg, head=head)


def abstract_params(model, seq_len: int = 2):
    """The params' shapes and dtypes, boxed with their logical axis names, computed without allocating anything."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])


__all__ = ["GPT", "TRUNK_KEYS", "Bert", "abstract_params", "build_model"]
