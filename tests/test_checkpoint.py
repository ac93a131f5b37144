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
