"""Everything a pretraining run reads: documents -> tokenizer -> packed train / held-out rows -> streams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from jaxfound.data.corpus import read_documents
from jaxfound.data.pipeline import ExampleStream, StreamSpec, pack_documents
from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.tokenizer import load_tokenizer, padded_vocab, train_tokenizer
from jaxfound.errors import JaxfoundError


@dataclass
class PretrainData:
    tokenizer: object
    train: ExampleStream
    valid: ExampleStream
    vocab_size: int  # the model's vocabulary (tokenizer size rounded up to a multiple of 128)
    num_docs: int
    num_tokens: int


def corpus_tokenizer(cfg, docs: list[str], tokenizer_dir: str | Path):
    """data.tokenizer, else the run's own (tokenizer_dir, on resume), else one trained on docs and saved there."""
    data, tok_dir = cfg.data, Path(tokenizer_dir)
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if (tok_dir / "tokenizer.json").exists():  # a resumed run reuses its own tokenizer
        return load_tokenizer(str(tok_dir))
    if jax.process_count() == 1:
        return train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
    # one process trains and saves, the others load the same files (the run dir is shared storage)
    if jax.process_index() == 0:
        train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
    multihost_utils.sync_global_devices("jaxfound_tokenizer_trained")
    return load_tokenizer(str(tok_dir))


def prepare_pretraining(cfg, tokenizer_dir: str | Path, tokenizer=None) -> PretrainData:
    """Read (or synthesise) the corpus, tokenize it with tokenizer (model.init's) or corpus_tokenizer's, pack, and
    split off held-out rows."""
    data, train = cfg.data, cfg.train
    docs = synthetic_corpus(data.synthetic_docs, seed=0) if data.path is None else read_documents(
        data.path, data.format, data.text_field)
    tokenizer = tokenizer if tokenizer is not None else corpus_tokenizer(cfg, docs, tokenizer_dir)
    vocab_size = cfg.model.vocab_size or padded_vocab(len(tokenizer))
    if vocab_size < len(tokenizer):
        owner = f"model.init={cfg.model.init} has vocab_size={vocab_size}" if cfg.model.init else \
            f"model.vocab_size={vocab_size} is"
        raise JaxfoundError(f"{owner}, fewer than the tokenizer's {len(tokenizer)} tokens; give a tokenizer of that "
                            "model (data.tokenizer)")
    if train.task == "mlm" and tokenizer.mask_token_id is None:
        raise JaxfoundError("train.task=mlm: the tokenizer has no mask token; give a BERT / RoBERTa tokenizer "
                            "(data.tokenizer)")
    if train.task == "clm" and tokenizer.eos_token_id is None:
        raise JaxfoundError("train.task=clm: the tokenizer has no end-of-text token (eos) to end each document "
                            "with; give a GPT-2 / Llama tokenizer (data.tokenizer)")

    if cfg.model.arch in ("bert", "roberta"):  # encoders: [CLS] ... [SEP] / <s> ... </s> per document
        token_lists = tokenizer(docs, add_special_tokens=True)["input_ids"]
    else:
        eos = tokenizer.eos_token_id
        token_lists = [t + [eos] for t in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    n_valid = max(1, int(len(docs) * data.valid_fraction))
    if len(docs) < 2:
        raise JaxfoundError(f"data.path={data.path}: need at least 2 documents (one is held out), got {len(docs)}")
    packed_train = pack_documents(token_lists[n_valid:], data.seq_len)
    packed_valid = pack_documents(token_lists[:n_valid], data.seq_len)
    special = tuple(sorted(set(tokenizer.all_special_ids)))
    spec = StreamSpec(task=train.task, seed=train.seed, mask_prob=data.mask_prob,
                      mask_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else 0,  # clm: unused
                      special_ids=special, vocab_size=len(tokenizer))
    valid_spec = StreamSpec(**{**spec.__dict__, "seed": 10_000 + train.seed})  # fixed eval masks
    return PretrainData(
        tokenizer=tokenizer,
        train=ExampleStream(packed_train, spec),
        valid=ExampleStream(packed_valid, valid_spec, shuffle=False),
        vocab_size=vocab_size,
        num_docs=len(docs),
        num_tokens=int(sum(len(t) for t in token_lists)),
    )

