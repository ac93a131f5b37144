"""A per-step width schedule as a file: what search writes, and evaluate, export and sample read.

`schedule.json` holds `widths` (the network's widths: the index space), `schedule` (one index per
sampling step, in sampling order), `timesteps` (the diffusion step t of each sampling step),
`sampler` and `num_steps`, plus whatever figures the search measured (`macs_mean`, `fd`, ...).
The original release's file (`widths_per_timestep`, indexed by t) is read as well.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.layout import Workdir
from ddsm_jax.models.stage_widths import Width, as_width, stage_profile, width_json
from ddsm_jax.utils.files import write_json


class ScheduleError(ValueError):
    """A schedule file that does not fit the network or the sampler it is used with."""


@dataclasses.dataclass(frozen=True)
class WidthSchedule:
    widths: tuple[Width, ...]  # numbers, or (encoder, middle, decoder) triples (stage widths)
    schedule: tuple[int, ...]
    timesteps: tuple[int, ...]
    sampler: str
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.schedule) != len(self.timesteps) or not self.schedule:
            raise ScheduleError(f"a schedule needs one width index per sampling step: "
                                f"{len(self.schedule)} indices for {len(self.timesteps)} steps")
        if min(self.schedule) < 0 or max(self.schedule) >= len(self.widths):
            raise ScheduleError(f"schedule indices must lie in [0, {len(self.widths)}) "
                                f"(widths {list(self.widths)})")

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    @property
    def timesteps_searched(self) -> bool:
        """Whether the search chose the timesteps too (then they need not be the config's)."""
        return bool(self.figures.get("timesteps_searched", False))

    @property
    def width_per_step(self) -> list[Width]:
        return [self.widths[i] for i in self.schedule]

    @property
    def stage_widths_per_step(self) -> np.ndarray:
        """(steps, 3): each step's encoder, middle and decoder width."""
        return np.asarray([stage_profile(w) for w in self.width_per_step])

    def indices_for(self, network_widths: Sequence[Width], sampler: str,
                    timesteps: Sequence[int]) -> np.ndarray:
        """This schedule as indices into `network_widths`, checked against the sampler it runs on."""
        if self.timesteps_searched:  # its own timesteps: the config fixes their number
            if sampler != self.sampler or len(timesteps) != self.num_steps:
                raise ScheduleError(
                    f"the schedule chose {self.num_steps} timesteps for the {self.sampler} "
                    f"sampler, but the config samples with {sampler} and {len(timesteps)} steps; "
                    f"set --config.sampling.method/num_steps to match")
        elif sampler != self.sampler or list(timesteps) != list(self.timesteps):
            raise ScheduleError(
                f"the schedule was made for the {self.sampler} sampler with {self.num_steps} steps, "
                f"but the config samples with {sampler} and {len(timesteps)} steps; set "
                f"--config.sampling.method/num_steps/spacing to match")
        position = {as_width(w): i for i, w in enumerate(network_widths)}
        missing = [w for w in dict.fromkeys(self.widths) if as_width(w) not in position]
        if missing:
            raise ScheduleError(f"the schedule uses widths {missing} that the network "
                                f"(widths {list(network_widths)}) does not have; a width per "
                                f"U-Net stage needs --config.model.stage_widths=True")
        return np.asarray([position[as_width(w)] for w in self.width_per_step], np.int32)

    def to_json(self) -> dict[str, Any]:
        return {"widths": [width_json(w) for w in self.widths], "schedule": list(self.schedule),
                "timesteps": list(self.timesteps), "sampler": self.sampler,
                "num_steps": self.num_steps, **self.figures}

    def save(self, path: PathLike) -> epath.Path:
        return write_json(path, self.to_json())


def schedule_from_json(data: dict[str, Any], *, widths: Sequence[Width] | None = None,
                       sampler: str | None = None,
                       timesteps: Sequence[int] | None = None) -> WidthSchedule:
    """Ours as written by `save`, or the release's `widths_per_timestep` (which then needs the
    network's `widths` and the sampler's `timesteps` to become indices in sampling order)."""
    if "widths_per_timestep" in data:
        if widths is None or timesteps is None or sampler is None:
            raise ScheduleError("a per-timestep schedule needs the network's widths and the "
                                "sampler's timesteps")
        per_t = np.asarray(data["widths_per_timestep"], np.float64)
        if max(timesteps) >= len(per_t):
            raise ScheduleError(f"the file gives widths for {len(per_t)} timesteps, but the "
                                f"sampler visits t = {max(timesteps)}")
        position = {float(w): i for i, w in enumerate(widths)}
        unknown = sorted(set(per_t.tolist()) - set(position))
        if unknown:
            raise ScheduleError(f"the file uses widths {unknown} that the network "
                                f"(widths {list(widths)}) does not have")
        return WidthSchedule(tuple(float(w) for w in widths),
                             tuple(position[float(per_t[t])] for t in timesteps),
                             tuple(int(t) for t in timesteps), sampler)
    try:
        figures = {k: v for k, v in data.items()
                   if k not in ("widths", "schedule", "timesteps", "sampler", "num_steps")}
        return WidthSchedule(tuple(as_width(w) for w in data["widths"]),
                             tuple(int(i) for i in data["schedule"]),
                             tuple(int(t) for t in data["timesteps"]), str(data["sampler"]),
                             figures)
    except KeyError as error:
        raise ScheduleError(f"a schedule file needs the key {error}") from error


def load_schedule(path: PathLike, **kwargs: Any) -> WidthSchedule:
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no schedule file at {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ScheduleError(f"{path} is not a JSON schedule: {error}") from error
    try:
        return schedule_from_json(data, **kwargs)
    except ScheduleError as error:
        raise ScheduleError(f"{path}: {error}") from error


def find_schedule(explicit_path: str | None, workdir: PathLike, *, widths: Sequence[Width],
                  sampler: str, timesteps: Sequence[int]) -> WidthSchedule | None:
    """The schedule a run should use: the path given, else `DIR/search/schedule.json`, else none.

    A schedule made for another sampler or step count is an error, not silently ignored.
    """
    path = epath.Path(explicit_path) if explicit_path else Workdir(workdir).schedule
    if not explicit_path and not path.is_file():
        return None
    schedule = load_schedule(path, widths=widths, sampler=sampler, timesteps=timesteps)
    try:
        schedule.indices_for(widths, sampler, timesteps)
    except ScheduleError as error:
        raise ScheduleError(f"{path}: {error}") from error
    return schedule
