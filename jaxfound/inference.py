"""The one inference path of encoders: a Predictor holds a model's jitted predict step on a mesh and turns a task's
Split into length-bucketed batches, window predictions, decoded labels and scores.

    predictor = Predictor(model, task, labels, tokenizer, seq_len=128, batch_size=32, mesh=mesh)
    report = predictor.score(params, task.read("valid.txt", data_cfg, labels, tokenizer, 128))

Fine-tuning's evaluation, `evaluate`, `predict`, the registry's merge validation, the quantize comparison and the
benchmarks all call it.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxfound.data import finetune as ftdata
from jaxfound.sharding import LOGICAL_RULES, activation_sharding, global_batch

EVAL_BATCH = 64  # at least this many windows per predict batch (rounded up to the data-parallel shards)


def make_predict_step(model, mesh):
    """jit (params, batch) -> argmax labels, replicated on every process."""
    def fn(params, batch):
        with activation_sharding(mesh, LOGICAL_RULES):
            logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                 batch.get("token_type_ids"))
        return jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def eval_batch_size(mesh, batch_size: int) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-max(batch_size, EVAL_BATCH) // shards) * shards


def predict_windows(predict_step, params, batches, mesh, num_windows: int) -> list[np.ndarray]:
    """Predictions for every window (position-wise for tagging, one label for cls), in window order."""
    out = [None] * num_windows
    p, n = jax.process_index(), jax.process_count()
    for rows, batch in batches:
        b = len(rows) // n
        local = {k: v[p * b:(p + 1) * b] for k, v in batch.items() if k != "labels"}
        pred = np.asarray(jax.device_get(predict_step(params, global_batch(local, mesh))))
        for j, r in enumerate(rows):
            if r >= 0:
                out[r] = pred[j]
    return out


class Predictor:
    """A model of a task on a mesh: the predict step compiled once per batch shape, batches made once per split."""

    def __init__(self, model, task, labels: list[str], tokenizer, seq_len: int, batch_size: int, mesh):
        self.model, self.task, self.labels, self.seq_len, self.mesh = model, task, labels, seq_len, mesh
        self.tokenizer = tokenizer
        self.step = make_predict_step(model, mesh)
        self.batch_size = eval_batch_size(mesh, batch_size)
        self.pad_id = ftdata.special_ids(tokenizer)[2]
        self._batches = {}

    def for_model(self, model) -> Predictor:
        """Another model of the same task (e.g. its int8 copy) on this mesh, sharing the batches made so far."""
        other = copy.copy(self)  # the batch cache is shared, not copied
        other.model, other.step = model, make_predict_step(model, self.mesh)
        return other

    def read(self, path, data_cfg):
        """A labelled file of the task, tokenized like the model was trained."""
        return self.task.read(path, data_cfg, self.labels, self.tokenizer, self.seq_len)

    def batches(self, split) -> list[tuple[np.ndarray, dict]]:
        """The split's length-sorted batches (made once per split)."""
        if id(split) not in self._batches:
            self._batches[id(split)] = (split, ftdata.eval_batches(split.windows, self.batch_size, self.seq_len,
                                                                   self.pad_id, self.task.token_level))
        return self._batches[id(split)][1]

    def predict(self, params, split) -> list:
        """Decoded predictions: word tags per sentence (tagging) or one label per text (cls)."""
        preds = predict_windows(self.step, params, self.batches(split), self.mesh, len(split.windows))
        return self.task.decode(split, preds, self.labels)

    def score(self, params, split) -> dict:
        """The task's report of params on a labelled split."""
        return self.task.score(split.gold, self.predict(params, split))
