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


def prepare_pretraining(cfg, tokenizer_dir: str | Path) -> PretrainData:
    """Read (or synthesise) the corpus, load data.tokenizer or train one (saved in tokenizer_dir, reused from there
    on resume), pack, and split off held-out rows."""
    data, train = cfg.data, cfg.train
    docs = synthetic_corpus(data.synthetic_docs, seed=0) if data.path is None else read_documents(
        data.path, data.format, data.text_field)
    tok_dir = Path(tokenizer_dir)
    if data.tokenizer:
        tokenizer = load_tokenizer(data.tokenizer)
    elif (tok_dir / "tokenizer.json").exists():  # a resumed run reuses its own tokenizer
        tokenizer = load_tokenizer(str(tok_dir))
    elif jax.process_count() == 1:
        tokenizer = train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
    else:  # one process trains and saves, the others load the same files (the run dir is shared storage)
        if jax.process_index() == 0:
            train_tokenizer(docs, cfg.model.arch, data.tokenizer_vocab, str(tok_dir))
        multihost_utils.sync_global_devices("jaxfound_tokenizer_trained")
        tokenizer = load_tokenizer(str(tok_dir))
    vocab_size = cfg.model.vocab_size or padded_vocab(len(tokenizer))
    if vocab_size < len(tokenizer):
        raise JaxfoundError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")

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
                      mask_id=tokenizer.mask_token_id if tokenizer.mask_token_id is not None else 0,
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

