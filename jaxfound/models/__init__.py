"""Flax transformer modules: BERT (encoder, MLM and classification heads) and GPT-2 (decoder, tied LM head)."""

from jaxfound.models.bert import Bert
from jaxfound.models.gpt import GPT

TRUNK_KEYS = ("bert", "gpt")  # the shared encoder / decoder params; every other top-level key is a task head


def build_model(cfg, head: str):
    """The model for an architecture and a head ('none', 'mlm', 'lm', 'token_cls', 'seq_cls')."""
    return (Bert if cfg.arch == "bert" else GPT)(cfg, head=head)


__all__ = ["GPT", "TRUNK_KEYS", "Bert", "build_model"]
