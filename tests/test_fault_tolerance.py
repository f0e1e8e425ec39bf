"""Fault tolerance: kill -9 and resume, broken checkpoints, NaN/inf batches, a full disk, an unwritable run dir.

The end-to-end tests run `python -m jaxfound.cli pretrain` in subprocesses (one CPU device, a tiny BERT, a persistent
compilation cache shared between them) and compare their metrics.jsonl with one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfound import checkpoint as ckpt
from jaxfound.errors import JaxfoundError

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY = 40, 5
TINY = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
    "model.max_position=32", "model.dropout=0.0", "data.seq_len=32", "data.synthetic_docs=1000",
    "data.tokenizer_vocab=256", "train.batch_size=8", "train.log_every=1", "train.eval_every=1000",
    "train.warmup_steps=2", f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
]
TIMEOUT = 150  # seconds for one subprocess run, start-up and compilation included, on busy cores


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """One CPU device (not the 8 simulated ones of the test session) and a compilation cache shared by every run."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxfound.cli", "pretrain", f"run.dir={run_dir}", *TINY, *extra]


def _run(env, run_dir: Path, *extra: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=preexec_fn)


def _rows(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            pass
    return rows


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir) if "loss" in r}


def _complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _resumed_from(stdout: str) -> int | None:
    m = re.search(r"resume: continuing from step (\d+)", stdout)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def reference(cli_env, tmp_path_factory) -> Path:
    """One uninterrupted run; every checkpoint kept so that other tests can copy a run 'stopped' at any step."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = _run(cli_env, run_dir, "checkpoint.keep=100")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _complete_steps(run_dir) == list(range(EVERY, STEPS + 1, EVERY))
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def _copy_stopped_at(reference: Path, dest: Path, step: int) -> Path:
    """The reference run as it was when its checkpoint at `step` was the newest."""
    shutil.copytree(reference, dest)
    for s in _complete_steps(dest):
        if s > step:
            shutil.rmtree(dest / "checkpoints" / str(s))
    return dest


# ---------------------------------------------------------------- kill -9 and resume

def _kill_at(proc: subprocess.Popen, run_dir: Path, target: int, during_save: bool, rng: random.Random) -> dict:
    """SIGKILL proc once metrics.jsonl logs step >= target (and, if during_save, while a checkpoint is in flight)."""
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    reached = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before step {target}; kill came too late")
        if not reached and metrics.exists():
            steps = [r["step"] for r in _rows(run_dir)]
            reached = bool(steps) and max(steps) >= target
            if reached and not during_save:
                time.sleep(rng.uniform(0.0, 0.05))  # a random moment inside the next few steps
        if reached:
            tmp = [p.name for p in ckpts.iterdir() if "tmp" in p.name] if ckpts.is_dir() else []
            if not during_save or tmp:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                in_flight = [p.name for p in ckpts.iterdir() if "tmp" in p.name]
                return {"logged": max(_losses(run_dir)), "complete": _complete_steps(run_dir), "in_flight": in_flight}
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"step {target} not reached within {TIMEOUT}s")


def test_kill9_at_random_moments_resumes_and_replays_the_reference_losses(cli_env, reference, tmp_path):
    """3 seeded kill -9s (one while an async save is in flight); keep=1, so a deletion before the new save is complete
    would leave nothing to resume from. Each restart resumes from the newest complete checkpoint, loses at most the
    interval in flight, and the finished run's losses equal the uninterrupted run's exactly at every step."""
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(reference / "tokenizer", run_dir / "tokenizer")  # tokenizer training is not bit-reproducible
    ref = _losses(reference)
    logged, kills = 0, []
    for i in range(3):
        target = rng.randint(logged + 3, logged + 9) if logged else rng.randint(12, 18)  # the first save is slow
        with open(tmp_path / f"stdout{i}", "w") as out:
            proc = subprocess.Popen(_cmd(run_dir, "checkpoint.keep=1"), cwd=ROOT, env=cli_env, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                kill = _kill_at(proc, run_dir, target, during_save=(i == 1), rng=rng)
            finally:
                if proc.poll() is None:
                    proc.kill()
        resumed = _resumed_from((tmp_path / f"stdout{i}").read_text())
        kill |= {"target": target, "resumed_from": resumed}
        kills.append(kill)
        # at most one save in flight, every earlier one complete (with keep=1: the newest was not deleted early),
        # so a kill loses at most the interval in flight plus the steps trained since it began
        newest = kill["complete"][-1]
        in_flight = [int(name.split(".")[0]) for name in kill["in_flight"]]
        assert len(in_flight) <= 1 and all(s == newest + EVERY for s in in_flight), kill
        assert newest >= (kill["logged"] + 1) // EVERY * EVERY - 2 * EVERY, kill
        logged = kill["logged"]
        final = _run(cli_env, run_dir, "checkpoint.keep=1") if i == 2 else None
        if final is not None:
            assert final.returncode == 0, final.stderr[-3000:]
            assert _resumed_from(final.stdout) == kill["complete"][-1]
    assert kills[0]["resumed_from"] is None
    for k_prev, k_next in zip(kills, kills[1:]):  # each restart resumed from the newest complete checkpoint
        assert k_next["resumed_from"] == k_prev["complete"][-1], kills
    print("kills:", kills)
    assert any(k["in_flight"] for k in kills), f"no kill landed during an async save: {kills}"
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref  # exactly, at every step: the resumed runs replay the same batches, masks and updates
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS


# ---------------------------------------------------------------- broken checkpoints

def test_unreadable_newest_checkpoints_are_skipped_named_and_moved_aside(cli_env, reference, tmp_path):
    """Step 20: a truncated data file; 15: garbage bytes; 10: a missing directory entry. Resume names each skipped
    step and why, falls back to 5, moves the bad ones aside (so they neither block saves nor push good ones out of
    checkpoint.keep) and replays the reference losses exactly."""
    run_dir = _copy_stopped_at(reference, tmp_path / "run", 20)
    ck = run_dir / "checkpoints"
    for f in (ck / "20" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated ocdbt data file
    for f in (ck / "15" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(os.urandom(max(f.stat().st_size, 64)))  # garbage in every file
    shutil.rmtree(ck / "10" / "state")  # the train state's directory entry is missing
    out = _run(cli_env, run_dir, "checkpoint.keep=2")
    assert out.returncode == 0, out.stderr[-3000:]
    skipped = re.findall(r"resume: skipped checkpoint step (\d+) \((.+)\)", out.stdout)
    print("skipped:", skipped)
    assert [int(s) for s, _ in skipped] == [20, 15, 10]
    assert all(reason.strip() for _, reason in skipped)
    assert _resumed_from(out.stdout) == 5
    assert {p.name for p in ck.iterdir()} >= {"20.unreadable", "15.unreadable", "10.unreadable"}
    assert _complete_steps(run_dir) == [35, 40]  # saves at 10, 15, 20 were not blocked by the broken steps
    got, ref = _losses(run_dir), _losses(reference)
    assert {s: got[s] for s in range(6, STEPS + 1)} == {s: ref[s] for s in range(6, STEPS + 1)}


# ---------------------------------------------------------------- disk full, unwritable run dir

def _file_size_limit(nbytes: int):
    def limit():  # EFBIG on any write past nbytes, as ENOSPC would on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_failed_checkpoint_write_stops_with_one_line_and_keeps_the_last_good_checkpoint(cli_env, reference, tmp_path):
    """A checkpoint file cannot be written (RLIMIT_FSIZE makes the write fail with EFBIG, standing in for ENOSPC):
    exit 2 with a one-line error naming the last complete step; with keep=1 that step (10) is still there and
    complete, no summary.json claims success, and the next run resumes from it.

    The limit is half the size of step 10's `_METADATA` file (~33 kB: the tree's metadata, the same size at every
    step), so the step-15 save fails whatever it does. A fixed limit against the ocdbt data files was flaky: orbax
    splits the ~230 kB of arrays over a varying number of files, and once all of them fit under 64 KiB."""
    run_dir = _copy_stopped_at(reference, tmp_path / "run", 10)
    limit = (run_dir / "checkpoints" / "10" / "state" / "_METADATA").stat().st_size // 2
    assert limit > 4096  # above metrics.jsonl's appends (~200 bytes a step), which must go on working
    out = _run(cli_env, run_dir, "checkpoint.keep=1", preexec_fn=_file_size_limit(limit))
    assert out.returncode == 2, out.stderr[-3000:]
    # orbax's writer threads may still be printing tracebacks of the failed write (a partial line can precede ours)
    errors = [ln[ln.index("jaxfound pretrain: error:"):] for ln in out.stderr.splitlines()
              if "jaxfound pretrain: error:" in ln]
    print(errors)
    assert len(errors) == 1 and "File too large" in errors[0] and "last complete checkpoint is step 10" in errors[0]
    assert _complete_steps(run_dir) == [5, 10]  # nothing deleted (keep=1 applies only after a complete save)
    assert not (run_dir / "summary.json").exists()
    again = _run(cli_env, run_dir, "checkpoint.keep=1", "train.steps=12", "train.schedule_steps=40")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _resumed_from(again.stdout) == 10
    ref = _losses(reference)
    assert {s: _losses(run_dir)[s] for s in (11, 12)} == {s: ref[s] for s in (11, 12)}


@pytest.mark.parametrize("where", ["under_a_file", "in_proc", "read_only_dir"])
def test_unwritable_run_dir_fails_before_any_work(cli_env, tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        run_dir = tmp_path / "a_file" / "run"
    elif where == "in_proc":
        run_dir = Path("/proc/jaxfound_run")
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions; the other two cases cover it")
        (tmp_path / "ro").mkdir(mode=0o500)
        run_dir = tmp_path / "ro" / "run"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jaxfound.cli", "pretrain", f"run.dir={run_dir}"], cwd=ROOT,
                         env=cli_env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "not writable" in out.stderr and str(run_dir) in out.stderr
    assert time.perf_counter() - t0 < 60  # before the corpus, the tokenizer or any compilation


def test_disk_without_room_for_one_checkpoint_fails_before_training(monkeypatch, tmp_path):
    state = {"w": jax.ShapeDtypeStruct((1024, 1024), np.float32)}  # 4 MiB
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(JaxfoundError, match=r"1\.0 MiB free .* needs about 4\.0 MiB"):
        ckpt.check_space(tmp_path, state)


# ---------------------------------------------------------------- NaN / inf batches (library level)

@pytest.fixture(scope="module")
def tiny_job_parts(tmp_path_factory):
    """Model, task, data and a cheap evaluate for fit() on the 8-device test mesh."""
    from jaxfound.config import load_config
    from jaxfound.data.pretrain import prepare_pretraining
    from jaxfound.models import build_model
    from jaxfound.tasks import get_task

    base = tmp_path_factory.mktemp("nan_base")
    cfg = load_config(None, [o for o in TINY if not o.startswith("train.steps")] + [f"run.dir={base}"])
    data = prepare_pretraining(cfg, base / "tokenizer")
    task = get_task("mlm", "bert")
    model = build_model(__import__("dataclasses").replace(cfg.model, vocab_size=data.vocab_size), task.head)
    return cfg, data, task, model


def _nan_job(parts, total_steps: int, bad_step: int, params_at: dict | None = None):
    """A Job whose batch for step bad_step (1-based) has NaN mlm_weights: its loss and gradients are NaN.

    params_at: if given, evaluate records a host copy of the params at every eval step in it.
    """
    import grain

    from jaxfound.data.pipeline import local_batch
    from jaxfound.train.loop import Job

    cfg, data, task, model = parts

    def batch(s):
        b = local_batch(data.train, int(s), cfg.train.batch_size)
        if int(s) == bad_step - 1:
            b["mlm_weights"] = np.full_like(b["mlm_weights"], np.nan)
        return b

    def make_iterator():
        return iter(grain.MapDataset.range(2**40).map(batch).to_iter_dataset())

    def evaluate(params, step):
        if params_at is not None:
            params_at[step] = jax.device_get(params)
        return {"eval_loss": 0.0}

    return Job(model=model, task=task, make_iterator=make_iterator, total_steps=total_steps, evaluate=evaluate,
               seq_len=cfg.data.seq_len)


def _restore_state(run_dir: Path, step: int):
    import orbax.checkpoint as ocp

    mngr = ckpt.manager(run_dir, keep=100)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    return state


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nonfinite_skip_leaves_params_unchanged_counts_it_and_continues(tiny_job_parts, tmp_path, capsys):
    from jaxfound.config import replace
    from jaxfound.train.loop import fit

    cfg, bad, params_at = tiny_job_parts[0], 3, {}
    cfg = replace(cfg, run={"dir": str(tmp_path)}, train={"nonfinite": "skip", "eval_every": 1},
                  checkpoint={"every": 0})
    summary = fit(cfg, _nan_job(tiny_job_parts, total_steps=5, bad_step=bad, params_at=params_at))
    assert f"step {bad}: non-finite loss or gradient; update skipped" in capsys.readouterr().out
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 5
    assert _same(params_at[bad - 1], params_at[bad])  # the NaN step changed nothing
    assert not _same(params_at[bad], params_at[bad + 1])  # training went on after the bad batch
    assert not _same(params_at[bad - 2], params_at[bad - 1])
    assert int(_restore_state(tmp_path, 5)["nonfinite_steps"]) == 1
    rows = {r["step"]: r for r in _rows(tmp_path) if "loss" in r}
    assert np.isnan(rows[bad]["loss"]) and all(np.isfinite(rows[s]["loss"]) for s in rows if s != bad)


@pytest.mark.parametrize("bad,total", [(3, 6), (4, 4)], ids=["mid_run", "last_step"])
def test_nonfinite_stop_saves_last_good_state_and_names_the_step(tiny_job_parts, tmp_path, bad, total):
    """Mid-run (detected one step late, as metrics are read) and at the last step (an eval step, where the loop
    used to drop the stop flag and finish as if nothing had happened)."""
    from jaxfound.config import replace
    from jaxfound.train.loop import fit

    cfg = replace(tiny_job_parts[0], run={"dir": str(tmp_path)}, train={"nonfinite": "stop"}, checkpoint={"every": 0})
    with pytest.raises(JaxfoundError, match=rf"^step {bad}: loss or gradient is NaN/inf \(train.nonfinite=stop\)"):
        fit(cfg, _nan_job(tiny_job_parts, total_steps=total, bad_step=bad))
    assert _complete_steps(tmp_path) == [min(bad + 1, total)]
    last = _restore_state(tmp_path, min(bad + 1, total))
    assert int(last["nonfinite_steps"]) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last["params"]))
    assert not (tmp_path / "summary.json").exists()
    assert np.isnan({r["step"]: r for r in _rows(tmp_path) if "loss" in r}[bad]["loss"])
