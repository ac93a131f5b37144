"""A trained DDSM as a standalone artifact: EMA weights, width schedule and config in one folder.

    DIR/export/
        ddsm_export.json   format, version, widths, image shape, parameter count, training step
        config.json        the resolved config (it rebuilds the network and the sampler)
        params/            the EMA parameters (orbax)
        schedule.json      the per-step widths, when a schedule was searched or given
        samples.npz        N samples, uint8 NHWC under `arr_0` (guided-diffusion's evaluator format)

`load(path)` needs only the model, diffusion and sampling code, not training, data or search:

    from ddsm_jax import export
    model = export.load("DIR/export")
    images = model.sample(16, seed=0)            # float32 NHWC in [-1, 1], with the schedule
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddsm_jax.common_types import Params
from ddsm_jax.diffusion.schedules import Diffusion, diffusion_from_config
from ddsm_jax.models.network import Network, abstract_network, param_count
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches
from ddsm_jax.utils.images import to_uint8
from ddsm_jax.width_schedule import WidthSchedule, schedule_from_json

FORMAT, VERSION = "ddsm_jax.export", 1
MANIFEST = "ddsm_export.json"


class ExportError(ValueError):
    """A folder that is not a ddsm_jax export, or one this version cannot read."""


def save(directory: str | Path, config: ml_collections.ConfigDict, params: Params,
         schedule: WidthSchedule | dict | None = None, *, step: int | None = None,
         samples: np.ndarray | None = None) -> Path:
    """Writes the export next to `directory` and renames it into place, so a crash midway leaves
    the previous export (or nothing), never half of one."""
    directory = Path(directory).absolute()
    network, abstract = abstract_network(config)
    _check_params(params, abstract)
    if isinstance(schedule, dict):
        schedule = schedule_from_json(schedule, widths=network.widths,
                                      sampler=config.sampling.method,
                                      timesteps=_sampler(config, network).timesteps)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / "params", jax.device_get(params))
    if schedule is not None:
        schedule.save(tmp / "schedule.json")
    if samples is not None:
        np.savez(tmp / "samples.npz", arr_0=samples)
    manifest = {"format": FORMAT, "version": VERSION, "widths": list(network.widths),
                "image_shape": list(network.image_shape), "num_params": param_count(params),
                "step": step, "has_schedule": schedule is not None}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _check_params(params: Params, abstract: Params) -> None:
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
    expected = jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract)
    if shapes != expected:
        raise ExportError("the parameters do not have the tree and shapes of the config's network")


def _sampler(config: ml_collections.ConfigDict, network: Network) -> ScheduleSampler:
    return ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)


@dataclasses.dataclass
class ExportedModel:
    config: ml_collections.ConfigDict
    network: Network
    diffusion: Diffusion
    params: Params
    schedule: WidthSchedule | None
    manifest: dict[str, Any]

    def __post_init__(self):
        self.sampler = _sampler(self.config, self.network)

    def schedule_indices(self, schedule: str | np.ndarray = "auto") -> np.ndarray:
        """'auto': the exported schedule if there is one, else full width; 'full'; or indices."""
        if isinstance(schedule, str):
            if schedule == "auto" and self.schedule is not None:
                return self.sampler.to_indices(self.schedule)
            if schedule in ("auto", "full"):
                return self.sampler.uniform(0)
            raise ValueError(f"schedule must be 'auto', 'full' or width indices, got {schedule!r}")
        return np.asarray(schedule, np.int32)

    def sample(self, num_samples: int, *, seed: int = 0, schedule: str | np.ndarray = "auto",
               batch_size: int | None = None) -> np.ndarray:
        """float32 NHWC images in [-1, 1] (`ddsm_jax.utils.images.to_uint8` makes pixels)."""
        key = jax.random.key(seed)
        noise = initial_noise(jax.random.fold_in(key, 0), num_samples, self.network.image_shape)
        return sample_in_batches(self.sampler, self.params, self.schedule_indices(schedule), noise,
                                 jax.random.fold_in(key, 1),
                                 batch_size or self.config.sampling.batch_size)


def load(path: str | Path) -> ExportedModel:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{path} is not a ddsm_jax export (no {MANIFEST}); make one with "
                          f"`python -m ddsm_jax.main --mode=export --workdir=DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
        config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: unreadable export metadata: {error}") from error
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise ExportError(f"{path}: export format {manifest.get('format')} version "
                          f"{manifest.get('version')} is not one this ddsm_jax reads "
                          f"({FORMAT} <= {VERSION})")
    network, abstract = abstract_network(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore((path / "params").absolute(), target)
    except Exception as error:  # orbax raises many types; the user needs one line
        raise ExportError(f"cannot read the parameters in {path / 'params'}: "
                          f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
    schedule = None
    if (path / "schedule.json").is_file():
        schedule = schedule_from_json(json.loads((path / "schedule.json").read_text()))
    return ExportedModel(config, network, diffusion_from_config(config.diffusion), params,
                         schedule, manifest)


def export_run(config: ml_collections.ConfigDict, directory: str | Path, network: Network,
               diffusion: Diffusion, params: Params, schedule: WidthSchedule | None, *,
               step: int | None = None, progress: bool = True) -> Path:
    """`--mode=export`: the artifact plus `config.export.num_samples` samples drawn with the
    schedule (full width without one), as uint8 for guided-diffusion's evaluator."""
    model = ExportedModel(config, network, diffusion, jax.device_get(params), schedule, {})
    key = jax.random.fold_in(jax.random.key(config.seed), 4)
    noise = initial_noise(jax.random.fold_in(key, 0), config.export.num_samples,
                          network.image_shape)
    images = sample_in_batches(model.sampler, model.params, model.schedule_indices(), noise,
                               jax.random.fold_in(key, 1), config.sampling.batch_size,
                               progress=progress)
    return save(directory, config, params, schedule, step=step, samples=to_uint8(images))
