"""`python -m ddsm_jax.aot` as a user runs it: the paper configs compiled for a v5e 4x4 slice.

Every run is a subprocess, so libtpu never loads into this CPU test process. The TPU compiler
needs ~20 minutes per CIFAR-10 train step on 2 CPU cores, hence `slow`; the tool caches its
reports by program hash (in the test compilation cache), so a rerun with unchanged programs only
lowers them (tens of seconds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ddsm_jax.training.sandwich import every_sandwich, sandwich_widths

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='needs libtpu, the TPU compiler: pip install "libtpu==0.0.42.*"')
V5E_HBM_GIB = 16
PAPER_WIDTHS = (1.0, 0.75, 0.5, 0.25)


def run_aot(*args: str, hide_libtpu: bool = False, timeout: float = 4 * 3600
            ) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the 8 simulated CPU devices are for the CPU tests only
    if hide_libtpu:  # as if libtpu were not installed, whether it is or not
        env.pop("TPU_LIBRARY_PATH", None)  # set by libtpu itself when JAX loaded it in pytest
        code = ("import runpy, sys; sys.modules['libtpu'] = None; sys.argv[0] = 'aot'; "
                "runpy.run_module('ddsm_jax.aot', run_name='__main__')")
        command = [sys.executable, "-c", code, *args]
    else:
        command = [sys.executable, "-m", "ddsm_jax.aot", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def test_every_sandwich_the_trainer_draws_is_compiled():
    compiled = every_sandwich(PAPER_WIDTHS)
    drawn = {sandwich_widths(PAPER_WIDTHS, 0, i) for i in range(200)}
    assert compiled == [(1.0, 0.25, 0.75), (1.0, 0.25, 0.5)]
    assert sorted(drawn) == sorted(compiled)


def test_without_libtpu_one_line_says_what_to_install():
    done = run_aot("--config=configs/cifar10.py", "--topology=v5e:4x4", hide_libtpu=True,
                   timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        'error: ahead-of-time compilation for TPU needs the TPU compiler: '
        'pip install "libtpu==0.0.42.*"')


@needs_libtpu
def test_a_batch_that_does_not_split_over_the_chips_is_refused_before_compiling():
    done = run_aot("--config=configs/celeba.py", "--topology=v5e:4x4", "--batch_size=100",
                   timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the training batch 100 is not divisible over the 16 chips of the slice; "
        "pass --batch_size=<multiple of 16>")


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("config", ["configs/cifar10.py", "configs/celeba.py"])
def test_paper_config_compiles_for_v5e_4x4_within_a_chips_hbm(config, tmp_path):
    out = tmp_path / "aot.jsonl"
    done = run_aot(f"--config={config}", "--topology=v5e:4x4", f"--json_out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in out.read_text().splitlines()]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed == reports
    assert [r["program"] for r in reports] == ["train_step", "train_step", "sampler"]
    assert [r["widths"] for r in reports[:2]] == [[1.0, 0.25, 0.75], [1.0, 0.25, 0.5]]
    assert reports[2]["branches"] == [{"width": w} for w in PAPER_WIDTHS]
    for report in reports:
        assert report["device_kind"] == "TPU v5 lite" and report["num_chips"] == 16
        assert report["mesh"] == {"data": 16, "fsdp": 1}
        memory = report["memory_gib_per_chip"]
        assert 0 < memory["total"] < V5E_HBM_GIB and report["fits"], memory
        assert report["compile_seconds"] > 0
    # Per chip, not summed over chips: the replicated train state is parameters, EMA and Adam's
    # two moments in float32, and the donated state is reused for the new one.
    state_gib = 4 * 4 * reports[0]["params"] / 2**30
    for report in reports[:2]:
        memory = report["memory_gib_per_chip"]
        assert memory["argument"] == pytest.approx(state_gib, rel=0.01)
        assert memory["alias"] == pytest.approx(state_gib, rel=0.01)
    # The sampler takes only the EMA parameters.
    assert reports[2]["memory_gib_per_chip"]["argument"] == pytest.approx(state_gib / 4, rel=0.01)
