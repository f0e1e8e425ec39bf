"""Pretraining data: packing, BERT masking, determinism in (seed, step), per-process slices."""

import numpy as np

from jaxfound.data.pipeline import (
    ExampleStream,
    MaskDraws,
    PackedCorpus,
    StreamSpec,
    batch_iterator,
    fingerprint,
    local_batch,
    mask_batch,
    max_predictions,
    pack_documents,
    packed_fingerprint,
)
from jaxfound.data.synthetic import synthetic_corpus
from jaxfound.data.token_cache import in_memory_corpus

SPECIAL = np.array([0, 1, 2, 3, 4])


def reference_mask_row(ids_L, candidate_L, draws: MaskDraws, row: int, mask_prob: float, mask_id: int):
    """BERT masking of one row, written out per position: the per-row semantics mask_batch vectorizes."""
    num_predictions = draws.roll_BxP.shape[1]
    candidates = np.flatnonzero(candidate_L)
    n = min(num_predictions, max(1, int(round(mask_prob * len(candidates))))) if len(candidates) else 0
    keys = draws.keys_BxL[row, candidates]
    positions = sorted(candidates[np.argsort(keys, kind="stable")[:n]].tolist())
    inputs, labels = ids_L.copy(), []
    for j, p in enumerate(positions):
        labels.append(int(ids_L[p]))
        roll = draws.roll_BxP[row, j]
        if roll < 0.8:
            inputs[p] = mask_id
        elif roll < 0.9:
            inputs[p] = draws.random_BxP[row, j]
    return inputs, positions, labels


def _mask(ids_BxL, rng, mask_prob=0.15, vocab=1000):
    rows, length = ids_BxL.shape
    p = max_predictions(length, mask_prob)
    draws = MaskDraws.draw(rng, rows, length, p, len(SPECIAL), vocab)
    candidate = ~np.isin(ids_BxL, SPECIAL)
    return draws, candidate, mask_batch(ids_BxL, candidate, draws, mask_prob, 4)


def test_pack_documents_cuts_rows_and_numbers_segments():
    packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)
    np.testing.assert_array_equal(packed.ids_NxL, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]])
    np.testing.assert_array_equal(packed.segment_ids_NxL, [[1, 1, 1, 2], [1, 2, 2, 2], [1, 0, 0, 0]])


def test_masking_is_80_10_10_of_15_percent():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(400, 128)).astype(np.int32)
    _, _, (inputs, pos, lab, w) = _mask(ids, rng)
    counts = np.zeros(3)
    for b in range(len(ids)):
        n = int(w[b].sum())
        np.testing.assert_array_equal(lab[b, :n], ids[b, pos[b, :n]])
        changed, kept = inputs[b, pos[b, :n]], lab[b, :n]
        counts += [np.sum(changed == 4), np.sum((changed != 4) & (changed != kept)), np.sum(changed == kept)]
        untouched = np.setdiff1d(np.arange(128), pos[b, :n])
        np.testing.assert_array_equal(inputs[b, untouched], ids[b, untouched])
    frac = counts / counts.sum()
    assert abs(w.sum() / ids.size - 0.15) < 0.005
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.02 and abs(frac[2] - 0.1) < 0.02


def test_vectorized_masking_equals_the_per_row_reference():
    """Same draws -> the same positions, labels and inputs as masking each row on its own (specials and padding
    never candidates, rows with few or no candidates included)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 60, size=(64, 24)).astype(np.int32)  # many specials (ids < 5)
    ids[3] = 2  # a row of specials only: nothing masked
    ids[5, 2:] = 0  # two real tokens at most
    draws, candidate, (inputs, pos, lab, w) = _mask(ids, rng, mask_prob=0.3, vocab=60)
    for b in range(len(ids)):
        ref_inputs, ref_pos, ref_lab = reference_mask_row(ids[b], candidate[b], draws, b, 0.3, 4)
        n = int(w[b].sum())
        assert pos[b, :n].tolist() == ref_pos and lab[b, :n].tolist() == ref_lab
        np.testing.assert_array_equal(inputs[b], ref_inputs)
        assert not w[b, n:].any() and not pos[b, n:].any()
    assert w[3].sum() == 0 and 1 <= w[5].sum() <= 2


def test_special_tokens_are_never_masked():
    ids = np.tile(np.array([2, 10, 11, 12, 3, 0, 0, 0], np.int32), (20, 1))
    _, _, (_, pos, _, w) = _mask(ids, np.random.default_rng(0), mask_prob=0.5, vocab=50)
    assert set(pos[w > 0].tolist()) <= {1, 2, 3}


def test_packed_rows_equal_the_concatenated_documents_cut_by_hand():
    docs = [list(range(5, 5 + n)) for n in (3, 9, 1, 14, 6, 2)]
    flat = [t for d in docs for t in d]
    doc_of = [i for i, d in enumerate(docs) for _ in d]
    packed = PackedCorpus(in_memory_corpus(docs, np.uint16), 8, first_doc=1)
    start = len(docs[0])
    assert packed.num_rows == -(-(len(flat) - start) // 8)
    ids, seg = packed.rows(np.arange(packed.num_rows)[::-1])
    for r in range(packed.num_rows):
        row = packed.num_rows - 1 - r
        window = range(start + 8 * row, min(start + 8 * row + 8, len(flat)))
        assert ids[r, :len(window)].tolist() == [flat[i] for i in window] and not ids[r, len(window):].any()
        assert seg[r, :len(window)].tolist() == [doc_of[i] - doc_of[window[0]] + 1 for i in window]
        assert not seg[r, len(window):].any()


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
    """Rows and masks of a global batch do not depend on how many processes share it."""
    s = _stream()
    whole = local_batch(s, 5, 8)
    parts = [local_batch(s, 5, 8, p, 4) for p in range(4)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


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


def test_packed_fingerprint_follows_tokens_documents_and_seq_len():
    docs = [list(range(1, 50)), list(range(7, 30)), [5, 6]]
    fp = packed_fingerprint(PackedCorpus(in_memory_corpus(docs), 16, 1))
    assert fp == packed_fingerprint(PackedCorpus(in_memory_corpus([list(d) for d in docs]), 16, 1))
    assert fp["examples"] == 2
    changed = [docs[0], docs[1][:-1] + [99], docs[2]]
    others = [PackedCorpus(in_memory_corpus(changed), 16, 1), PackedCorpus(in_memory_corpus(docs), 8, 1),
              PackedCorpus(in_memory_corpus(docs), 16, 2), PackedCorpus(in_memory_corpus(docs, np.uint16), 16, 1)]
    assert all(packed_fingerprint(o)["blake2b"] != fp["blake2b"] for o in others)
