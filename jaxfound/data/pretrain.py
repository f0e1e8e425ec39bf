"""Everything a pretraining run reads: documents -> tokenizer -> token corpus (in memory, or the on-disk cache of
data.cache_dir) -> packed train / held-out rows -> streams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from jaxfound.data.corpus import iter_documents, read_documents
from jaxfound.data.pipeline import ExampleStream, PackedCorpus, StreamSpec
from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.token_cache import TokenCorpus, cached_corpus, encoding_for, in_memory_corpus, storage_dtype
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


def corpus_tokenizer(cfg, docs, tokenizer_dir: str | Path):
    """data.tokenizer, else the run's own (tokenizer_dir, on resume), else one trained on docs (a list, or a
    function returning an iterator: read only if a tokenizer is trained) and saved there."""
    data, tok_dir = cfg.data, Path(tokenizer_dir)
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if (tok_dir / "tokenizer.json").exists():  # a resumed run reuses its own tokenizer
        return load_tokenizer(str(tok_dir))
    docs = docs() if callable(docs) else docs
    if jax.process_count() == 1:
        return train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
    # one process trains and saves, the others load the same files (the run dir is shared storage)
    if jax.process_index() == 0:
        train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
    multihost_utils.sync_global_devices("jaxfound_tokenizer_trained")
    return load_tokenizer(str(tok_dir))


def prepare_pretraining(cfg, tokenizer_dir: str | Path, tokenizer=None) -> PretrainData:
    """Read (or synthesise) the corpus, tokenize it with tokenizer (model.init's) or corpus_tokenizer's (or open its
    token cache), and split off the held-out documents."""
    data, train = cfg.data, cfg.train
    docs = synthetic_corpus(data.synthetic_docs, seed=0) if data.path is None else None
    stream = (lambda: docs) if docs is not None else (lambda: iter_documents(data.path, data.format, data.text_field))
    tokenizer = tokenizer if tokenizer is not None else corpus_tokenizer(cfg, stream, tokenizer_dir)
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

    corpus = token_corpus(cfg, tokenizer, docs)
    if corpus.num_docs < 2:
        raise JaxfoundError(f"data.path={data.path}: need at least 2 documents (one is held out), got "
                            f"{corpus.num_docs}")
    n_valid = max(1, int(corpus.num_docs * data.valid_fraction))
    special = tuple(sorted(set(tokenizer.all_special_ids)))
    spec = StreamSpec(task=train.task, seed=train.seed, mask_prob=data.mask_prob,
                      mask_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else 0,  # clm: unused
                      special_ids=special, vocab_size=len(tokenizer))
    valid_spec = StreamSpec(**{**spec.__dict__, "seed": 10_000 + train.seed})  # fixed eval masks
    return PretrainData(
        tokenizer=tokenizer,
        train=ExampleStream(PackedCorpus(corpus, data.seq_len, n_valid), spec),
        valid=ExampleStream(PackedCorpus(corpus, data.seq_len, 0, n_valid), valid_spec, shuffle=False),
        vocab_size=vocab_size,
        num_docs=corpus.num_docs,
        num_tokens=corpus.num_tokens,
    )


def token_corpus(cfg, tokenizer, docs: list[str] | None = None) -> TokenCorpus:
    """The corpus's tokens: encoders get [CLS] ... [SEP] / <s> ... </s> per document, decoders ... eos.

    With data.cache_dir (and a data.path), from the on-disk cache, built by process 0 on first use; else
    tokenized here in memory (docs, or data.path read whole).
    """
    data = cfg.data
    encoder = cfg.model.arch in ("bert", "roberta")
    if data.cache_dir is None or data.path is None:
        docs = docs if docs is not None else read_documents(data.path, data.format, data.text_field)
        if encoder:
            token_lists = tokenizer(docs, add_special_tokens=True)["input_ids"]
        else:
            eos = tokenizer.eos_token_id
            token_lists = [t + [eos] for t in tokenizer(docs, add_special_tokens=False)["input_ids"]]
        return in_memory_corpus(token_lists, storage_dtype(len(tokenizer)))
    encoding = encoding_for(tokenizer, encoder)
    args = (data.path, data.format, data.text_field, encoding, data.cache_dir, data.cache_workers)
    if jax.process_count() == 1:
        return cached_corpus(*args)
    if jax.process_index() == 0:  # one process tokenizes, the others open its files (cache_dir is shared storage)
        cached_corpus(*args)
    multihost_utils.sync_global_devices("jaxfound_token_cache_built")
    return cached_corpus(*args, build=False)
