"""Pretraining data: token corpus -> rows of seq_len -> shuffle(seed, epoch) -> MLM mask(seed, step) -> batch.

The batch of step s is a pure function of (seed, s): example k of the stream is row perm(seed, k // N)[k % N];
the masks of a global batch come from one generator seeded by (seed, s), drawn for the whole global batch so a
row's mask does not depend on how many processes share it. Process p of P reads (and packs and masks) only rows
[p*B/P, (p+1)*B/P) of each global batch, a batch at a time in numpy. A grain MapDataset over steps serves the
batches with prefetching; its iterator state goes into checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from jaxfound.data.token_cache import TokenCorpus, in_memory_corpus
from jaxfound.errors import JaxfoundError


@dataclass(frozen=True)
class PackedCorpus:
    """Documents [first_doc, stop_doc) of a token corpus packed end to end into rows of seq_len tokens.

    Row r is tokens [start + r*L, start + (r+1)*L) of the stream: nothing is materialised; rows() cuts a batch of
    rows and numbers their documents (segment ids restart at 1 in each row; 0 is padding after the last token).
    """

    tokens: TokenCorpus
    seq_len: int
    first_doc: int = 0
    stop_doc: int | None = None

    @functools.cached_property
    def bounds(self) -> tuple[int, int]:
        stop_doc = self.tokens.num_docs if self.stop_doc is None else self.stop_doc
        return int(self.tokens.doc_offsets[self.first_doc]), int(self.tokens.doc_offsets[stop_doc])

    @property
    def num_rows(self) -> int:
        start, stop = self.bounds
        return max(1, math.ceil((stop - start) / self.seq_len))

    def rows(self, index_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids_BxL and segment_ids_BxL of rows index_B."""
        start, stop = self.bounds
        length = self.seq_len
        first_BxL = start + np.asarray(index_B, np.int64)[:, None] * length
        pos_BxL = first_BxL + np.arange(length)
        real_BxL = pos_BxL < stop
        ids_BxL = np.zeros(pos_BxL.shape, np.int32)
        for b, first in enumerate(first_BxL[:, 0]):
            piece = self.tokens.span(int(first), min(int(first) + length, stop))
            ids_BxL[b, :len(piece)] = piece
        doc_BxL = np.searchsorted(self.tokens.doc_offsets, np.minimum(pos_BxL, max(stop - 1, 0)), side="right")
        segment_ids_BxL = np.where(real_BxL, doc_BxL - doc_BxL[:, :1] + 1, 0).astype(np.int32)
        return ids_BxL, segment_ids_BxL

    @property
    def ids_NxL(self) -> np.ndarray:
        """Every row (reads the whole corpus: for small ones and tests)."""
        return self.rows(np.arange(self.num_rows))[0]

    @property
    def segment_ids_NxL(self) -> np.ndarray:
        return self.rows(np.arange(self.num_rows))[1]


def fingerprint(*arrays) -> dict:
    """What identifies a run's training examples: their count and a hash of their tokens (and labels).

    Stored in every checkpoint; a resume whose data hash differs is refused (tests/test_finetune.py), since the
    saved data position would silently point at other examples. arrays: numpy arrays or lists of them, the
    first one giving the count. Hashes content, not paths: moving the data files keeps a run resumable.
    """
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        for x in a if isinstance(a, list) else [a]:
            x = np.ascontiguousarray(x)
            h.update(f"{x.dtype.str}{x.shape}".encode())
            h.update(x.reshape(-1).view(np.uint8))
    return {"examples": len(arrays[0]), "blake2b": h.hexdigest()}


def packed_fingerprint(corpus: PackedCorpus) -> dict:
    """fingerprint of packed rows without reading them: the token corpus's digest, the document range and seq_len
    (the rows are a function of these)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([corpus.tokens.digest, corpus.first_doc, corpus.stop_doc, corpus.seq_len]).encode())
    return {"examples": corpus.num_rows, "blake2b": h.hexdigest()}


def pack_documents(token_lists: list[list[int]], seq_len: int) -> PackedCorpus:
    """Already-tokenized documents packed into rows of seq_len."""
    return PackedCorpus(in_memory_corpus(token_lists), seq_len)


def max_predictions(seq_len: int, mask_prob: float) -> int:
    return max(1, math.ceil(seq_len * mask_prob))


@dataclass(frozen=True)
class MaskDraws:
    """The random numbers masking a batch consumes: a key per position (the lowest keys among a row's candidates
    are masked), a roll per prediction (80% [MASK], 10% random, 10% kept) and a random token per prediction."""

    keys_BxL: np.ndarray
    roll_BxP: np.ndarray
    random_BxP: np.ndarray

    @staticmethod
    def draw(rng: np.random.Generator, rows: int, seq_len: int, num_predictions: int, low: int, high: int):
        return MaskDraws(rng.random((rows, seq_len)), rng.random((rows, num_predictions)),
                         rng.integers(low, high, size=(rows, num_predictions)))

    def __getitem__(self, rows: slice) -> MaskDraws:
        return MaskDraws(self.keys_BxL[rows], self.roll_BxP[rows], self.random_BxP[rows])


def mask_batch(ids_BxL: np.ndarray, candidate_BxL: np.ndarray, draws: MaskDraws, mask_prob: float, mask_id: int):
    """BERT masking of a batch: in each row round(mask_prob * candidates) positions (at most P, at least 1), chosen
    uniformly (the candidates with the lowest keys); 80% become mask_id, 10% a random token, 10% stay.

    candidate_BxL: the positions that may be masked (real, non-special tokens). Returns inputs_BxL and the
    P-wide positions, labels and weights (0 past each row's n).
    """
    rows, num_predictions = draws.roll_BxP.shape
    keys_BxL = np.where(candidate_BxL, draws.keys_BxL, np.inf)
    n_B = np.minimum(num_predictions, np.maximum(1, np.rint(mask_prob * candidate_BxL.sum(1)))).astype(np.int64)
    n_B[~candidate_BxL.any(1)] = 0
    lowest_BxP = np.argsort(keys_BxL, axis=1, kind="stable")[:, :num_predictions]
    chosen_BxP = np.arange(num_predictions) < n_B[:, None]
    positions_BxP = np.sort(np.where(chosen_BxP, lowest_BxP, ids_BxL.shape[1]), axis=1)  # the chosen, ascending
    positions_BxP = np.where(chosen_BxP, positions_BxP, 0)
    r = np.arange(rows)[:, None]
    labels_BxP = np.where(chosen_BxP, ids_BxL[r, positions_BxP], 0)
    new_BxP = np.where(draws.roll_BxP < 0.8, mask_id, np.where(draws.roll_BxP < 0.9, draws.random_BxP, labels_BxP))
    inputs_BxL = ids_BxL.copy()
    inputs_BxL[r.repeat(num_predictions, 1)[chosen_BxP], positions_BxP[chosen_BxP]] = new_BxP[chosen_BxP]
    return (inputs_BxL, positions_BxP.astype(np.int32), labels_BxP.astype(np.int32),
            chosen_BxP.astype(np.float32))


@dataclass(frozen=True)
class StreamSpec:
    """What turns packed rows into training examples."""

    task: str  # 'mlm' or 'clm'
    seed: int
    mask_prob: float = 0.15
    mask_id: int = 0
    special_ids: tuple = ()
    vocab_size: int = 0


class ExampleStream:
    """Example k of an endless, epoch-reshuffled stream over the packed rows; batches are pure in (seed, step)."""

    def __init__(self, corpus: PackedCorpus, spec: StreamSpec, shuffle: bool = True):
        self.corpus, self.spec, self.shuffle = corpus, spec, shuffle
        self.num_rows, self.seq_len = corpus.num_rows, corpus.seq_len
        self.num_predictions = max_predictions(self.seq_len, spec.mask_prob)
        self._special = np.array(spec.special_ids, dtype=np.int32)

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a handful of epochs live at once)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.spec.seed, epoch]).permutation(self.num_rows)

    def row_of(self, k_B: np.ndarray) -> np.ndarray:
        """The packed row that is example k of the stream, for each k."""
        epoch_B, i_B = np.divmod(np.asarray(k_B, np.int64), self.num_rows)
        if not self.shuffle:
            return i_B
        out = np.empty_like(i_B)
        for epoch in np.unique(epoch_B):
            at = epoch_B == epoch
            out[at] = self._permutation(int(epoch))[i_B[at]]
        return out

    def batch(self, step: int, global_batch: int, lo: int, hi: int) -> dict:
        """Rows [lo, hi) of the global batch of step."""
        ids, seg = self.corpus.rows(self.row_of(step * global_batch + np.arange(lo, hi)))
        if self.spec.task == "clm":
            return {"input_ids": ids, "segment_ids": seg}
        rng = np.random.default_rng([self.spec.seed, 1, int(step)])
        draws = MaskDraws.draw(rng, global_batch, self.seq_len, self.num_predictions, len(self._special),
                               max(self.spec.vocab_size, len(self._special) + 1))[lo:hi]
        candidate = (seg > 0) & ~np.isin(ids, self._special)
        inputs, pos, lab, w = mask_batch(ids, candidate, draws, self.spec.mask_prob, self.spec.mask_id)
        return {"input_ids": inputs, "segment_ids": seg, "mlm_positions": pos, "mlm_labels": lab, "mlm_weights": w}


def local_batch(stream: ExampleStream, step: int, global_batch: int, process_index: int = 0,
                process_count: int = 1) -> dict:
    """This process's rows of the global batch of `step`."""
    if global_batch % process_count:
        raise JaxfoundError(f"train.batch_size={global_batch} must be divisible by the {process_count} processes")
    b = global_batch // process_count
    return stream.batch(int(step), global_batch, process_index * b, (process_index + 1) * b)


def batch_dataset(stream: ExampleStream, global_batch: int, process_index: int = 0, process_count: int = 1):
    """A grain MapDataset whose element s is this process's slice of the batch of step s."""
    import grain

    steps = grain.MapDataset.range(2**40)
    return steps.map(lambda s: local_batch(stream, int(s), global_batch, process_index, process_count))


def batch_iterator(stream, global_batch, process_index=0, process_count=1, prefetch: int = 4):
    """A checkpointable grain iterator over batches (state = the next step) with background prefetch."""
    import grain

    ds = batch_dataset(stream, global_batch, process_index, process_count)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
