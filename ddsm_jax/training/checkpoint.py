"""Train-state checkpoints through orbax, behind one small class so API changes stay here.

Orbax writes each step into a temporary directory and marks it complete only when every file
is written (a rename on local disks, a commit marker on object stores such as gs://, where a rename
is not atomic), so a crash never leaves a half-written checkpoint where a restart would read it.

Each checkpoint also stores the network's identity (`network_identity`: the model, diffusion and
data settings that decide what the weights mean), so that weights are never restored into a
network that has the same shapes but computes something else (say, other GroupNorm groups).
"""

from __future__ import annotations

import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from ddsm_jax.common_types import PathLike
from ddsm_jax.models.network import strategy_name
from ddsm_jax.utils.errors import summary
from ddsm_jax.utils.files import as_path, is_remote

# Model settings that change how the network is computed, not what it computes (older configs
# also carry `weight_grad_chunk`, a CPU speed setting since removed).
COMPUTE_ONLY = ("dtype", "remat", "weight_grad_chunk")
# Model settings that choose which branches are trained and searched, not what a branch computes:
# weights trained with a width per stage serve a search of global widths, and the other way.
BRANCHES_ONLY = ("stage_widths",)
# Strategy settings that only choose how trained weights are sampled.
SAMPLING_ONLY = {"adadiff": ("thresholds",)}
# Empty values of settings added after a checkpoint was written: what it was trained with.
NEUTRAL = (None, (), [], "")


_NO_SPACE = "No space left on device"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, lost permissions, a lost bucket)."""


def network_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that decide what a set of weights computes; a JSON-able dict."""
    model = {k: v for k, v in config.model.to_dict().items()
             if k not in COMPUTE_ONLY + BRANCHES_ONLY}
    data = {k: config.data[k] for k in ("name", "image_size", "channels")}
    identity = {"model": model, "diffusion": config.diffusion.to_dict(), "data": data}
    strategy = strategy_name(config)
    if strategy != "ddsm":  # DDSM's identity is that of checkpoints older than strategies
        section = {k: v for k, v in config[strategy].to_dict().items()
                   if k not in SAMPLING_ONLY.get(strategy, ())}
        identity.update(strategy=strategy, **{strategy: section})
    return identity


def identity_differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """One phrase per setting that differs (a JSON list and a config tuple compare equal; a
    setting newer than the checkpoint matches where it is left empty, its neutral default; a
    sampling-only setting an older checkpoint recorded is not compared)."""
    differences = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key not in saved and b in NEUTRAL:
            continue
        if key not in now and key in SAMPLING_ONLY.get(prefix.rstrip("."), ()):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differences += identity_differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != \
                (list(b) if isinstance(b, (list, tuple)) else b):
            differences.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return differences


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """One boolean, computed on the devices: no NaN or infinity anywhere in `tree`."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


class Checkpointer:
    """Saves and restores (train state, data-iterator position), checked against `identity`
    (`network_identity`; None skips the check)."""

    def __init__(self, directory: PathLike, max_to_keep: int = 3,
                 identity: dict[str, Any] | None = None):
        self.directory = as_path(directory)
        self.identity = identity
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False,
                                                enable_async_checkpointing=True),
            item_names=("state", "data", "identity"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts writing step `step` in the background. Non-finite weights are refused (they
        would replace good checkpoints in the rotation); a failed earlier write is raised here."""
        self.check_for_errors()
        if not bool(all_finite(state)):
            raise FloatingPointError(
                f"the weights hold NaN or infinite values at step {step}; not saving them. "
                f"{self._what_is_kept()}: lower training.learning_rate or training.grad_clip "
                f"and rerun the same command")
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
        if self.identity is not None:
            items["identity"] = ocp.args.JsonSave(self.identity)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.wait()  # orbax would wait for the previous save too; the free space counts it
        self._check_room(step, state)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise self._save_error(error) from error

    def _check_room(self, step: int, state: Any) -> None:
        """On a local disk, refuses a save that cannot fit before writing any of it: a save that
        fails half way fails in background threads, which report it noisily."""
        if is_remote(self.directory):
            return
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) + (1 << 20)
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointSaveError(
                f"no room for checkpoint step {step} in {self.directory}: it needs "
                f"{needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; the run stopped. "
                f"{self._what_is_kept()}: free space and rerun the same command")

    def check_for_errors(self) -> None:
        """Raises `CheckpointSaveError` if a background write has failed."""
        try:
            self._manager.check_for_errors()
        except Exception as error:
            raise self._save_error(error) from error

    def _save_error(self, error: BaseException) -> CheckpointSaveError:
        cause = error
        while cause.__cause__ is not None and not isinstance(cause, OSError):
            cause = cause.__cause__
        # A full disk reaches here as an OSError or as tensorstore's RESOURCE_EXHAUSTED, whose
        # first line is too long to show where the disk-full part comes.
        reason = "no space left on the device" if _NO_SPACE in str(cause) else summary(cause)
        return CheckpointSaveError(
            f"writing a checkpoint to {self.directory} failed ({reason}); the run "
            f"stopped. {self._what_is_kept()}: fix the cause (free space, permissions) and "
            f"rerun the same command")

    def _what_is_kept(self) -> str:
        step = self.latest_step()
        if step is None:
            return "No checkpoint was complete yet"
        return f"The last complete checkpoint ({step}) is intact and the rerun resumes from it"

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint, or None when there is none; never a silent fresh start, never
        weights of another network, never NaN weights."""
        step = self.latest_step()
        if step is None:
            return None
        where = self.directory / str(step)
        if self.identity is not None and (where / "identity").exists():
            saved = self._manager.restore(step, args=ocp.args.Composite(
                identity=ocp.args.JsonRestore())).identity
            differences = identity_differences(saved, self.identity)
            if differences:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was trained with other settings "
                    f"({'; '.join(differences)}); use the settings it was trained with, or "
                    f"another --workdir")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types; the user needs one message
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {where}: "
                f"{summary(error)} -- it is "
                f"corrupt or was written by a different config; delete it or use another --workdir"
            ) from error
        if not bool(all_finite(restored.state)):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds NaN or infinite weights; delete "
                f"{where} to fall back to the one before it, or train again")
        return restored.state, restored.data

    @property
    def manager(self) -> ocp.CheckpointManager:
        return self._manager

    def wait(self) -> None:
        """Blocks until every write has finished; raises `CheckpointSaveError` if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_error(error) from error

    def close(self) -> None:
        self._manager.close()
