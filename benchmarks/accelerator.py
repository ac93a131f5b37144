"""ddsm_jax on an accelerator, in one prepared command: the device and its measured matmul peaks,
the correctness tests on it, the CIFAR-10 train step (float32 and bfloat16, with MFU), sampling
per width and with the release's schedule (time ratio beside MACs ratio), and the population
sampler's throughput.

    bash benchmarks/accelerator.sh                      # on the device machine ($OUT: the results)
    python -m benchmarks.accelerator --smoke            # the same code path on CPU, under a minute

Every figure is printed as a table and written as one JSON line to `--out`/accelerator.jsonl
(default `$OUT`, else ./accelerator_out). Sections run in order of importance and each is
skipped, with a note, once `--budget_seconds` of wall clock is spent, so a slow device still
returns what it measured. The `saving` column is the time saved over the MACs saved (1 = time
falls exactly as MACs do; the paper's GPU figures put it at 0.42-0.82).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from benchmarks.common import machine, matmul_peak_gflops, median_seconds
from ddsm_jax import configs
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.cost import macs_table
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise
from ddsm_jax.search.population import PopulationSampler
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step
from ddsm_jax.utils.errors import summary
from ddsm_jax.width_schedule import load_schedule

_SMOKE = flags.DEFINE_bool("smoke", False, "CPU check of this script: the tiny digits config, "
                           "small batches, a few fast tests; every section still runs.")
_OUT = flags.DEFINE_string("out", None, "Folder for accelerator.jsonl (default $OUT, else "
                           "./accelerator_out).")
_BUDGET = flags.DEFINE_float("budget_seconds", 330.0, "Wall clock after which the remaining "
                             "sections are skipped (the device machine allows ~6 minutes).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per row (median).")
SECTIONS = ("peak", "tests", "train", "sampling", "population")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), "Sections to run, in this order.")
flags.register_validator("sections", lambda values: set(values) <= set(SECTIONS),
                         f"--sections takes {','.join(SECTIONS)}")

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FLOPS_PER_MAC = 2 * 3  # multiply-add; forward, input gradient, weight gradient
DTYPES = ("float32", "bfloat16")
# The model, sampler, population-sampler and hot-path tests: what must hold on any device.
DEVICE_TESTS = ["tests/test_models.py", "tests/test_sampling.py", "tests/test_population.py",
                "tests/test_hot_paths.py"]


def settings(smoke: bool) -> dict:
    """What each section measures: the paper's CIFAR-10 setting, or a tiny CPU stand-in."""
    if smoke:
        return {"smoke": True, "config": "digits.py:tiny", "peak_sizes": (256, 512), "train_batch": 8,
                "sample_batches": (8,), "sample_steps": 4, "population": 4, "population_batch": 4,
                "schedule": None,
                "tests": ["tests/test_models.py", "-k", "divisible or parameter_count"]}
    return {"smoke": False, "config": "cifar10.py", "peak_sizes": (4096, 8192), "train_batch": 128,
            "sample_batches": (256, 1024), "sample_steps": 100, "population": 16,
            "population_batch": 64, "schedule": configs.DIRECTORY / "release_cifar10_schedule.json",
            "tests": DEVICE_TESTS}


def load_config(name: str, smoke: bool):
    path, _, variant = name.partition(":")
    module = importlib.import_module(f"ddsm_jax.configs.{path.removesuffix('.py')}")
    config = module.get_config(variant) if variant else module.get_config()
    if smoke:  # one resolution, no attention, two widths: every section compiles in seconds
        config.model.ch, config.model.ch_mult, config.model.attn_resolutions = 8, (1,), ()
        config.model.widths = (1.0, 0.5)
    return config


class Report:
    """Rows printed as they come and appended to accelerator.jsonl, so a run cut short keeps
    everything measured before the cut."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "accelerator.jsonl"
        self.path.write_text("")
        self.rows: list[dict] = []

    def add(self, section: str, **row) -> None:
        row = {"section": section, **row}
        self.rows.append(row)
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k != "section")
        print(f"[{section}] {shown}", flush=True)

    def print_tables(self) -> None:
        """One table per section, the rows' keys as columns."""
        for section in dict.fromkeys(row["section"] for row in self.rows):
            rows = [row for row in self.rows if row["section"] == section]
            keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "section"]
            cells = [[_cell(row.get(k)) for k in keys] for row in rows]
            widths = [max(len(k), *(len(line[i]) for line in cells)) for i, k in enumerate(keys)]
            print(f"\n## {section}")
            print("  ".join(f"{k:>{w}}" for k, w in zip(keys, widths)))
            for line in cells:
                print("  ".join(f"{c:>{w}}" for c, w in zip(line, widths)))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return f"{len(value)} listed"
    return str(value)


def run_tests(report: Report, paths: list[str]) -> None:
    """The test subset on this machine's default device (not the 8 simulated CPUs)."""
    junit = report.path.parent / "tests.xml"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}", *paths], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    report.add("tests", paths=" ".join(paths), returncode=done.returncode, **counts,
               seconds=round(time.perf_counter() - start, 1), failed=failed[:20])


def time_train_step(report: Report, config, per_chip_batch: int, repeats: int,
                    peaks: dict[str, float]) -> None:
    """One sandwich step (full, narrowest, a middle width) per dtype, against that dtype's peak."""
    devices = jax.device_count()
    batch_size = per_chip_batch * devices
    widths = sandwich_widths(config.model.widths, config.seed, 0)
    for dtype in DTYPES:
        config.model.dtype = dtype
        network, params = init_network(config, jax.random.key(0))
        macs = {w: row["total"] for w, row in macs_table(network, params).items()}
        step = make_train_step(network, diffusion_from_config(config.diffusion), config.training)
        state = TrainState.create(params, make_optimizer(config.training))
        batch = jax.device_put(np.zeros((batch_size, *network.image_shape), np.float32))
        rng = jax.random.key(1)

        def run(batch=batch, step=step, rng=rng):
            nonlocal state
            state, metrics = step(state, batch, rng, widths)
            return metrics["loss"]

        seconds, compiles = median_seconds(run, repeats)
        tflops = TRAIN_FLOPS_PER_MAC * sum(macs[w] for w in widths) * batch_size / seconds / 1e12
        peak = peaks.get(dtype)
        report.add("train", config=config.data.name, dtype=dtype, batch=batch_size,
                   per_chip_batch=per_chip_batch, widths="/".join(f"{w:g}" for w in widths),
                   seconds=seconds, images_per_sec=batch_size / seconds, tflops=tflops,
                   mfu=tflops / peak if peak else None, compile_seconds=compiles.seconds)
    config.model.dtype = "float32"


def time_sampling(report: Report, config, batches: tuple[int, ...], num_steps: int,
                  repeats: int, schedule_path: Path | None) -> None:
    """Full width, every uniform width and the release's schedule, side by side per batch."""
    config.sampling.method, config.sampling.num_steps = "ddim", num_steps
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    per_width = [row["total"] for row in macs_table(network, params).values()]
    schedules = {f"{w:g}": sampler.uniform(i) for i, w in enumerate(network.widths)}
    if schedule_path is not None:
        release = load_schedule(schedule_path, widths=network.widths, sampler="ddim",
                                timesteps=sampler.timesteps)
        schedules["release schedule"] = sampler.to_indices(release)
    for batch in batches:
        noise = initial_noise(jax.random.key(1), batch, network.image_shape)
        full_seconds = full_macs = None
        for name, schedule in schedules.items():
            seconds, compiles = median_seconds(
                lambda s=schedule, noise=noise: sampler(params, s, noise, jax.random.key(2)),
                repeats)
            macs = sum(per_width[i] for i in schedule) / len(schedule)
            full_seconds, full_macs = full_seconds or seconds, full_macs or macs
            time_ratio, macs_ratio = seconds / full_seconds, macs / full_macs
            saving = (1 - time_ratio) / (1 - macs_ratio) if macs_ratio < 1 else None
            report.add("sampling", batch=batch, steps=num_steps, schedule=name, seconds=seconds,
                       images_per_sec=batch / seconds, time_ratio=time_ratio,
                       macs_ratio=macs_ratio, saving=saving, compile_seconds=compiles.seconds)


def time_population(report: Report, config, num_candidates: int, batch: int, num_steps: int,
                    repeats: int) -> None:
    """Random schedules from shared noise, every candidate from x_T (no prefix sharing): the
    search's raw rate, in candidate-images x steps per second."""
    config.sampling.method, config.sampling.num_steps = "ddim", num_steps
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    population_sampler = PopulationSampler(sampler)
    rng = np.random.default_rng(0)
    population = rng.integers(0, len(network.widths), (num_candidates, num_steps), np.int32)
    noise = initial_noise(jax.random.key(1), batch, network.image_shape)
    seconds, compiles = median_seconds(lambda: population_sampler(
        params, population, noise, jax.random.key(2), share_prefixes=False).samples, repeats)
    work = num_candidates * batch * num_steps
    report.add("population", candidates=num_candidates, batch=batch, steps=num_steps,
               devices=population_sampler.num_shards, seconds=seconds,
               candidate_image_steps_per_sec=work / seconds, compile_seconds=compiles.seconds)


def run_section(section: str, report: Report, chosen: dict, repeats: int,
                peaks: dict[str, float]) -> None:
    """One section's rows into `report`; each section builds its own config from scratch."""
    if section == "peak":
        for dtype in DTYPES:
            # float32 at JAX's default precision, which on tensor-core GPUs may use TF32
            peaks[dtype] = matmul_peak_gflops(chosen["peak_sizes"], max(repeats, 3), dtype) / 1e3
            report.add("peak", dtype=dtype, tflops=peaks[dtype])
        return
    if section == "tests":
        run_tests(report, chosen["tests"])
        return
    config = load_config(chosen["config"], chosen["smoke"])
    steps = chosen["sample_steps"]
    if section == "train":
        time_train_step(report, config, chosen["train_batch"], repeats, peaks)
    elif section == "sampling":
        time_sampling(report, config, chosen["sample_batches"], steps, repeats, chosen["schedule"])
    elif section == "population":
        time_population(report, config, chosen["population"], chosen["population_batch"], steps,
                        repeats)


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    if _SMOKE.value:
        jax.config.update("jax_platforms", "cpu")
    chosen = settings(_SMOKE.value)
    out = Path(_OUT.value or os.environ.get("OUT") or "accelerator_out")
    report = Report(out)
    device = jax.devices()[0]
    print(f"$ python -m benchmarks.accelerator {' '.join(sys.argv[1:])}".rstrip())
    print(f"# {machine()}")
    report.add("device", platform=device.platform, kind=device.device_kind,
               count=jax.device_count(), jax=jax.__version__, smoke=_SMOKE.value)
    repeats = 1 if _SMOKE.value else _REPEATS.value
    peaks: dict[str, float] = {}
    for section in _SECTIONS.value:
        spent = time.perf_counter() - start
        if spent > _BUDGET.value:
            report.add("skipped", name=section, after_seconds=round(spent, 1))
            continue
        section_start = time.perf_counter()
        try:
            run_section(section, report, chosen, repeats, peaks)
        except Exception as error:  # one failing section must not lose the others' figures
            report.add("error", name=section, error=summary(error, limit=500))
        print(f"# {section}: {time.perf_counter() - section_start:.1f} s", flush=True)
    report.print_tables()
    print(f"# total {time.perf_counter() - start:.1f} s; results in {report.path}")


if __name__ == "__main__":
    app.run(main)
