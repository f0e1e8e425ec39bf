"""Tokenizers: a local Hugging Face directory, or trained on the corpus (WordPiece for BERT, byte-level BPE for GPT,
RoBERTa and Llama)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxfound.errors import JaxfoundError

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT_SPECIALS = ["<|endoftext|>"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4: pad 1 as its positions expect


def load_tokenizer(path: str):
    """A transformers fast tokenizer from a local directory."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise JaxfoundError(f"tokenizer directory {path} not found (expected a Hugging Face tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise JaxfoundError(f"tokenizer directory {path}: could not load it ({type(e).__name__}: {e})") from None


def train_tokenizer(docs: list[str], arch: str, vocab_size: int, out_dir: str):
    """Train a tokenizer on docs, save it as a Hugging Face directory in out_dir, and return it."""
    from transformers import PreTrainedTokenizerFast

    if arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
        tok.train_from_iterator(docs, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    else:
        specials = ROBERTA_SPECIALS if arch == "roberta" else GPT_SPECIALS
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer)
    if arch == "roberta":  # <s> A </s> (pair: <s> A </s></s> B </s>), saved as transformers' RobertaTokenizer
        from transformers import RobertaTokenizerFast

        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                          add_prefix_space=False)
        fast = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                    cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                    add_prefix_space=False)
    elif arch != "bert":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def _byte_level_without_prefix_space(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if pre is None:
        return False
    state = json.loads(pre.__getstate__())
    levels = [p for p in [state, *state.get("pretokenizers", [])] if p.get("type") == "ByteLevel"]
    return bool(levels) and not any(p.get("add_prefix_space") for p in levels)


def pretokenized_words(tokenizer, sentences_words) -> list[list[str]]:
    """Words as a word-level caller hands them to ``tokenizer(..., is_split_into_words=True)``.

    A byte-level BPE tokenizer (RoBERTa, GPT-2, the Llama family) marks a word's leading space inside its first
    piece ('Ġrejects'); given words one by one without ``add_prefix_space`` it would see none and split every word as
    if it started a text ('rej', 'ect', 's'), pieces it rarely saw in training. Each word gets the space it has inside
    running text, as transformers' ``add_prefix_space=True`` does; other tokenizers take the words unchanged.
    """
    if _byte_level_without_prefix_space(tokenizer):
        return [[" " + w for w in words] for words in sentences_words]
    return [list(words) for words in sentences_words]


def padded_vocab(num_tokens: int, multiple: int = 128) -> int:
    """The model's vocabulary size for a tokenizer: rounded up so the embedding shards and tiles evenly."""
    return -(-num_tokens // multiple) * multiple
