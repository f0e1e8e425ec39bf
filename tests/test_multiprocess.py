"""Two processes x 4 CPU devices train like one process x 8, and their checkpoint resumes on another mesh.

Every child runs `jaxfound pretrain` under a hard timeout; it ends with os._exit after flushing, since a
process can hang at interpreter exit once jax.distributed is up.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 150
# `jaxfound pretrain ...`, then a hard exit: no atexit hooks that could wait on a departed peer
CHILD = ("import os, sys\nfrom jaxfound.cli import main\nrc = main(sys.argv[1:])\n"
         "sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)")
TINY = [
    "model.arch=bert", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=64", "model.max_position=32", "model.dropout=0.1",
    "data.seq_len=32", "data.synthetic_docs=2000", "data.tokenizer_vocab=512",
    "train.task=mlm", "train.batch_size=16", "train.schedule_steps=6", "train.warmup_steps=2",
    "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1", "checkpoint.async_save=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _spawn(overrides: list[str], devices: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, "pretrain", *TINY, *overrides], env=_env(devices),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for all children; on a timeout or failure kill them all and show the logs."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    bad = [(p.returncode, log) for p, log in zip(procs, logs) if p.returncode != 0]
    if bad:
        text = "\n".join(f"--- {log} (rc {rc})\n{log.read_text()[-3000:]}" for rc, log in bad)
        pytest.fail(f"child process failed or timed out after {TIMEOUT_S}s:\n{text}")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference (1 x 8 devices, 6 steps); 2 x 4 devices for 5 steps; then that run resumed on fsdp=8."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    ref, multi = tmp / "ref", tmp / "multi"
    p = _spawn([f"run.dir={ref}", "train.steps=6", "checkpoint.every=0"], 8, tmp / "ref.log")
    _wait([p], [tmp / "ref.log"])
    tok = f"data.tokenizer={ref / 'tokenizer'}"  # one tokenizer for all runs (no concurrent training of it)
    port = _free_port()
    logs = [tmp / f"proc{i}.log" for i in range(2)]
    procs = [_spawn([f"run.dir={multi}", tok, "train.steps=5", "checkpoint.every=5",
                     f"mesh.coordinator=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={i}"],
                    4, logs[i]) for i in range(2)]
    _wait(procs, logs)
    losses_multi = _losses(multi)
    resume_log = tmp / "resume.log"
    p = _spawn([f"run.dir={multi}", tok, "train.steps=6", "mesh.data=1", "mesh.fsdp=8"], 8, resume_log)
    _wait([p], [resume_log])
    return {"ref": _losses(ref), "multi": losses_multi, "resumed": _losses(multi), "resume_log": resume_log.read_text(),
            "multi_dir": multi}


def test_two_processes_match_one_process_losses(runs):
    ref, multi = runs["ref"], runs["multi"]
    assert sorted(multi) == [1, 2, 3, 4, 5]
    for step in multi:
        assert multi[step] == pytest.approx(ref[step], rel=1e-4), (step, multi[step], ref[step])
    assert ref[5] < ref[1]  # it is training, not replaying a constant


def test_two_process_checkpoint_resumes_on_fsdp_mesh_with_the_same_next_loss(runs):
    assert "resume: continuing from step 5" in runs["resume_log"]
    assert runs["resumed"][6] == pytest.approx(runs["ref"][6], rel=1e-4)
    summary = json.loads((runs["multi_dir"] / "summary.json").read_text())
    assert summary["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
