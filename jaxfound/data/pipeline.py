"""Pretraining data: tokenize -> pack to seq_len -> shuffle(seed, epoch) -> MLM mask(seed, index) -> batch.

The batch of step s is a pure function of (seed, s): example k of the stream is chunk
perm(seed, k // N)[k % N], masked with a generator seeded by (seed, k). Process p of P reads only rows
[p*B/P, (p+1)*B/P) of each global batch. A grain MapDataset over steps serves the batches with
prefetching; its iterator state goes into checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from jaxfound.errors import JaxfoundError


@dataclass(frozen=True)
class PackedCorpus:
    """Documents packed end to end into rows of seq_len tokens; segment 0 is padding."""

    ids_NxL: np.ndarray
    segment_ids_NxL: np.ndarray


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


def pack_documents(token_lists: list[list[int]], seq_len: int) -> PackedCorpus:
    """Concatenate documents and cut into rows; segment ids restart at 1 in each row (doc boundaries)."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    flat = np.fromiter((i for t in token_lists for i in t), dtype=np.int32, count=int(lengths.sum()))
    doc = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    rows = max(1, math.ceil(len(flat) / seq_len))
    pad = rows * seq_len - len(flat)
    ids = np.concatenate([flat, np.zeros(pad, np.int32)]).reshape(rows, seq_len)
    doc = np.concatenate([doc, np.full(pad, -1)]).reshape(rows, seq_len)
    # renumber documents within each row from 1; padding stays 0
    first = doc[:, :1]
    seg = (doc - first + 1).astype(np.int32)
    seg[doc < 0] = 0
    return PackedCorpus(ids, seg)


def max_predictions(seq_len: int, mask_prob: float) -> int:
    return max(1, math.ceil(seq_len * mask_prob))


def mask_tokens(ids_L, rng: np.random.Generator, mask_prob: float, num_predictions: int, mask_id: int,
                special_ids: np.ndarray, vocab_size: int):
    """BERT masking: round(mask_prob * real tokens) positions; 80% [MASK], 10% random token, 10% unchanged."""
    candidates = np.flatnonzero(~np.isin(ids_L, special_ids))
    n = min(num_predictions, max(1, int(round(mask_prob * len(candidates))))) if len(candidates) else 0
    positions = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.zeros(0, np.int64)
    labels = ids_L[positions]
    inputs = ids_L.copy()
    roll = rng.random(n)
    inputs[positions[roll < 0.8]] = mask_id
    rand = (roll >= 0.8) & (roll < 0.9)
    inputs[positions[rand]] = rng.integers(len(special_ids), vocab_size, size=int(rand.sum()))
    out_pos = np.zeros(num_predictions, np.int32)
    out_lab = np.zeros(num_predictions, np.int32)
    out_w = np.zeros(num_predictions, np.float32)
    out_pos[:n], out_lab[:n], out_w[:n] = positions, labels, 1.0
    return inputs, out_pos, out_lab, out_w


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
    """Example k of an endless, epoch-reshuffled stream over the packed rows; pure in (seed, k)."""

    def __init__(self, corpus: PackedCorpus, spec: StreamSpec, shuffle: bool = True):
        self.corpus, self.spec, self.shuffle = corpus, spec, shuffle
        self.num_rows, self.seq_len = corpus.ids_NxL.shape
        self.num_predictions = max_predictions(self.seq_len, spec.mask_prob)
        self._special = np.array(spec.special_ids, dtype=np.int32)

    @functools.lru_cache(maxsize=4)  # noqa: B019  (a handful of epochs live at once)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.spec.seed, epoch]).permutation(self.num_rows)

    def __getitem__(self, k: int) -> dict:
        epoch, i = divmod(int(k), self.num_rows)
        row = self._permutation(epoch)[i] if self.shuffle else i
        ids, seg = self.corpus.ids_NxL[row], self.corpus.segment_ids_NxL[row]
        if self.spec.task == "clm":
            return {"input_ids": ids, "segment_ids": seg}
        rng = np.random.default_rng([self.spec.seed, 1, int(k)])
        inputs, pos, lab, w = mask_tokens(ids, rng, self.spec.mask_prob, self.num_predictions, self.spec.mask_id,
                                          self._special, self.spec.vocab_size)
        return {"input_ids": inputs, "segment_ids": seg, "mlm_positions": pos, "mlm_labels": lab, "mlm_weights": w}


def local_batch(stream: ExampleStream, step: int, global_batch: int, process_index: int = 0,
                process_count: int = 1) -> dict:
    """This process's rows of the global batch of `step`."""
    if global_batch % process_count:
        raise JaxfoundError(f"train.batch_size={global_batch} must be divisible by the {process_count} processes")
    b = global_batch // process_count
    start = step * global_batch + process_index * b
    rows = [stream[start + j] for j in range(b)]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


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
