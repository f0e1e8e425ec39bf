"""Hooks around the train loop: what happens with its rows and evaluations, kept out of the loop itself.

A hook has any of: on_start(step), on_step(step), on_train(row) (a train row), on_eval(step, params, metrics),
on_row(row) (what metrics.jsonl holds: a train row, an evaluation, or both merged), on_end().
`default_hooks` gives the ones every run has.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from jaxfound import runs


class MetricsLog:
    """metrics.jsonl: one JSON row per log step and per evaluation; rows past a resumed step are dropped."""

    def __init__(self, run_dir):
        self.run_dir, self.file = run_dir, None

    def on_start(self, step: int):
        self.file = runs.open_metrics_log(self.run_dir, step)

    def on_row(self, row: dict):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def on_end(self):
        self.file.close()


class TensorBoard:
    """Train rows as train/<key> and evaluations as eval/<key> scalars (run_dir/tensorboard), for the curves users
    already look at; a resumed run hides the events a killed one logged past its checkpoint."""

    def __init__(self, log_dir):
        self.log_dir, self.writer = str(log_dir), None

    def on_start(self, step: int):
        self.writer = SummaryWriter(self.log_dir, purge_step=step + 1)

    def _add(self, prefix: str, step: int, values: dict):
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, step)
        self.writer.flush()

    def on_train(self, row: dict):
        self._add("train", row["step"], row)

    def on_eval(self, step: int, params, metrics: dict):
        self._add("eval", step, metrics)

    def on_end(self):
        self.writer.close()


class Progress:
    """A progress bar with loss, tokens/s and lr; a line per evaluation."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.bar = total, desc, enabled, None

    def on_start(self, step: int):
        self.bar = tqdm(total=self.total, initial=step, disable=not self.enabled, dynamic_ncols=True, desc=self.desc)

    def on_train(self, row: dict):
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}")

    def on_step(self, step: int):
        self.bar.update(1)

    def on_eval(self, step: int, params, metrics: dict):
        self.bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                    if isinstance(v, (int, float))))

    def on_end(self):
        self.bar.close()


class BestParams:
    """Keeps the params with the highest value of metric ('-name': the lowest of name, e.g. '-eval_loss') in
    run_dir/best; the summary says which step."""

    def __init__(self, run_dir, metric: str, summary: dict):
        self.sign = -1.0 if metric.startswith("-") else 1.0
        self.run_dir, self.metric, self.summary, self.best = run_dir, metric.lstrip("-"), summary, -np.inf

    def on_eval(self, step: int, params, metrics: dict):
        value = self.sign * metrics[self.metric] if self.metric in metrics else -np.inf
        if step > 0 and value > self.best:  # the untrained model is only a baseline
            self.best = value
            runs.save_best(self.run_dir, params)
            self.summary["best"] = {"step": step, self.metric: metrics[self.metric]}


class Preemption:
    """SIGTERM -> finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training loss (and eval loss) against step."""
    rows = runs.read_metrics(run_dir)
    if not rows:
        return None
    fig = Figure(figsize=(6, 4))  # no pyplot: the user's backend stays as it is
    ax = fig.subplots()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "loss.png", dpi=100)
    return Path(run_dir) / "loss.png"


def default_hooks(run_dir, total_steps: int, desc: str, is_main: bool, best_metric, summary: dict) -> list:
    """Progress on every process; the files (metrics.jsonl, TensorBoard, best/) on process 0 only."""
    hooks = [Progress(total_steps, desc, is_main)]
    if is_main:
        hooks += [MetricsLog(run_dir), TensorBoard(Path(run_dir) / "tensorboard")]
    if best_metric:
        hooks.append(BestParams(run_dir, best_metric, summary))
    return hooks


def call(hooks, event: str, *args) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(*args)
