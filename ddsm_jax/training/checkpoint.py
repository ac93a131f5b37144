"""Train-state checkpoints through orbax, behind one small class so API changes stay here.

Orbax writes each step into a temporary directory and marks it complete only when every file
is written (a rename on local disks, a commit marker on object stores such as gs://, where a rename
is not atomic), so a crash never leaves a half-written checkpoint where a restart would read it.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from ddsm_jax.common_types import PathLike
from ddsm_jax.utils.files import as_path


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state."""


class Checkpointer:
    def __init__(self, directory: PathLike, max_to_keep: int = 3):
        self.directory = as_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                enable_async_checkpointing=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint, or None when there is none; never a silent fresh start."""
        step = self.latest_step()
        if step is None:
            return None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types; the user needs one message
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory / str(step)}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} -- it is "
                f"corrupt or was written by a different config; delete it or use another --workdir"
            ) from error
        return restored.state, restored.data

    @property
    def manager(self) -> ocp.CheckpointManager:
        return self._manager

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
