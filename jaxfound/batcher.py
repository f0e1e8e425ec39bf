"""Dynamic batching of encoders (NER, classification): concurrent requests grouped into length buckets.

    batcher = TextBatcher(run.model, run.params, run.task, run.labels, run.tokenizer, seq_len=128, max_batch=32)
    batcher.compile()
    batcher.start()
    batcher.submit(["EU rejects German call"], on_done=print)   # on_done(rows) or on_error(message), once

One thread collects requests for up to wait_ms after the first arrives (or until max_batch windows wait), tokenizes
them as `jaxfound predict` does (the task's inputs), sorts their windows by length and runs them in batches of a
(batch bucket, length bucket) shape compiled at start-up; each request gets the task's rows (entities with
character offsets, or labels), the same JSON as `jaxfound predict`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.data import finetune as ftdata
from jaxfound.engine import RequestQueue, power_buckets
from jaxfound.generation import single_device_mesh
from jaxfound.inference import make_predict_step
from jaxfound.sharding import global_batch

MIN_LENGTH_BUCKET = 16


@dataclass(eq=False)
class TextRequest:
    texts: list[str]
    on_done: Callable[[list[dict]], None]
    on_error: Callable[[str], None]
    submitted_at: float = 0.0


class TextBatcher(RequestQueue):
    """A tagging or classification model behind a request queue (see the module docstring)."""

    thread_name = "jaxfound-batcher"

    def __init__(self, model, params, task, labels, tokenizer, *, seq_len: int, max_batch: int = 32,
                 wait_ms: float = 5.0, max_queue: int = 256, mesh=None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        super().__init__(max_queue)
        self.model, self.task, self.labels, self.tokenizer = model, task, labels, tokenizer
        self.seq_len, self.max_batch, self.wait = seq_len, max_batch, wait_ms / 1000
        self.mesh = mesh or single_device_mesh()
        self.pad_id = ftdata.special_ids(tokenizer)[2]
        self.length_buckets = power_buckets(min(MIN_LENGTH_BUCKET, seq_len), seq_len)
        self.batch_buckets = power_buckets(1, max_batch)
        self.on_batch = on_batch or (lambda windows, rows, seconds: None)
        self._params_tree = params
        self._step = make_predict_step(model, self.mesh)

    def compile(self, progress: Callable[[str], None] | None = None) -> float:
        """Place the params and run every (batch bucket, length bucket) shape once; the seconds it took."""
        start = time.perf_counter()
        rep = NamedSharding(self.mesh, P())
        self.params = jax.device_put(self._params_tree, rep)
        for B in self.batch_buckets:
            for L in self.length_buckets:
                if progress:
                    progress(f"predict {B}x{L}")
                batch = {"input_ids": np.zeros((B, L), np.int32), "attention_mask": np.ones((B, L), np.int32),
                         "token_type_ids": np.zeros((B, L), np.int32)}
                jax.block_until_ready(self._step(self.params, global_batch(batch, self.mesh)))
        self.compiled, self.compile_seconds = True, time.perf_counter() - start
        return self.compile_seconds

    def submit(self, request: TextRequest) -> TextRequest:
        return self.enqueue(request)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closing:
                    self._lock.wait(0.5)
                if not self._waiting and self._closing:
                    return
            deadline = time.perf_counter() + self.wait
            with self._lock:  # wait a moment for more requests, unless a full batch waits already
                while sum(len(r.texts) for r in self._waiting) < self.max_batch and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                group, count = [], 0
                while self._waiting and (not group or count + len(self._waiting[0].texts) <= self.max_batch):
                    group.append(self._waiting.popleft())
                    count += len(group[-1].texts)
            self._serve(group)

    def _serve(self, group: list[TextRequest]) -> None:
        texts = [t for r in group for t in r.texts]
        try:
            split = self.task.inputs(texts, self.tokenizer, self.seq_len)
            rows = self.task.rows(texts, split, self.task.decode(split, self.predict_windows(split.windows),
                                                                 self.labels))
        except Exception as e:  # one bad batch fails its requests, never the thread
            for r in group:
                r.on_error(f"{type(e).__name__}: {e}")
            return
        i = 0
        for r in group:
            r.on_done(rows[i:i + len(r.texts)])
            i += len(r.texts)

    def shapes(self, lengths: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """(window indices, batch bucket) per device call: windows sorted by length, cut where the length bucket
        changes; a batch's filler rows are taken by the next (shorter) windows rather than left empty."""
        order = np.argsort(-lengths, kind="stable")
        buckets = np.array([ftdata.bucket_length(int(n), self.length_buckets) for n in lengths[order]])
        out, i = [], 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < self.max_batch and buckets[j] == buckets[i]:
                j += 1
            B = next(b for b in self.batch_buckets if b >= j - i)
            j = min(i + B, len(order))  # fill the batch with shorter windows (padded to this length)
            out.append((order[i:j], B))
            i = j
        return out

    def predict_windows(self, windows: ftdata.Windows) -> list[np.ndarray]:
        """Predictions of every window, in batches of the compiled shapes (see shapes)."""
        start = time.perf_counter()
        out: list = [None] * len(windows.lengths)
        for rows, B in self.shapes(windows.lengths):
            rows = np.r_[rows, np.full(B - len(rows), -1)]
            batch = ftdata.collate(windows, rows, B, self.length_buckets, self.pad_id, self.task.token_level)
            batch.pop("labels")
            pred = np.asarray(self._step(self.params, global_batch(batch, self.mesh)))
            for j, r in enumerate(rows):
                if r >= 0:
                    out[r] = pred[j]
        self.on_batch(len(out), len(out), time.perf_counter() - start)
        return out


__all__ = ["TextBatcher", "TextRequest"]
