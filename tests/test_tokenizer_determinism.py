"""train_tokenizer is a function of (docs, arch, vocab_size): fresh processes write byte-identical files, the trained
tokenizers round-trip text, and they match the ``tokenizers`` trainers (huggingface/tokenizers#1794 breaks their ties
in hash-map order) wherever those do not depend on the order."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.tokenizer import (
    BERT_SPECIALS,
    GPT_SPECIALS,
    ROBERTA_SPECIALS,
    WORDPIECE_PREFIX,
    learn_bpe,
    load_tokenizer,
    train_tokenizer,
    word_counts,
)

ROOT = Path(__file__).resolve().parents[1]
ACCENTED = ["Zoë travelled from Zürich to São Paulo — naïve café talk .", "東京 is a city in Japan 🚀 .",
            "Ada Lovelace wrote « notes » in Paris ; Grace Hopper wrote code ."]
SIZES = {"bert": 300, "gpt": 400, "roberta": 400}
# the synthetic grammar repeats its words, so many pairs tie on count: the tokenizers WordPiece trainer learns a
# different vocabulary in most fresh processes on this corpus
TRAIN_ALL = """
import sys
from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.tokenizer import train_tokenizer
for arch, size in {sizes!r}.items():
    train_tokenizer(synthetic_corpus(2000) + {extra!r}, arch, size, f"{{sys.argv[1]}}/{{arch}}")
"""


def docs() -> list[str]:
    return synthetic_corpus(2000) + ACCENTED


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokenizers")
    return {arch: train_tokenizer(docs(), arch, size, str(root / arch)) for arch, size in SIZES.items()}


def test_fresh_processes_write_byte_identical_tokenizers(tmp_path):
    script = TRAIN_ALL.format(sizes=SIZES, extra=ACCENTED)
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"run{seed}")], cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]  # new interpreters: new Rust hash seeds, and different Python string hashes
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    for arch in SIZES:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            first, second = ((tmp_path / run / arch / name).read_bytes() for run in ("run1", "run2"))
            assert first == second, f"{arch}/{name} differs between two fresh processes"


def test_the_result_does_not_depend_on_document_order(trained, tmp_path):
    for arch in ("bert", "gpt"):
        again = train_tokenizer(docs()[::-1], arch, SIZES[arch], str(tmp_path / arch))
        assert again.backend_tokenizer.to_str() == trained[arch].backend_tokenizer.to_str()


@pytest.mark.parametrize("arch", ["gpt", "roberta"])
def test_byte_level_bpe_round_trips_ascii_and_unseen_text(trained, arch, tmp_path):
    trained[arch].save_pretrained(str(tmp_path))
    backend = load_tokenizer(str(tmp_path)).backend_tokenizer
    for text in ["Ada Lovelace lives in Lyon , a city in France .", *ACCENTED, "Ωμέγα ✓ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\ttabs  and\n lines "]:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert backend.decode(ids) == text


def test_wordpiece_splits_each_normalized_word_into_its_pieces(trained):
    backend = trained["bert"].backend_tokenizer
    for text in ["Ada Lovelace lives in Lyon, a city in France.", *ACCENTED]:
        enc = backend.encode(text, add_special_tokens=False)
        pieces = {}
        for token, word in zip(enc.tokens, enc.word_ids):
            assert token != "[UNK]" and token.startswith(WORDPIECE_PREFIX) == (word in pieces)
            pieces[word] = pieces.get(word, "") + token.removeprefix(WORDPIECE_PREFIX)
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        assert list(pieces.values()) == [word for word, _ in words]


def test_special_tokens_keep_their_ids_and_templates(trained):
    for arch, specials in (("bert", BERT_SPECIALS), ("gpt", GPT_SPECIALS), ("roberta", ROBERTA_SPECIALS)):
        assert trained[arch].convert_ids_to_tokens(list(range(len(specials)))) == specials
    assert type(trained["roberta"]).__name__.startswith("RobertaTokenizer")
    bert, roberta = trained["bert"]("Ada")["input_ids"], trained["roberta"]("Ada")["input_ids"]
    assert (bert[0], bert[-1], roberta[0], roberta[-1]) == (2, 3, 0, 2)


def _reference(arch: str, corpus: list[str], size: int) -> Tokenizer:
    """The tokenizers trainer on the same pipeline, as jaxfound trained before."""
    if arch == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=BERT_SPECIALS, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=GPT_SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_byte_level_bpe_equals_the_tokenizers_trainer(trained):
    """Its byte-level BPE numbers every initial token in sorted order and breaks ties by the same rule."""
    reference = _reference("gpt", docs(), SIZES["gpt"]).model
    ours = trained["gpt"].backend_tokenizer.model
    assert ours.__getstate__() == reference.__getstate__()


def test_wordpiece_matches_the_tokenizers_trainer_in_size_and_compression(trained):
    held_out = synthetic_corpus(300, seed=1)
    reference = _reference("bert", docs(), SIZES["bert"])
    ours = trained["bert"].backend_tokenizer
    assert ours.get_vocab_size() == reference.get_vocab_size() == SIZES["bert"]
    shared = set(ours.get_vocab()) & set(reference.get_vocab())
    assert len(shared) >= 0.9 * SIZES["bert"]
    n_ours, n_ref = (sum(len(e.ids) for e in tok.encode_batch(held_out, add_special_tokens=False))
                     for tok in (ours, reference))
    assert abs(n_ours / n_ref - 1) < 0.02
    frequent = Counter(word_counts(ours, docs())).most_common(40)
    assert all(ours.token_to_id(word) is not None for word, _ in frequent)


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_word_counts_equal_a_count_over_the_pre_tokenizer(trained, arch):
    tok = trained[arch].backend_tokenizer
    text = [*docs()[:200], "tabs\tand\u200bzero-width  spaces ", "", "a\x00b\x07c"]
    normalize = tok.normalizer.normalize_str if tok.normalizer else str
    expected = Counter(w for d in text for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalize(d)))
    assert word_counts(tok, text) == dict(expected)


def test_ties_go_to_the_pair_of_lowest_ids():
    vocab, merges = learn_bpe({"cd": 2, "ab": 2, "ba": 1}, ["a", "b", "c", "d"], 5)
    assert (vocab, merges) == (["a", "b", "c", "d", "ab"], [("a", "b")])
    vocab, merges = learn_bpe({"aaaa": 2, "ab": 1}, ["a", "b"], 4)  # overlapping pairs merge left to right
    assert (vocab, merges) == (["a", "b", "aa", "aaaa"], [("a", "a"), ("aa", "aa")])
    vocab, merges = learn_bpe({"xab": 2, "yab": 2}, ["a", "b", "x", "y", "##a", "##b"], 8, WORDPIECE_PREFIX)
    assert (vocab[6:], merges) == (["##ab", "xab"], [("##a", "##b"), ("x", "##ab")])


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("abcd", min_size=1, max_size=7), st.integers(1, 4), min_size=1, max_size=12),
       st.integers(0, 12))
def test_bpe_equals_the_tokenizers_trainer_on_small_corpora(counts, extra):
    alphabet = sorted(set("".join(counts)))
    vocab, merges = learn_bpe(counts, alphabet, len(alphabet) + extra)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join([word] * n) for word, n in counts.items()],
                            trainers.BpeTrainer(vocab_size=len(alphabet) + extra, show_progress=False))
    assert tok.get_vocab() == {token: i for i, token in enumerate(vocab)}
    assert tok.model.__getstate__() == models.BPE({t: i for i, t in enumerate(vocab)}, merges).__getstate__()
