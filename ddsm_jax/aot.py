"""Ahead-of-time compilation for a TPU slice, on a CPU: does a config fit before we pay for a pod?

    python -m ddsm_jax.aot --config=configs/celeba.py --topology=v5e:4x4 [--batch_size=128]
        [--sample_batch_size=64] [--json_out=aot.jsonl] [--cache_dir=DIR] [--config.mesh.fsdp=4 ...]

Compiles, for the slice's TPU compiler but without any TPU, the exact sharded programs a pod run
executes: the sandwich train step once per middle width (each is its own compiled program, as in
training) and the step-aware sampler of `config.sampling` with every width as a `lax.switch`
branch. Prints one JSON object per program with its per-chip memory (arguments, outputs, XLA
temporaries, generated code; GiB) and compile seconds, so a batch size or mesh that runs out of
HBM fails here rather than on the pod after the queue, the VM and the data load.

The TPU compiler is slow on a small CPU host (the CIFAR-10 train step: ~19 minutes on 2 cores),
and JAX's persistent cache cannot reload an executable compiled without a TPU client. So this tool
keeps its own cache of *reports*, keyed by a hash of the lowered program (StableHLO with its
shardings and donations), the topology and the jax/libtpu versions: lowering takes seconds, and an
unchanged program is reported from the cache (`"cached": true`) instead of compiled again.

Needs libtpu (the TPU compiler): `pip install "libtpu==0.0.42.*"`, the version `jax[tpu]==0.10.2`
pins. libtpu warns that TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are unset; that is expected
off a TPU VM and harmless here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from ddsm_jax.common_types import PathLike
from ddsm_jax.utils.cli import run_program
from ddsm_jax.utils.errors import summary
from ddsm_jax.utils.files import read_json, write_json, write_text_atomically

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice as <generation>:<chip grid>, e.g. "
                                "v5e:4x4 (v5litepod-16), v5e:2x4, v5p:2x2x4, v6e:4x4.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global training batch "
                                   "(default: config.training.batch_size).")
_SAMPLE_BATCH_SIZE = flags.DEFINE_integer("sample_batch_size", None, "Global sampling batch "
                                          "(default: config.sampling.batch_size).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON lines to this file.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Where compile reports are cached "
                                 "(default: <compilation cache>/aot_reports; '' disables).")

GIB = 2**30
# HBM per JAX device, by `device_kind`, where one device is one chip (v5e, v5p, v6e) or one core
# (v2, v3). v4 is left out: its 2x2x4 description has 32 devices for 16 megacore chips.
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


class AotError(RuntimeError):
    """A problem the user can fix (missing libtpu, bad topology, batch not divisible)."""


def libtpu_requirement() -> str:
    """The libtpu pin of the installed jax's `tpu` extra, so the advice matches this jax."""
    for requirement in importlib.metadata.requires("jax") or []:
        if requirement.startswith("libtpu") and 'extra == "tpu"' in requirement:
            return requirement.split(";")[0].replace(" ", "")
    return f"jax[tpu]=={importlib.metadata.version('jax')}"


def require_libtpu() -> None:
    """Fails with the install line when no TPU compiler can be found."""
    try:
        found = importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        found = False
    if not found and not os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        raise AotError(f"ahead-of-time compilation for TPU needs the TPU compiler: "
                       f"pip install \"{libtpu_requirement()}\"")


def tpu_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice described by name (no TPU needed, only libtpu)."""
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", topology):
        raise AotError(f"--topology={topology!r} is not <generation>:<chip grid>, e.g. v5e:4x4")
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as error:  # libtpu reports unknown names with assorted internal errors
        raise AotError(f"libtpu cannot describe topology {topology!r}: {summary(error)}"
                       ) from error


def check_divisible(what: str, batch: int, num_chips: int, flag: str) -> None:
    if batch % num_chips:
        raise AotError(f"{what} batch {batch} is not divisible over the {num_chips} chips of the "
                       f"slice; pass {flag}=<multiple of {num_chips}>")


def memory_report(compiled: Any) -> dict[str, float]:
    """Per-chip bytes of one SPMD program (XLA reports one partition's module), in GiB.

    `total` is what must fit in HBM at the peak: arguments + outputs - donated buffers that the
    outputs reuse + temporaries + the program itself.
    """
    stats = compiled.memory_analysis()
    sizes = {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
             "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes,
             "generated_code": stats.generated_code_size_in_bytes}
    sizes["total"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
                      + sizes["generated_code"])
    return {name: round(value / GIB, 4) for name, value in sizes.items()}


class ReportCache:
    """Memory reports of compiled programs, one JSON file per program hash."""

    def __init__(self, directory: PathLike | None, topology: str):
        self.directory = epath.Path(directory) if directory else None
        self.salt = json.dumps([topology, importlib.metadata.version("jax"), _libtpu_version()])

    def key(self, lowered: Any) -> str:
        digest = hashlib.sha256(self.salt.encode())
        digest.update(lowered.as_text().encode())
        return digest.hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.directory / f"{key}.json" if self.directory else None
        if path is None or not path.is_file():
            return None
        try:
            return read_json(path)
        except (OSError, ValueError):
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.directory is None:
            return
        write_json(self.directory / f"{key}.json", entry, indent=None)


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return os.environ.get("TPU_LIBRARY_PATH", "unknown")


def compile_report(jitted: Any, args: Sequence[Any], cache: ReportCache) -> dict[str, Any]:
    """Lowers `jitted(*args)`, compiles it unless the cache knows the program, reports memory."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_seconds = time.perf_counter() - start
    key = cache.key(lowered)
    entry = cache.get(key)
    if entry is not None:
        return {**entry, "cached": True}
    start = time.perf_counter()
    compiled = lowered.compile()
    entry = {"memory_gib_per_chip": memory_report(compiled),
             "compile_seconds": round(lower_seconds + time.perf_counter() - start, 2)}
    cache.put(key, entry)
    return {**entry, "cached": False}


def compile_programs(config: Any, topology: str, cache_dir: PathLike | None = None
                     ) -> list[dict[str, Any]]:
    """Compiles the train steps and the sampler for `topology`; one report dict per program."""
    import jax
    import jax.numpy as jnp

    from ddsm_jax.diffusion import samplers
    from ddsm_jax.diffusion.schedules import diffusion_from_config
    from ddsm_jax.models.network import abstract_network, param_count
    from ddsm_jax.training.curriculum import Curriculum
    from ddsm_jax.training.sharding import batch_sharding, make_mesh, replicated
    from ddsm_jax.training.train_step import abstract_train_state, make_optimizer

    require_libtpu()
    # Entries compiled without a TPU client cannot be reloaded, only rewritten: keep them out.
    jax.config.update("jax_enable_compilation_cache", False)
    cache = ReportCache(cache_dir, topology)
    devices = tpu_devices(topology)
    num_chips = len(devices)
    train_batch, sample_batch = config.training.batch_size, config.sampling.batch_size
    check_divisible("the training", train_batch, num_chips, "--batch_size")
    check_divisible("the sampling", sample_batch, num_chips, "--sample_batch_size")
    try:
        mesh = make_mesh(config.mesh, devices=devices)
    except ValueError as error:
        raise AotError(str(error)) from error

    network, abstract_params = abstract_network(config)
    diffusion = diffusion_from_config(config.diffusion)
    state_in, state_sharding = abstract_train_state(abstract_params,
                                                    make_optimizer(config.training), mesh)
    data_sharding, rep = batch_sharding(mesh), replicated(mesh)

    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)

    def images(batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, *network.image_shape), jnp.float32,
                                    sharding=data_sharding)

    common = {"config": config.data.name, "topology": topology,
              "device_kind": devices[0].device_kind, "num_chips": num_chips,
              "mesh": dict(mesh.shape), "params": param_count(abstract_params),
              "hbm_gib_per_chip": HBM_GIB.get(devices[0].device_kind)}

    def report(program: str, compiled: dict[str, Any], **fields: Any) -> dict[str, Any]:
        hbm = common["hbm_gib_per_chip"]
        total = compiled["memory_gib_per_chip"]["total"]
        entry = {"program": program, **common, **fields, **compiled,
                 "fits": None if hbm is None else total <= hbm}
        print(json.dumps(entry), flush=True)  # as soon as known: a full run takes a while
        return entry

    reports = []
    curriculum = Curriculum.of(config, network)
    train_step = curriculum.make_step(network, diffusion, config.training,
                                      state_sharding=state_sharding, batch_sharding=data_sharding)
    for choice in curriculum.every_choice:
        compiled = compile_report(train_step, (state_in, images(train_batch), key, choice), cache)
        trains = ({"widths": list(choice)} if curriculum.unit == "sandwich"
                  else {"stage": choice[0], "widths": list(choice[1])})
        reports.append(report("train_step", compiled, **trains,
                              global_batch=train_batch, per_chip_batch=train_batch // num_chips))

    sampling = config.sampling
    timesteps = samplers.sampling_timesteps(sampling.method, diffusion.num_timesteps,
                                            sampling.num_steps, sampling.spacing)

    def sample(params: Any, schedule: jax.Array, x_T: jax.Array, key: jax.Array) -> jax.Array:
        # What `sampling.ScheduleSampler` compiles for a schedule that uses every branch.
        return samplers.sample(network.branch_fns(params), diffusion, schedule, x_T, key,
                               method=sampling.method,
                               timesteps=timesteps, eta=sampling.eta, variance=sampling.variance,
                               clip_denoised=sampling.clip_denoised)

    schedule = jax.ShapeDtypeStruct((len(timesteps),), jnp.int32, sharding=rep)
    compiled = compile_report(jax.jit(sample, out_shardings=data_sharding),
                              (state_in.ema_params, schedule, images(sample_batch), key), cache)
    reports.append(report("sampler", compiled, method=sampling.method,
                          num_steps=len(timesteps),
                          branches=[dict(network.branch(*divmod(i, len(network.widths))))
                                    for i in range(network.num_stages * len(network.widths))],
                          global_batch=sample_batch, per_chip_batch=sample_batch // num_chips))
    return reports


def compile_only_environment() -> None:
    """Must run before JAX is imported (this module imports it lazily for that reason).

    Host-side work stays on the CPU and no local TPU is ever claimed (so this also runs next to a
    job on a TPU VM), and libtpu's one-process lock file is skipped: this process only compiles,
    and other JAX processes on the machine may have loaded libtpu too.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    compile_only_environment()
    config = _CONFIG.value
    with config.unlocked():
        if _BATCH_SIZE.value is not None:
            config.training.batch_size = _BATCH_SIZE.value
        if _SAMPLE_BATCH_SIZE.value is not None:
            config.sampling.batch_size = _SAMPLE_BATCH_SIZE.value
    cache_dir = _CACHE_DIR.value
    if cache_dir is None:
        from ddsm_jax.utils.compilation_cache import DEFAULT_DIR
        cache_dir = epath.Path(DEFAULT_DIR) / "aot_reports"
    try:
        reports = compile_programs(config, _TOPOLOGY.value, cache_dir)
    except AotError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if _JSON_OUT.value:
        write_text_atomically(_JSON_OUT.value, "".join(json.dumps(r) + "\n" for r in reports))


if __name__ == "__main__":
    run_program(main, required=["config", "topology"])
