"""Tokenizers: a local Hugging Face directory, or trained on the corpus (WordPiece for BERT, byte-level BPE for GPT,
RoBERTa and Llama).

A trained tokenizer is a function of (docs, arch, vocab_size) alone: ``learn_bpe`` learns the merges with every tie
broken by token ids that are themselves assigned in sorted order. The ``tokenizers`` trainers number WordPiece's
'##' pieces in hash-map order, which differs from process to process, and so break count ties differently in every
run (huggingface/tokenizers#1794); tests/test_tokenizer_determinism.py guards the difference.
"""

from __future__ import annotations

import heapq
import json
from collections import defaultdict
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxfound.errors import JaxfoundError

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT_SPECIALS = ["<|endoftext|>"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4: pad 1 as its positions expect
WORDPIECE_PREFIX = "##"  # marks a piece that continues a word


def load_tokenizer(path: str):
    """A transformers fast tokenizer from a local directory."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise JaxfoundError(f"tokenizer directory {path} not found (expected a Hugging Face tokenizer directory)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise JaxfoundError(f"tokenizer directory {path}: could not load it ({type(e).__name__}: {e})") from None


def word_counts(tok: Tokenizer, docs) -> dict[str, int]:
    """How often each word occurs in docs after tok's normalizer and pre-tokenizer, sorted by word.

    The ``tokenizers`` BPE trainer counts them (in parallel, in Rust) and keeps them in its pickled state; with
    vocab_size 0 it learns nothing from them.
    """
    counter = Tokenizer(models.BPE())
    counter.normalizer, counter.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=0, show_progress=False)
    counter.train_from_iterator(docs, trainer)
    counts = json.loads(trainer.__getstate__())["BpeTrainer"]["words"]
    return {word: counts[word] for word in sorted(counts) if word}


def _initial_vocab(counts: dict[str, int], specials: list[str], alphabet, prefix: str) -> list[str]:
    """Specials, then every character (sorted), then with a prefix each character seen inside a word (sorted)."""
    chars = set(alphabet).union(*counts)
    inner = sorted({c for word in counts for c in word[1:]}) if prefix else []
    return list(dict.fromkeys([*specials, *sorted(chars), *(prefix + c for c in inner)]))


def _merge_word(syms: list[int], pair: tuple[int, int], new: int, n: int, deltas: dict) -> list[int] | None:
    """syms with each pair replaced by new, left to right, or None where the pair does not occur; adds n times the
    change in each pair's count to deltas."""
    a, b = pair
    out, i, last = [], 0, len(syms) - 1
    while i <= last:
        if syms[i] == a and i < last and syms[i + 1] == b:
            deltas[pair] -= n
            if out:  # the left neighbour: may itself be new, from the occurrence just merged
                deltas[out[-1], a] -= n
                deltas[out[-1], new] += n
            if i + 1 < last:
                deltas[b, syms[i + 2]] -= n
                deltas[new, syms[i + 2]] += n
            out.append(new)
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return out if len(out) <= last else None


def _pair_counts(words: list[list[int]], weights: list[int]) -> tuple[dict, dict]:
    """Each adjacent pair's count, weighted by word count, and the words that hold it."""
    counts, where = defaultdict(int), defaultdict(set)
    for w, (syms, n) in enumerate(zip(words, weights)):
        for pair in zip(syms, syms[1:]):
            counts[pair] += n
            where[pair].add(w)
    return counts, where


def learn_bpe(counts: dict[str, int], vocab: list[str], vocab_size: int,
              prefix: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """BPE on word counts: merge the most frequent adjacent pair until the vocabulary holds vocab_size tokens.

    Ties go to the pair of lowest token ids (a, then b), the rule of the ``tokenizers`` trainer, so the result depends
    on the counts and the initial vocab's order alone. vocab: the initial tokens in id order (specials, characters);
    prefix: marks every symbol after a word's first ('##' for WordPiece). Returns the vocab in id order and the merges.
    """
    vocab = list(vocab)
    ids = {token: i for i, token in enumerate(vocab)}
    words = [[ids[w[0]], *(ids[prefix + c] for c in w[1:])] for w in counts]
    weights = list(counts.values())
    pair_counts, where = _pair_counts(words, weights)  # where may also list words that no longer hold a pair
    heap = [(-n, pair) for pair, n in pair_counts.items()]  # max count, then lowest ids
    heapq.heapify(heap)
    merges, merged = [], set()
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts[pair] != -neg:  # the count fell since this entry was pushed: push it again as it is now
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            continue
        a, b = pair
        right = vocab[b][len(prefix):] if prefix and vocab[b].startswith(prefix) else vocab[b]
        new = ids.setdefault(vocab[a] + right, len(vocab))  # a token reached by a second route keeps its id
        if new == len(vocab):
            vocab.append(vocab[a] + right)
        if pair not in merged:
            merges.append((vocab[a], vocab[b]))
            merged.add(pair)
        deltas = defaultdict(int)
        for w in where.pop(pair):
            out = _merge_word(words[w], pair, new, weights[w], deltas)
            if out is not None:
                words[w] = out
                for p in zip(out, out[1:]):
                    if new in p:
                        where[p].add(w)
        for p, d in deltas.items():
            if d:
                pair_counts[p] += d
                if d > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
    return vocab, merges


def train_tokenizer(docs: list[str], arch: str, vocab_size: int, out_dir: str):
    """Train a tokenizer on docs, save it as a Hugging Face directory in out_dir, and return it."""
    from transformers import PreTrainedTokenizerFast

    if arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        counts = word_counts(tok, docs)
        vocab, _ = learn_bpe(counts, _initial_vocab(counts, BERT_SPECIALS, (), WORDPIECE_PREFIX), vocab_size,
                             WORDPIECE_PREFIX)
        tok.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix=WORDPIECE_PREFIX)
        tok.add_special_tokens(BERT_SPECIALS)
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
        counts = word_counts(tok, docs)
        vocab, merges = learn_bpe(counts, _initial_vocab(counts, specials, pre_tokenizers.ByteLevel.alphabet(), ""),
                                  vocab_size)
        tok.model = models.BPE({t: i for i, t in enumerate(vocab)}, merges)
        tok.add_special_tokens(specials)
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
