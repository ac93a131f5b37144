"""The launch scripts: shellcheck-clean, and `launch/tpu_pod.sh` does what a pod run needs.

No cloud here: `--dry-run` prints the gcloud commands, and a fake `gcloud` on PATH records the
real calls and runs the start command on a simulated worker (a temporary HOME), so the remote
quoting, nohup, log and pid file are exercised for real.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
REQUIRED = ["--name=ddsm-celeba", "--zone=us-west4-a", "--type=v5litepod-16",
            "--config=configs/celeba.py", "--workdir=gs://bucket/ddsm/celeba"]
EXTRA = ["--config.data.data_dir=gs://bucket/tfds", "--config.training.num_steps=10"]


def tpu_pod(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU_POD), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", [TPU_POD, SLURM, ROOT / "benchmarks" / "accelerator.sh"],
                         ids=lambda p: p.name)
def test_shellcheck_finds_nothing(script):
    done = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout


def test_dry_run_prints_create_install_and_a_detached_run_on_every_worker():
    done = tpu_pod(*REQUIRED, "--project=my-project", "--dry-run", "--", *EXTRA)
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    create = [c for c in commands if c.startswith("gcloud compute tpus tpu-vm create ddsm-celeba")]
    assert len(create) == 1
    assert "--accelerator-type=v5litepod-16" in create[0]
    assert "--version=v2-alpha-tpuv5-lite" in create[0]
    assert all("--zone=us-west4-a --project=my-project" in c for c in commands
               if c.startswith("gcloud "))
    # The local checkout travels as a tarball through gcloud scp to every worker.
    assert any(c.startswith("tar -czf") and "--exclude=.git" in c for c in commands)
    assert any(c.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in c
               for c in commands)
    ssh = "gcloud compute tpus tpu-vm ssh ddsm-celeba"
    ssh_all = [c for c in commands if c.startswith(ssh) and "--worker=all" in c]
    install = [c for c in ssh_all if "pip install" in c]
    assert len(install) == 1
    assert "-r requirements.txt" in install[0] and "jax[tpu]==0.10.2" in install[0]
    run = [c for c in ssh_all if "ddsm_jax.main" in c]
    assert len(run) == 1
    assert ("python -m ddsm_jax.main --config=configs/celeba.py "
            "--workdir=gs://bucket/ddsm/celeba --mode=train " + " ".join(EXTRA)) in run[0]
    assert "nohup" in run[0] and "> ~/ddsm_jax_run.log 2>&1" in run[0]
    # And it says how to follow the run and how to delete the VM.
    assert "tail -f ~/ddsm_jax_run.log" in done.stdout
    assert "gcloud compute tpus tpu-vm delete ddsm-celeba" in done.stdout
    assert commands.index(create[0]) < commands.index(install[0]) < commands.index(run[0])


def test_dry_run_with_a_repo_clones_instead_of_copying():
    done = tpu_pod(*REQUIRED, "--repo=https://example.com/ddsm_jax.git", "--branch=v1", "--spot",
                   "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "--version=v2-alpha-tpuv5-lite --spot" in done.stdout
    assert "git clone --depth=1 --branch v1 https://example.com/ddsm_jax.git" in done.stdout
    assert "tpu-vm scp" not in done.stdout and "tar -czf" not in done.stdout


@pytest.mark.parametrize("drop", ["--name", "--zone", "--type", "--config", "--workdir"])
def test_a_missing_required_flag_is_a_one_line_usage_error(drop):
    args = [a for a in REQUIRED if not a.startswith(drop + "=")]
    done = tpu_pod(*args, "--dry-run")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: missing {drop};") and "usage: launch/tpu_pod.sh" in lines[0]
    assert done.stdout == ""  # nothing ran


def test_a_local_workdir_is_refused():
    args = [a for a in REQUIRED if not a.startswith("--workdir=")] + ["--workdir=/tmp/run"]
    done = tpu_pod(*args, "--dry-run")
    assert done.returncode != 0
    assert "gs://" in done.stderr.strip()


FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    sys.exit(1)  # no such TPU VM yet
for arg in args:  # play worker 0 for the start command only
    if arg.startswith("--command=") and "ddsm_jax.main" in arg:
        sys.exit(subprocess.run(["bash", "-c", arg[len("--command="):]]).returncode)
"""

# Stands in for the worker's venv Python: records its arguments, then stays alive a little.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/args.txt"
exec sleep 60
"""


def test_the_start_command_runs_detached_with_exact_arguments_and_is_not_doubled(tmp_path):
    home = tmp_path / "home"
    (home / "ddsm_jax").mkdir(parents=True)
    (home / "ddsm_venv" / "bin").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for path, text in [(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable)),
                       (home / "ddsm_venv" / "bin" / "python", FAKE_PYTHON)]:
        path.write_text(text)
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home),
               TMPDIR=str(tmp_path), FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"))
    extra = [*EXTRA, "--config.note=two words"]
    done = tpu_pod(*REQUIRED, "--", *extra, env=env)
    pid_file = home / "ddsm_jax_run.pid"
    try:
        assert done.returncode == 0, done.stderr
        calls = [json.loads(line) for line in (tmp_path / "gcloud.jsonl").read_text().splitlines()]
        verbs = [" ".join(call[:4]) for call in calls]
        assert verbs == ["compute tpus tpu-vm describe", "compute tpus tpu-vm create",
                         "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                         "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]
        assert (tmp_path / "ddsm_jax_ddsm-celeba.tar.gz").stat().st_size > 0
        for call in calls:  # every remote command is valid bash
            for arg in call:
                if arg.startswith("--command="):
                    syntax = subprocess.run(["bash", "-n", "-c", arg[len("--command="):]],
                                            capture_output=True, text=True)
                    assert syntax.returncode == 0, (arg, syntax.stderr)
        args_file = home / "args.txt"
        deadline = time.time() + 20
        while not (args_file.exists() and args_file.read_text().endswith("two words\n")):
            assert time.time() < deadline, "the detached run never started"
            time.sleep(0.1)
        assert args_file.read_text().splitlines() == [
            "-m", "ddsm_jax.main", "--config=configs/celeba.py",
            "--workdir=gs://bucket/ddsm/celeba", "--mode=train", *extra]
        assert (home / "ddsm_jax_run.log").exists()
        # Launching again while that run lives must not start a second one.
        again = tpu_pod(*REQUIRED, env=env)
        assert again.returncode == 0, again.stderr
        assert "already running (pid " in again.stdout
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
