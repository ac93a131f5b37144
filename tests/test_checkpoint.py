import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax.training.checkpoint import Checkpointer, CheckpointError


def _saved(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(3)}
    checkpointer.save(3, state, {"next_index": 3})
    checkpointer.wait()
    checkpointer.close()
    return state


def test_checkpoint_round_trip_restores_state_and_data_position(tmp_path):
    state = _saved(tmp_path)
    restored, data_state = Checkpointer(tmp_path / "checkpoints").restore_latest(state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert data_state == {"next_index": 3}
    assert Checkpointer(tmp_path / "empty").restore_latest(state) is None


def test_corrupt_checkpoint_is_a_clear_error_not_a_fresh_start(tmp_path):
    state = _saved(tmp_path)
    for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint step 3 .* corrupt"):
        Checkpointer(tmp_path / "checkpoints").restore_latest(state)


def test_checkpoint_of_another_config_is_a_clear_error(tmp_path):
    _saved(tmp_path)
    other = {"w": jnp.zeros((4, 4)), "step": jnp.array(0)}
    with pytest.raises(CheckpointError, match="different config"):
        Checkpointer(tmp_path / "checkpoints").restore_latest(other)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "ddsm_jax.main", "--config=configs/digits.py", f"--workdir={tmp_path}",
         "--config.training.num_steps=100000", "--config.training.batch_size=16",
         "--config.training.log_every=1", "--config.training.checkpoint_every=100000",
         # One middle width, so one compile: the signal never waits on a second sandwich's.
         "--config.model.widths=(1.0,0.5,0.25)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "checkpoint saved, rerun the same command to resume" in stderr
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 2 <= steps[0] < 100000
