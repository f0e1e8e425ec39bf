"""Pretraining data: packing, BERT masking, determinism in (seed, step), per-process slices."""

import numpy as np

from jaxfound.data.pipeline import (
    ExampleStream,
    StreamSpec,
    batch_iterator,
    fingerprint,
    local_batch,
    mask_tokens,
    max_predictions,
    pack_documents,
)
from jaxfound.data.synthetic import synthetic_corpus


def test_pack_documents_cuts_rows_and_numbers_segments():
    packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)
    np.testing.assert_array_equal(packed.ids_NxL, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]])
    np.testing.assert_array_equal(packed.segment_ids_NxL, [[1, 1, 1, 2], [1, 2, 2, 2], [1, 0, 0, 0]])


def test_masking_is_80_10_10_of_15_percent():
    rng = np.random.default_rng(0)
    special = np.array([0, 1, 2, 3, 4])
    counts = np.zeros(3)
    total_masked, total_real = 0, 0
    for _ in range(400):
        ids = rng.integers(5, 1000, size=128).astype(np.int32)
        inputs, pos, lab, w = mask_tokens(ids, rng, 0.15, max_predictions(128, 0.15), 4, special, 1000)
        n = int(w.sum())
        total_masked += n
        total_real += 128
        np.testing.assert_array_equal(lab[:n], ids[pos[:n]])
        changed = inputs[pos[:n]]
        counts += [np.sum(changed == 4), np.sum((changed != 4) & (changed != lab[:n])), np.sum(changed == lab[:n])]
        untouched = np.setdiff1d(np.arange(128), pos[:n])
        np.testing.assert_array_equal(inputs[untouched], ids[untouched])
    frac = counts / counts.sum()
    assert abs(total_masked / total_real - 0.15) < 0.005
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.02 and abs(frac[2] - 0.1) < 0.02


def test_special_tokens_are_never_masked():
    ids = np.array([2, 10, 11, 12, 3, 0, 0, 0], np.int32)
    for seed in range(20):
        _, pos, _, w = mask_tokens(ids, np.random.default_rng(seed), 0.5, 4, 4, np.array([0, 1, 2, 3, 4]), 50)
        assert set(pos[w > 0].tolist()) <= {1, 2, 3}


def _stream(seed=0):
    packed = pack_documents([list(range(5, 5 + n)) for n in range(3, 40)], seq_len=16)
    return ExampleStream(packed, StreamSpec("mlm", seed, 0.15, 4, (0, 1, 2, 3, 4), 60))


def test_batches_are_a_function_of_seed_and_step():
    a, b = _stream(0), _stream(0)
    for step in (0, 3, 17):
        x, y = local_batch(a, step, 8), local_batch(b, step, 8)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(local_batch(_stream(1), 0, 8)["input_ids"], local_batch(a, 0, 8)["input_ids"])


def test_processes_read_disjoint_slices_of_the_global_batch():
    s = _stream()
    whole = local_batch(s, 5, 8)
    parts = [local_batch(s, 5, 8, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), whole["input_ids"])


def test_iterator_state_resumes_at_the_next_batch():
    s = _stream()
    it = batch_iterator(s, 4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = next(it)
    it2 = batch_iterator(s, 4)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["input_ids"], expected["input_ids"])


def test_synthetic_corpus_is_deterministic_and_factual():
    a, b = synthetic_corpus(50, seed=3), synthetic_corpus(50, seed=3)
    assert a == b and a != synthetic_corpus(50, seed=4)
    homes = {}
    for doc in synthetic_corpus(500, seed=0):
        for sent in doc.split(" . "):
            if " lives in " in sent and sent.split(" lives in ")[0].count(" ") == 1:
                name, rest = sent.split(" lives in ")
                homes.setdefault(name.strip(), set()).add(rest.split(" ")[0])
    assert homes and all(len(v) == 1 for v in homes.values())  # each person has one home: a learnable fact


def test_fingerprint_is_a_function_of_content_and_shape():
    """Equal tokens -> equal fingerprints; one token, the row shape or the label list changed -> another."""
    corpus = pack_documents([list(range(1, 50)), list(range(7, 30))], 16)
    same = pack_documents([list(range(1, 50)), list(range(7, 30))], 16)
    fp = fingerprint(corpus.ids_NxL, corpus.segment_ids_NxL)
    assert fp == fingerprint(same.ids_NxL.copy(), same.segment_ids_NxL) and fp["examples"] == 5
    changed = corpus.ids_NxL.copy()
    changed[3, 2] += 1
    assert fingerprint(changed, corpus.segment_ids_NxL)["blake2b"] != fp["blake2b"]
    assert fingerprint(corpus.ids_NxL.reshape(-1, 8), corpus.segment_ids_NxL)["blake2b"] != fp["blake2b"]
    ids = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    assert fingerprint(ids, [np.array([0, 1, 0])])["examples"] == 2
    assert fingerprint(ids, [np.array([0, 1, 0])]) != fingerprint(ids, [np.array([0, 2, 0])])
