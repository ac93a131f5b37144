"""The benchmark scripts run as the README shows and print their table and JSON lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _process(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as documented
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**env, "JAX_PLATFORMS": "cpu"})


def _run(*args: str, devices: int = 1) -> list[dict]:
    result = _process(*args, devices=devices)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"$ python -m {args[0]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_train_step_benchmark_reports_throughput_against_the_peak():
    rows = _run("benchmarks.train_step", "--config=configs/digits.py", "--batches=4",
                "--repeats=1", "--nosingle_widths", "--middle_widths=0.5",
                "--microbatch_sizes=2")
    assert [(row["step"], row["widths"], row["microbatch"]) for row in rows] == [
        ("sandwich", "1/0.25/0.5", 2)]
    assert all(0 < row["of_peak"] < 1 and row["compiles"] >= 1 for row in rows)


def test_train_step_benchmark_names_the_middle_widths_it_can_time():
    result = _process("benchmarks.train_step", "--config=configs/digits.py", "--batches=4",
                      "--middle_widths=0.3")
    assert result.returncode != 0
    assert "--middle_widths=0.3: this config's sandwiches have middle widths 0.5,0.75" in (
        result.stderr + result.stdout)


def test_train_step_benchmark_rejects_an_unknown_scheduler_before_measuring():
    result = _process("benchmarks.train_step", "--config=configs/digits.py", "--batches=4",
                      "--cpu_schedulers=memory,fastest")
    assert result.returncode != 0
    assert "--cpu_schedulers takes memory,concurrency" in result.stderr + result.stdout
    assert "peak" not in result.stdout  # nothing was measured


@pytest.mark.slow
def test_sampling_benchmark_reports_time_beside_macs():
    rows = _run("benchmarks.sampling", "--config=configs/digits.py", "--batch=4", "--steps=3",
                "--repeats=1")
    assert [row["width"] for row in rows] == ["1", "0.75", "0.5", "0.25"]
    assert rows[0]["time_ratio"] == rows[0]["macs_ratio"] == 1.0
    assert rows[-1]["macs_ratio"] < rows[1]["macs_ratio"] < 1.0
    sharded = _run("benchmarks.sampling", "--config=configs/digits.py", "--batch=8", "--steps=2",
                   "--repeats=1", devices=2)  # a CPU's two cores as devices
    assert [row["devices"] for row in sharded] == [2] * 4 and rows[0]["devices"] == 1
    uneven = _process("benchmarks.sampling", "--batch=3", devices=2)
    assert uneven.returncode == 1
    assert uneven.stderr.strip().splitlines()[-1] == ("--batch=3 does not split evenly over 2 "
                                                      "devices; give a multiple or set --devices")


def test_random_bits_benchmark_times_both_lowerings_and_finds_the_same_bits():
    rows = _run("benchmarks.random_bits", "--repeats=1")
    assert [row["shape"] for row in rows] == ["8x32x32x128", "8x32x32x256", "8x16x16x256",
                                              "64x8x8x32"]
    assert all(row["jax_mask_ms"] > 0 and row["package_mask_ms"] > 0 for row in rows)


def test_the_machine_line_names_the_cpu_model_and_its_vector_unit(tmp_path):
    from benchmarks.common import cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    processor = ("processor\t: {n}\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\n"
                 "flags\t\t: fpu sse2 avx2 {wide}\n")
    cpuinfo.write_text(processor.format(n=0, wide="avx512f avx512bw") + "\n"
                       + processor.format(n=1, wide=""))
    assert cpu_model(cpuinfo) == "AMD EPYC (family 25, model 17, AVX-512)"
    cpuinfo.write_text(processor.format(n=0, wide=""))
    assert cpu_model(cpuinfo) == "AMD EPYC (family 25, model 17, AVX2)"
    assert cpu_model(tmp_path / "missing")  # no /proc (macOS): the platform name or a placeholder


def test_accelerator_smoke_runs_every_section_and_writes_json_lines(tmp_path):
    """The device script's code path on CPU, so it cannot rot between sessions with a device."""
    result = _process("benchmarks.accelerator", "--smoke", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "accelerator.jsonl").read_text().splitlines()]
    sections = [row["section"] for row in rows]
    assert sections[0] == "device" and "skipped" not in sections and "error" not in sections, rows
    assert sections.count("peak") == 2 and sections.count("train") == 2  # float32, bfloat16
    tests = next(row for row in rows if row["section"] == "tests")
    assert tests["returncode"] == 0 and tests["tests"] > 0 and tests["failures"] == 0
    for row in rows:
        if row["section"] == "train":
            assert row["tflops"] > 0 and row["mfu"] > 0
    sampling = [row for row in rows if row["section"] == "sampling"]
    assert [row["schedule"] for row in sampling] == ["1", "0.5"]
    assert sampling[0]["time_ratio"] == sampling[0]["macs_ratio"] == 1.0
    assert all(row["saving"] is not None for row in sampling[1:])
    population = next(row for row in rows if row["section"] == "population")
    assert population["candidate_image_steps_per_sec"] > 0
    for header in ("## peak", "## train", "## sampling", "## population", "# total"):
        assert header in result.stdout


def test_vs_torch_times_both_side_by_side_or_says_how_to_get_torch():
    """PyTorch is not a requirement: without it the script says how to install it; with it, a
    row per width and the train step, each timed on both sides."""
    import importlib.util

    args = ("benchmarks.vs_torch", "--batch=1", "--repeats=1", "--rounds=1",
            "--sandwich=1.0,0.5")
    if importlib.util.find_spec("torch") is None:
        result = _process(*args)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith("benchmarks.vs_torch needs PyTorch")
        return
    rows = _run(*args)
    assert [row["row"] for row in rows] == ["forward 1", "forward 0.75", "forward 0.5",
                                            "forward 0.25", "sandwich 1/0.5"]
    assert all(len(row["torch_seconds"]) == len(row["jax_seconds"]) == 1 for row in rows)
    assert all(row["speed_min"] > 0 for row in rows)
    layers = _run("benchmarks.vs_torch", "--layers", "--batch=1", "--rounds=1")
    assert [row["shape"] for row in layers] == [
        "32x32x128", "32x32x96", "16x16x256", "16x16x192", "8x8x256", "8x8x192", "4x4x256",
        "4x4x192"]
    assert all(row["conv_gflops_jax"][0] > 0 and row["norm_ms_torch"][0] > 0 for row in layers)
