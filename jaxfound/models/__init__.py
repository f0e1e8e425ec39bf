"""Flax transformer modules: BERT (encoder, MLM and classification heads) and GPT-2 (decoder, tied LM head)."""

from jaxfound.models.bert import Bert
from jaxfound.models.gpt import GPT


def build_model(cfg, head: str):
    """The model for an architecture and a head ('none', 'mlm', 'lm', 'token_cls', 'seq_cls')."""
    return (Bert if cfg.arch == "bert" else GPT)(cfg, head=head)


__all__ = ["Bert", "GPT", "build_model"]
