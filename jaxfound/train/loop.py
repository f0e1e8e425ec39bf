"""fit(): the one impure driver. Steps, eval, checkpoints, metrics, progress, resume, preemption.

Everything it calls is a pure function (train/step.py, data/pipeline.py) that a researcher can import.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxfound import checkpoint as ckpt
from jaxfound.config import to_dict
from jaxfound.errors import JaxfoundError
from jaxfound.sharding import global_batch, initialize_distributed, make_mesh
from jaxfound.train.optim import TRUNKS, lr_schedule, make_optimizer
from jaxfound.train.state import init_state, state_shardings
from jaxfound.train.step import make_train_step

log = logging.getLogger("jaxfound")


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
    extra: dict = field(default_factory=dict)  # recorded in summary.json (tokenizer, labels, data sizes)
    data_fingerprint: dict | None = None  # jaxfound.data.pipeline.fingerprint of the training examples


def check_run_dir(run_dir: Path) -> None:
    """Fail before any work if the run dir cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"  # per process: several may share run_dir
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise JaxfoundError(f"run.dir={run_dir}: not writable ({e.strerror}); choose another run.dir") from None


class _Preemption:
    """SIGTERM -> finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

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


def _metrics_log(run_dir: Path, resume_step: int):
    """metrics.jsonl opened for append; lines past the resumed step (from a run that died later) are dropped."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [r for r in _read_metrics(path) if r.get("step", 0) <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path.open("a")


def _read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows (none if it is missing; a line cut by a crash is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training loss (and eval loss) against step."""
    rows = _read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _tokens(batch: dict) -> int:
    if "segment_ids" in batch:
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.count_nonzero(batch["attention_mask"]))


def fit(cfg, job: Job) -> dict:
    """Train job under cfg: resume from run.dir if it holds checkpoints; returns the summary."""
    run_dir = Path(cfg.run.dir)
    check_run_dir(run_dir)
    initialize_distributed(cfg.mesh)
    is_main = jax.process_index() == 0
    config_dict = to_dict(cfg)
    if is_main:
        (run_dir / "summary.json").unlink(missing_ok=True)  # a stale summary must not vouch for this run
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2))

    # ---- Build mesh, optimizer, shardings and the jitted step ----
    mesh = make_mesh(cfg.mesh)
    schedule_steps = cfg.train.schedule_steps or job.total_steps
    tx = make_optimizer(cfg.train, schedule_steps)
    schedule = lr_schedule(cfg.train, schedule_steps)
    shardings = state_shardings(job.model, tx, mesh, job.seq_len)
    frozen = TRUNKS if cfg.train.freeze == "trunk" else ()
    train_step = make_train_step(job.model, tx, job.task.loss, mesh, shardings, cfg.train.seed, cfg.train.grad_accum,
                                 frozen)
    mngr = ckpt.manager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    iterator = job.make_iterator()

    # ---- Load checkpoint (or initialise, born sharded) ----
    state = init_state(job.model, tx, mesh, job.seq_len, cfg.train.seed, shardings, job.init_params)
    abstract = ckpt.abstract_like(state, shardings)
    ckpt.check_space(run_dir, abstract)
    step0, restored, skipped = ckpt.restore_latest(mngr, abstract, iterator, job.data_fingerprint)
    for bad_step, reason in skipped:
        print(f"resume: skipped checkpoint step {bad_step} ({reason}); moved aside as {bad_step}.unreadable")
    if restored is not None:
        state = restored
        print(f"resume: continuing from step {step0} in {run_dir}")
    step = int(jax.device_get(state.step))
    if step >= job.total_steps:
        print(f"nothing to do: step {step} >= train.steps {job.total_steps}")
    metrics_file = _metrics_log(run_dir, step) if is_main else None

    # ---- Train loop ----
    summary = {"run_dir": str(run_dir), "start_step": step, "preempted": False, **job.extra}
    best_value = -np.inf
    history = []
    tokens_since, t_since = 0, time.perf_counter()
    t_start = time.perf_counter()
    pending = None  # (step, device metrics): read one step late so the host never waits on the device
    bar = tqdm(total=job.total_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc=cfg.train.task)

    def record(row: dict):
        history.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    def drain(pending):
        s, m = pending
        m = jax.device_get(m)
        if not bool(m["finite"]):
            if cfg.train.nonfinite == "stop":
                record(_train_row(bar, s, m, schedule, tokens_since, t_since))
                stop_nonfinite(s)
            print(f"step {s}: non-finite loss or gradient; update skipped (train.nonfinite=skip)")
        return s, m

    def stop_nonfinite(bad_step: int):
        """train.nonfinite=stop: checkpoint the current state (the bad update was not applied) and raise."""
        bar.close()
        ckpt.finish(mngr)
        if mngr.latest_step() != step:  # (a SIGTERM save may already hold this step)
            ckpt.save(mngr, step, state, iterator, config_dict, force=True,
                      data_fingerprint=job.data_fingerprint)
        ckpt.finish(mngr, close=True)
        raise JaxfoundError(
            f"step {bad_step}: loss or gradient is NaN/inf (train.nonfinite=stop); its update was not applied and "
            f"the last good state is saved at step {step} in {run_dir}/checkpoints; "
            "lower train.lr or check the data, or set train.nonfinite=skip")

    if step == 0 and job.total_steps > 0 and cfg.train.eval_at_start:  # the untrained model: every curve's baseline
        ev0 = job.evaluate(state.params, 0)
        record({"step": 0, **ev0})
        bar.write("step 0: " + "  ".join(f"{k}={v:.4g}" for k, v in ev0.items() if isinstance(v, (int, float))))

    with _Preemption() as preempt:
        while step < job.total_steps:
            batch_local = next(iterator)
            batch = global_batch(batch_local, mesh)
            state, metrics = train_step(state, batch)
            step += 1
            tokens_since += _tokens(batch_local) * jax.process_count()
            if pending is not None:
                s_prev, m_prev = drain(pending)
                if s_prev % cfg.train.log_every == 0:
                    record(_train_row(bar, s_prev, m_prev, schedule, tokens_since, t_since))
                    tokens_since, t_since = 0, time.perf_counter()
            pending = (step, metrics)
            bar.update(1)
            is_eval = step % cfg.train.eval_every == 0 or step == job.total_steps
            if is_eval:
                s_prev, m_prev = drain(pending)
                pending = None
                row = _train_row(bar, s_prev, m_prev, schedule, tokens_since, t_since)
                ev = job.evaluate(state.params, step)
                record({**row, **ev})
                tokens_since, t_since = 0, time.perf_counter()
                bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in ev.items()
                                                        if isinstance(v, (int, float))))
                if job.best_metric and ev.get(job.best_metric, -np.inf) > best_value:
                    best_value = ev[job.best_metric]
                    ckpt.save_params(run_dir / "best", state.params)
                    summary["best"] = {"step": step, job.best_metric: best_value}
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == job.total_steps:
                ckpt.save(mngr, step, state, iterator, config_dict, data_fingerprint=job.data_fingerprint)
            if preempt.requested:
                print(f"SIGTERM: saving a checkpoint at step {step} and exiting")
                ckpt.save(mngr, step, state, iterator, config_dict, force=True,
                      data_fingerprint=job.data_fingerprint)
                summary["preempted"] = True
                break
        if pending is not None:
            s_prev, m_prev = drain(pending)
            record(_train_row(bar, s_prev, m_prev, schedule, tokens_since, t_since))
    bar.close()
    ckpt.finish(mngr, close=True)
    if metrics_file is not None:
        metrics_file.close()

    # ---- Summary ----
    elapsed = time.perf_counter() - t_start
    if is_main:  # the whole run's rows (earlier runs on this dir included), not only this invocation's
        history = _read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in history if "eval_loss" in r or (job.best_metric and job.best_metric in r)]
    trains = [r for r in history if "loss" in r]
    steps_run = step - summary["start_step"]
    summary.update({
        "steps": step,
        "steps_this_run": steps_run,
        "seconds": round(elapsed, 2),
        "final_loss": trains[-1]["loss"] if trains else None,
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "nonfinite_steps": int(jax.device_get(state.nonfinite_steps)),
        "mesh": dict(mesh.shape),
    })
    if is_main:  # written whole or not at all: a kill mid-write leaves no summary that looks complete
        tmp = run_dir / f".summary.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, run_dir / "summary.json")
        plot_losses(run_dir)
    summary["state"] = state
    return summary


def _train_row(bar, step, m, schedule, tokens, t0) -> dict:
    dt = max(time.perf_counter() - t0, 1e-9)
    row = {
        "step": step,
        "loss": float(m["loss"]),
        "accuracy": float(m["accuracy"]),
        "lr": float(schedule(step - 1)),
        "grad_norm": float(m["grad_norm"]),
        "tokens_per_s": round(tokens / dt, 1),
    }
    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", lr=f"{row['lr']:.2e}")
    return row


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
