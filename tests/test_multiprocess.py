"""Two real JAX processes on this machine, as two hosts of a pod would run the command."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_one_model_and_only_process_0_writes(tmp_path):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "ddsm_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
               "--config.training.num_steps=4", "--config.training.batch_size=16",
               "--config.training.log_every=2", "--config.training.checkpoint_every=2",
               "--config.sampling.num_steps=3", "--config.sampling.num_samples=4",
               "--config.sampling.batch_size=4",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    processes = [subprocess.Popen([*command, f"--process_id={i}"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    # Process 0 reports and writes; process 1 only trains.
    assert json.loads(outputs[0][0].strip().splitlines()[-1])["step"] == 4
    assert '"samples"' not in outputs[1][0]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # not doubled
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert (tmp_path / "samples" / "widths.png").exists()
