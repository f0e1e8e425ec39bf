"""fit(): the train loop. Steps, evaluation, checkpoints, resume, preemption and the non-finite policy; what
happens with metrics rows (log file, TensorBoard, progress, best params) is up to hooks (train/hooks.py).

Everything it calls is a pure function (train/step.py, data/pipeline.py) that a researcher can import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from jaxfound import checkpoint as ckpt
from jaxfound import runs
from jaxfound.config import to_dict
from jaxfound.errors import JaxfoundError
from jaxfound.sharding import global_batch
from jaxfound.train import hooks as train_hooks
from jaxfound.train.build import Training, build

TRAIN_KEYS = {"step", "loss", "accuracy", "lr", "grad_norm", "tokens_per_s"}  # a train row's keys


@dataclass
class Job:
    """What a run trains: the model, its task, where batches come from and how to evaluate."""

    model: object
    task: object  # jaxfound.tasks.Task
    make_iterator: Callable[[], object]  # -> checkpointable grain iterator of process-local numpy batches
    total_steps: int
    evaluate: Callable[[object, int], dict]  # (params, step) -> {'eval_loss': ..., ...}
    seq_len: int
    init_params: object = None  # start from these params (fine-tuning) instead of a random init
    best_metric: str | None = None  # keep the params with the highest value of this eval metric in run_dir/best
    extra: dict = field(default_factory=dict)  # recorded in the summary (tokenizer, labels, data sizes)
    data_fingerprint: dict | None = None  # jaxfound.data.pipeline.fingerprint of the training examples
    eval_every: int | None = None  # None: train.eval_every (fine-tuning: once per epoch)
    log_every: int | None = None  # None: train.log_every


@dataclass
class _Loop:
    """The mutable side of one fit: state, step, the pending metrics and the token count since the last row."""

    cfg: object
    job: Job
    training: Training
    hooks: list
    mngr: object
    iterator: object
    state: object
    step: int
    pending: tuple | None = None  # (step, device metrics): read one step late so the host never waits on the device
    tokens: int = 0
    t_since: float = field(default_factory=time.perf_counter)
    config: dict = field(default_factory=dict)  # the resolved config, saved with every checkpoint
    history: list = field(default_factory=list)  # this invocation's rows (the summary of processes other than 0)

    def emit(self, train: dict | None, ev: dict | None = None) -> None:
        """A metrics row: the train row, an evaluation, or both merged (as metrics.jsonl holds them)."""
        if train is not None:
            train_hooks.call(self.hooks, "on_train", train)
        row = {**(train or {"step": self.step}), **(ev or {})}
        self.history.append(row)
        train_hooks.call(self.hooks, "on_row", row)

    def save(self, force: bool = False):
        ckpt.save(self.mngr, self.step, self.state, self.iterator, self.config, force=force,
                  data_fingerprint=self.job.data_fingerprint)

    def train_row(self, step: int, m) -> dict:
        dt = max(time.perf_counter() - self.t_since, 1e-9)
        row = {"step": step, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
               "lr": float(self.training.schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
               "tokens_per_s": round(self.tokens / dt, 1)}
        self.tokens, self.t_since = 0, time.perf_counter()
        return row

    def drain(self) -> tuple[int, dict]:
        """The pending step's metrics, read now; a non-finite step is skipped (reported) or stops the run."""
        (s, m), self.pending = self.pending, None
        m = jax.device_get(m)
        if not bool(m["finite"]):
            if self.cfg.train.nonfinite == "stop":
                self.emit(self.train_row(s, m))
                self.stop_nonfinite(s)
            print(f"step {s}: non-finite loss or gradient; update skipped (train.nonfinite=skip)")
        return s, m

    def stop_nonfinite(self, bad_step: int):
        """train.nonfinite=stop: checkpoint the current state (the bad update was not applied) and raise."""
        train_hooks.call(self.hooks, "on_end")
        ckpt.finish(self.mngr)
        if self.mngr.latest_step() != self.step:  # (a SIGTERM save may already hold this step)
            self.save(force=True)
        ckpt.finish(self.mngr, close=True)
        raise JaxfoundError(
            f"step {bad_step}: loss or gradient is NaN/inf (train.nonfinite=stop); its update was not applied and "
            f"the last good state is saved at step {self.step} in {self.cfg.run.dir}/checkpoints; "
            "lower train.lr or check the data, or set train.nonfinite=skip")

    def evaluate(self, row: dict | None = None):
        ev = self.job.evaluate(self.state.params, self.step)
        self.emit(row, ev)
        self.tokens, self.t_since = 0, time.perf_counter()
        train_hooks.call(self.hooks, "on_eval", self.step, self.state.params, ev)

    def run_step(self, batch_local: dict, every: tuple[int, int, int]) -> None:
        log_every, eval_every, ckpt_every = every
        self.state, metrics = self.training.step(self.state, global_batch(batch_local, self.training.mesh))
        self.step += 1
        self.tokens += _tokens(batch_local) * jax.process_count()
        if self.pending is not None:
            s, m = self.drain()
            if s % log_every == 0:
                self.emit(self.train_row(s, m))
        self.pending = (self.step, metrics)
        train_hooks.call(self.hooks, "on_step", self.step)
        if self.step % eval_every == 0 or self.step == self.job.total_steps:
            self.evaluate(self.train_row(*self.drain()))
        if (ckpt_every and self.step % ckpt_every == 0) or self.step == self.job.total_steps:
            self.save()


def _tokens(batch: dict) -> int:
    if "segment_ids" in batch:
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.count_nonzero(batch["attention_mask"]))


def _start(cfg, job: Job, training: Training | None, hooks) -> _Loop:
    """Build (unless given), restore the latest good checkpoint (or keep the fresh state), open the hooks."""
    run_dir = Path(cfg.run.dir)
    runs.check_run_dir(run_dir)
    if jax.process_index() == 0:
        (run_dir / "summary.json").unlink(missing_ok=True)  # a stale summary must not vouch for this run
        runs.write_config(run_dir, cfg)
    training = training or build(cfg, job.model, job.task.loss, job.seq_len,
                                 cfg.train.schedule_steps or job.total_steps, job.init_params)
    mngr = ckpt.manager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    iterator = job.make_iterator()
    abstract = ckpt.abstract_like(training.state, training.shardings)
    ckpt.check_space(run_dir, abstract)
    step0, restored, skipped = ckpt.restore_latest(mngr, abstract, iterator, job.data_fingerprint)
    for bad_step, reason in skipped:
        print(f"resume: skipped checkpoint step {bad_step} ({reason}); moved aside as {bad_step}.unreadable")
    if restored is not None:
        print(f"resume: continuing from step {step0} in {run_dir}")
    state = restored if restored is not None else training.state
    training.state = None  # the loop owns the state now: a restored run does not keep the fresh one alive
    loop = _Loop(cfg, job, training, hooks, mngr, iterator, state, int(jax.device_get(state.step)),
                 config=to_dict(cfg))
    if loop.step >= job.total_steps:
        print(f"nothing to do: step {loop.step} >= train.steps {job.total_steps}")
    train_hooks.call(hooks, "on_start", loop.step)
    return loop


def fit(cfg, job: Job, training: Training | None = None, hooks: list | None = None) -> dict:
    """Train job under cfg, resuming from run.dir if it holds checkpoints; returns the summary (with 'state').

    training: what `build` made (built here if None); hooks: default_hooks (progress, metrics.jsonl, TensorBoard,
    best params) if None.
    """
    summary = {"run_dir": str(Path(cfg.run.dir)), "preempted": False, **job.extra}
    is_main = jax.process_index() == 0
    hooks = hooks if hooks is not None else train_hooks.default_hooks(
        cfg.run.dir, job.total_steps, cfg.train.task, is_main, job.best_metric, summary)
    loop = _start(cfg, job, training, hooks)
    summary["start_step"], t_start = loop.step, time.perf_counter()
    every = (job.log_every or cfg.train.log_every, job.eval_every or cfg.train.eval_every, cfg.checkpoint.every)
    if loop.step == 0 and job.total_steps > 0 and cfg.train.eval_at_start:  # every curve's baseline
        loop.evaluate()
    with train_hooks.Preemption() as preempt:
        while loop.step < job.total_steps:
            loop.run_step(next(loop.iterator), every)
            if preempt.requested:
                print(f"SIGTERM: saving a checkpoint at step {loop.step} and exiting")
                loop.save(force=True)
                summary["preempted"] = True
                break
        if loop.pending is not None:
            loop.emit(loop.train_row(*loop.drain()))
    train_hooks.call(hooks, "on_end")
    ckpt.finish(loop.mngr, close=True)
    return _summarize(summary, loop, time.perf_counter() - t_start, is_main)


def _summarize(summary: dict, loop: _Loop, elapsed: float, is_main: bool) -> dict:
    """The whole run's summary (earlier invocations on this run dir included), from metrics.jsonl."""
    history = runs.read_metrics(loop.cfg.run.dir) if is_main else loop.history
    evals = [r for r in history if set(r) - TRAIN_KEYS]  # rows with an evaluation
    trains = [r for r in history if "loss" in r]
    summary.update({
        "steps": loop.step, "steps_this_run": loop.step - summary["start_step"], "seconds": round(elapsed, 2),
        "final_loss": trains[-1]["loss"] if trains else None,
        "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
        "nonfinite_steps": int(jax.device_get(loop.state.nonfinite_steps)), "mesh": dict(loop.training.mesh.shape),
    })
    summary["state"] = loop.state
    return summary


def finish_run(run_dir, summary: dict) -> None:
    """summary.json, written once and whole, and loss.png (process 0)."""
    if jax.process_index() == 0:
        runs.write_json(Path(run_dir) / "summary.json", {k: v for k, v in summary.items() if k != "state"}, 2)
        train_hooks.plot_losses(Path(run_dir))

