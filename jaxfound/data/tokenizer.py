"""Tokenizers: a local Hugging Face directory, or trained on the corpus (WordPiece for BERT, byte-level BPE for GPT)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxfound.errors import JaxfoundError

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT_SPECIALS = ["<|endoftext|>"]


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
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GPT_SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def padded_vocab(num_tokens: int, multiple: int = 128) -> int:
    """The model's vocabulary size for a tokenizer: rounded up so the embedding shards and tiles evenly."""
    return -(-num_tokens // multiple) * multiple
