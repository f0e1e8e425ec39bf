"""Flax transformer modules: BERT and RoBERTa (encoders), GPT-2 and the Llama family (decoders), with their heads;
the KV cache; scanned layers and the conversion of params between scanned and unrolled layouts (scan.py)."""

import jax
import jax.numpy as jnp

from jaxfound.models.bert import Bert
from jaxfound.models.gpt import GPT
from jaxfound.models.llama import Llama

# the shared encoder / decoder params; every other top-level key is a task head
TRUNK_KEYS = ("bert", "roberta", "gpt", "llama")


def build_model(cfg, head: str):
    """The model for an architecture and a head ('none', 'mlm', 'lm', 'token_cls', 'seq_cls')."""
    return {"bert": Bert, "roberta": Bert, "gpt": GPT, "llama": Llama}[cfg.arch](cfg, head=head)


def abstract_params(model, seq_len: int = 2):
    """The params' shapes and dtypes, boxed with their logical axis names, computed without allocating anything."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])


__all__ = ["GPT", "TRUNK_KEYS", "Bert", "Llama", "abstract_params", "build_model"]
