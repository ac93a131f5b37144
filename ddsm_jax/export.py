"""A trained DDSM as a standalone artifact: EMA weights, width schedules and config in one folder.

    DIR/export/
        ddsm_export.json   format, version, widths, image shape, parameter count, training step;
                           written last: an export without it is incomplete
        config.json        the resolved config (it rebuilds the network and the sampler)
        params/            the EMA parameters (orbax)
        schedule.json      the chosen per-step widths, when a schedule was searched or given
        front.json         the schedules on offer at each price: every validated schedule of the
                           search (and full width), with its MACs ratio, validated FD and
                           measured seconds ratio
        samples.npz        N samples, uint8 NHWC under `arr_0` (guided-diffusion's evaluator format)

`load(path)` needs only the model, diffusion and sampling code, not training, data or search:

    from ddsm_jax import export
    model = export.load("DIR/export")
    images = model.sample(16, seed=0)            # float32 NHWC in [-1, 1], the chosen schedule
    images = model.sample(16, budget=0.4)        # the best schedule at <= 0.4 of full width's MACs

On a local disk the folder is written beside its target and renamed into place. On an object
store (gs://), where a rename is not atomic, the old export is removed, the files are written in
place and the manifest last: an interrupted export is refused as incomplete, never mixed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from tqdm import tqdm

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.diffusion.schedules import Diffusion, diffusion_from_config
from ddsm_jax.layout import Stream, stream_key
from ddsm_jax.models.cost import SchedulePrices
from ddsm_jax.models.network import Network, abstract_network, param_count
from ddsm_jax.models.stage_widths import Width, width_json
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches, stream_draws
from ddsm_jax.utils.errors import summary
from ddsm_jax.utils.files import (
    as_path,
    is_remote,
    read_json,
    write_atomically,
    write_json,
    write_text_atomically,
)
from ddsm_jax.utils.images import to_uint8
from ddsm_jax.utils.timing import median_seconds
from ddsm_jax.width_schedule import WidthSchedule, schedule_from_json

FORMAT, VERSION = "ddsm_jax.export", 2  # version 2 added front.json; version 1 still loads
# The files of an export folder (see above).
MANIFEST, CONFIG, PARAMS, SCHEDULE, FRONT, SAMPLES = (
    "ddsm_export.json", "config.json", "params", "schedule.json", "front.json", "samples.npz")


class ExportError(ValueError):
    """A folder that is not a ddsm_jax export, one this version cannot read, or a request that
    no schedule in it can meet."""


@dataclasses.dataclass(frozen=True)
class FrontMember:
    """One schedule an export offers: its widths, price and (where measured) quality and time."""

    schedule: tuple[int, ...]  # index into the export's widths, per sampling step
    macs_ratio: float  # mean MACs per step / full width's
    fd: float | None = None  # validated FD (None: never validated, e.g. a converted release)
    seconds_ratio: float | None = None  # measured sampling time / full width's
    chosen: bool = False  # the schedule the search chose (schedule.json)
    timesteps: tuple[int, ...] | None = None  # where the search chose them; None: the config's

    def widths(self, widths: Sequence[Width]) -> list[float | list[float]]:
        return [width_json(widths[i]) for i in self.schedule]

    def to_json(self, widths: Sequence[Width]) -> dict[str, Any]:
        data = {**dataclasses.asdict(self), "schedule": list(self.schedule),
                "widths": self.widths(widths)}
        if self.timesteps is None:
            del data["timesteps"]
        else:
            data["timesteps"] = list(self.timesteps)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrontMember:
        timesteps = data.get("timesteps")
        return cls(tuple(int(i) for i in data["schedule"]), float(data["macs_ratio"]),
                   data.get("fd"), data.get("seconds_ratio"), bool(data.get("chosen", False)),
                   None if timesteps is None else tuple(int(t) for t in timesteps))


def build_front(config: ml_collections.ConfigDict, network: Network, params: Params,
                sampler: ScheduleSampler, schedule: WidthSchedule | None,
                validated: Sequence[dict[str, Any]] = ()) -> list[FrontMember]:
    """Full width, the chosen schedule and every validated schedule (`pareto.json`'s
    `validated`: dicts with `schedule` and `fd`), each once, by MACs; costs from the network."""
    # A width costs the same at any timestep wherever the search chose the timesteps (one
    # network for all of them), so the config grid's prices hold for every member.
    prices = SchedulePrices.of(network, params, sampler.timesteps, config)
    full = (tuple(sampler.uniform(0).tolist()), None)
    fds: dict[tuple[tuple[int, ...], tuple[int, ...] | None], float | None] = {full: None}
    chosen = None
    if schedule is not None:
        chosen = (tuple(int(i) for i in sampler.for_schedule(schedule).to_indices(schedule)),
                  _own_timesteps(schedule.timesteps if schedule.timesteps_searched else None,
                                 sampler))
        fds[chosen] = schedule.figures.get("fd")
        fds[full] = schedule.figures.get("full_fd")
    for entry in validated:
        key = tuple(int(i) for i in entry["schedule"])
        if len(key) != sampler.num_steps or max(key) >= len(network.widths):
            raise ExportError(f"a validated schedule of {len(key)} steps does not fit this "
                              f"sampler ({sampler.num_steps} steps) and network; search again")
        fds[key, _own_timesteps(entry.get("timesteps"), sampler)] = float(entry["fd"])
    members = [FrontMember(key, prices(key)["macs_ratio"], None if fd is None else float(fd),
                           chosen=(key, timesteps) == chosen, timesteps=timesteps)
               for (key, timesteps), fd in fds.items()]
    return sorted(members, key=lambda m: (m.macs_ratio, m.schedule, m.timesteps or ()))


def _own_timesteps(timesteps: Sequence[int] | None,
                   sampler: ScheduleSampler) -> tuple[int, ...] | None:
    """A member's timesteps where they are not the sampler's grid (else None)."""
    if timesteps is None or list(timesteps) == list(sampler.timesteps):
        return None
    return tuple(int(t) for t in timesteps)


def choose(front: Sequence[FrontMember], *, budget: float | None = None,
           seconds_budget: float | None = None, where: str = "the export") -> FrontMember:
    """The best member within the budgets: the lowest validated FD, or where members have none,
    the most MACs (more compute, no worse a sampler). No budget: the chosen schedule."""
    if budget is None and seconds_budget is None:
        return next((m for m in front if m.chosen), max(front, key=lambda m: m.macs_ratio))
    candidates = list(front)
    if seconds_budget is not None:
        unmeasured = [m for m in candidates if m.seconds_ratio is None]
        if unmeasured:
            raise ExportError(f"{where} has no measured sampling times; choose by --budget (MACs) "
                              f"or export again with `--mode=export`")
        candidates = _within(candidates, "seconds_ratio", seconds_budget, where, "seconds")
    if budget is not None:
        candidates = _within(candidates, "macs_ratio", budget, where, "MACs")
    return min(candidates, key=lambda m: (m.fd is None, m.fd if m.fd is not None else -m.macs_ratio,
                                          -m.macs_ratio))


def _within(members: list[FrontMember], field: str, budget: float, where: str,
            unit: str) -> list[FrontMember]:
    inside = [m for m in members if getattr(m, field) <= budget + 1e-9]
    if not inside:
        cheapest = min(getattr(m, field) for m in members)
        raise ExportError(f"no schedule in {where} samples at {budget:g} of full width's {unit}; "
                          f"the cheapest costs {cheapest:.3f}: ask for at least that")
    return inside


def save(directory: PathLike, config: ml_collections.ConfigDict, params: Params,
         schedule: WidthSchedule | dict | None = None, *, step: int | None = None,
         samples: np.ndarray | None = None,
         front: Sequence[FrontMember] | None = None,
         weights: dict[str, Any] | None = None) -> epath.Path:
    """Writes the export (see the module docstring for how it stays whole). Without `front`,
    it offers full width and the schedule. `weights`: the `weights_id` of `params`."""
    directory = as_path(directory)
    network, abstract = abstract_network(config)
    _check_params(params, abstract)
    sampler = _sampler(config, network)
    if isinstance(schedule, dict):
        schedule = schedule_from_json(schedule, widths=network.widths,
                                      sampler=config.sampling.method,
                                      timesteps=sampler.timesteps)
    if front is None:
        front = build_front(config, network, params, sampler, schedule)
    manifest = {"format": FORMAT, "version": VERSION,
                "widths": [width_json(w) for w in network.widths],
                "image_shape": list(network.image_shape), "num_params": param_count(params),
                "step": step, "weights": weights, "has_schedule": schedule is not None}

    def write_into(folder: epath.Path) -> None:
        write_text_atomically(folder / CONFIG, config.to_json_best_effort(indent=2))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(folder / PARAMS, jax.device_get(params))
        if schedule is not None:
            schedule.save(folder / SCHEDULE)
        write_json(folder / FRONT, [m.to_json(network.widths) for m in front])
        if samples is not None:
            write_atomically(folder / SAMPLES, lambda handle: np.savez(handle, arr_0=samples))
        write_json(folder / MANIFEST, manifest)  # last: the export is complete

    if is_remote(directory):
        if (directory / MANIFEST).exists():
            (directory / MANIFEST).unlink()  # from here on, readers see an incomplete export
        if directory.exists():
            directory.rmtree()
        write_into(directory)
        return directory
    for kind in ("tmp", "old"):  # the folders of an export that was killed
        for leftover in directory.parent.glob(f".{directory.name}.{kind}*"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    try:
        write_into(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    front: list[FrontMember] = dataclasses.field(default_factory=list)
    source: str = "the export"

    def __post_init__(self):
        self.sampler = _sampler(self.config, self.network)

    def choose(self, *, budget: float | None = None,
               seconds_budget: float | None = None) -> FrontMember:
        """The schedule `sample` runs for these budgets (fractions of full width's MACs or
        measured seconds); see `choose`."""
        return choose(self.front, budget=budget, seconds_budget=seconds_budget, where=self.source)

    def schedule_indices(self, schedule: str | np.ndarray = "auto") -> np.ndarray:
        """'auto': the exported schedule if there is one, else full width; 'full'; or indices."""
        if isinstance(schedule, str):
            if schedule == "auto" and self.schedule is not None:
                return self.sampler.for_schedule(self.schedule).to_indices(self.schedule)
            if schedule in ("auto", "full"):
                return self.sampler.uniform(0)
            raise ValueError(f"schedule must be 'auto', 'full' or width indices, got {schedule!r}")
        array = np.asarray(schedule)
        steps, count = self.sampler.num_steps, len(self.network.widths)
        if not np.issubdtype(array.dtype, np.integer) or array.shape != (steps,) or \
                array.min() < 0 or array.max() >= count:
            raise ValueError(
                f"schedule must be {steps} integer indices into the widths {self.network.widths} "
                f"(0 to {count - 1}), one per sampling step; got {array.dtype} of shape "
                f"{array.shape}" + (" (widths, not indices?)" if np.issubdtype(array.dtype, np.floating)
                                    else ""))
        return array.astype(np.int32)

    def sample(self, num_samples: int, *, seed: int = 0, schedule: str | np.ndarray = "auto",
               budget: float | None = None, seconds_budget: float | None = None,
               batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """float32 NHWC images in [-1, 1] (`ddsm_jax.utils.images.to_uint8` makes pixels). With
        `budget` or `seconds_budget`, the best schedule on offer within it (see `choose`)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or \
                num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or
                                       batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        sampler = self.sampler
        if budget is not None or seconds_budget is not None:
            member = self.choose(budget=budget, seconds_budget=seconds_budget)
            schedule = np.asarray(member.schedule, np.int32)
            sampler = self.sampler.with_timesteps(member.timesteps)
        elif isinstance(schedule, str) and schedule == "auto" and self.schedule is not None:
            sampler = self.sampler.for_schedule(self.schedule)
        noise, sample_key = stream_draws(jax.random.key(seed), num_samples,
                                         self.network.image_shape)
        return sample_in_batches(sampler, self.params, self.schedule_indices(schedule), noise,
                                 sample_key, batch_size or self.config.sampling.batch_size,
                                 progress=progress)


def load(path: PathLike) -> ExportedModel:
    path = epath.Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / PARAMS).exists() or (path / FRONT).exists():
            raise ExportError(f"{path} holds an incomplete export (no {MANIFEST}: it was "
                              f"interrupted); export again with `--mode=export`")
        hint = (f"; did you mean {path / 'export'}?" if (path / "export" / MANIFEST).exists()
                else "; make one with `python -m ddsm_jax.main --mode=export --workdir=DIR`")
        raise ExportError(f"{path} is not a ddsm_jax export (no {MANIFEST}){hint}")
    try:
        manifest = read_json(manifest_path)
        config = ml_collections.ConfigDict(read_json(path / CONFIG))
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
            params = checkpointer.restore(as_path(path / PARAMS), target)
    except Exception as error:  # orbax raises many types; the user needs one line
        raise ExportError(f"cannot read the parameters in {path / PARAMS}: {summary(error)}"
                          ) from error
    schedule = None
    if (path / SCHEDULE).is_file():
        schedule = schedule_from_json(read_json(path / SCHEDULE))
    model = ExportedModel(config, network, diffusion_from_config(config.diffusion), params,
                          schedule, manifest, source=str(path))
    if (path / FRONT).is_file():
        model.front = [FrontMember.from_json(entry) for entry in read_json(path / FRONT)]
    else:  # version 1: full width and the schedule
        model.front = build_front(config, network, params, model.sampler, schedule)
    return model


def measure_seconds(sampler: ScheduleSampler, params: Params, front: Sequence[FrontMember],
                    noise: jax.Array, key: jax.Array, *, repeats: int = 3,
                    progress: bool = True) -> list[FrontMember]:
    """`front` with each member's sampling time for one batch (`noise`), as a ratio to full
    width's: compiled and warmed up first, then the median of `repeats` runs."""

    def seconds(schedule: Sequence[int], timesteps: Sequence[int] | None = None) -> float:
        return median_seconds(sampler.with_timesteps(timesteps), params, schedule, noise, key,
                              repeats=repeats)

    full = seconds(sampler.uniform(0))
    return [dataclasses.replace(m, seconds_ratio=round(seconds(m.schedule, m.timesteps) / full, 4))
            for m in tqdm(front, desc="timing the front", unit="schedule", disable=not progress,
                          leave=False)]


def export_run(config: ml_collections.ConfigDict, directory: PathLike, network: Network,
               diffusion: Diffusion, params: Params, schedule: WidthSchedule | None, *,
               validated: Sequence[dict[str, Any]] = (), step: int | None = None,
               weights: dict[str, Any] | None = None, progress: bool = True) -> epath.Path:
    """`--mode=export`: the artifact, its front with measured times, and
    `config.export.num_samples` samples drawn with the schedule (full width without one), as
    uint8 for guided-diffusion's evaluator."""
    params = jax.device_get(params)
    model = ExportedModel(config, network, diffusion, params, schedule, {})
    key = stream_key(config.seed, Stream.EXPORT)
    noise, sample_key = stream_draws(key, config.export.num_samples, network.image_shape)
    images = sample_in_batches(model.sampler if schedule is None else
                               model.sampler.for_schedule(schedule), params,
                               model.schedule_indices(), noise,
                               sample_key, config.sampling.batch_size, progress=progress)
    front = build_front(config, network, params, model.sampler, schedule, validated)
    timing_noise = initial_noise(jax.random.fold_in(key, 2), config.sampling.batch_size,
                                 network.image_shape)
    front = measure_seconds(model.sampler, params, front, timing_noise, sample_key,
                            progress=progress)
    return save(directory, config, params, schedule, step=step, samples=to_uint8(images),
                front=front, weights=weights)
