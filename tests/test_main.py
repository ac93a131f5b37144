"""The command line as a user runs it: real subprocesses, real exit codes and messages."""

import json
import subprocess
import sys

import pytest
from PIL import Image

TINY = ["--config.training.num_steps=4", "--config.training.batch_size=16",
        "--config.training.log_every=2", "--config.training.sample_every=4", "--config.sampling.num_steps=5",
        "--config.sampling.num_samples=8", "--config.sampling.batch_size=8"]


# Evaluation and export at the smallest sizes that still score: for the strategy pipelines.
SMALL_EVAL = ["--config.eval.num_samples=24", "--config.eval.num_reference=200",
              "--config.eval.kid_subsets=5", "--config.export.num_samples=8"]
SMALL_SEARCH = ["--config.search.population_size=4", "--config.search.generations=1",
                "--config.search.num_samples=16", "--config.search.validation_samples=16"]


def run_all(workdir, *args) -> list[dict]:
    """`--mode=all` in `workdir`, which must succeed; the stage reports it printed."""
    done = run_main(f"--workdir={workdir}", "--mode=all", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def run_main(*args):
    return subprocess.run([sys.executable, "-m", "ddsm_jax.main", "--config=configs/digits.py", *args],
                          capture_output=True, text=True)


def test_embedded_run_writes_a_grid_per_width_a_checkpoint_and_metrics(tmp_path):
    done = run_main(f"--workdir={tmp_path}", *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["step"] == 4
    for width in ("1.0", "0.75", "0.5", "0.25"):
        with Image.open(tmp_path / "samples" / f"width_{width}.png") as image:
            assert image.size[0] >= 3 * 32  # 8 samples: a 3x3 grid of 32-pixel images
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "samples" / "step_4" / "widths.png").exists()  # grids during training
    # `--mode=sample` reloads the checkpoint instead of training again.
    again = run_main(f"--workdir={tmp_path}", "--mode=sample", *TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 4


def test_a_mistyped_config_key_is_refused(tmp_path):
    done = run_main(f"--workdir={tmp_path}", "--config.training.num_stpes=4")
    assert done.returncode != 0
    assert "num_stpes" in done.stderr


def test_an_unknown_data_set_is_one_clear_line(tmp_path):
    done = run_main(f"--workdir={tmp_path}", "--config.data.name=svhn")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown data set 'svhn'; known data sets: ")
    assert "digits" in last and "cifar10" in last


@pytest.mark.parametrize("args, message", [
    (["--config.training.distillation=2"], "must lie in [0, 1]"),
    (["--config.training.distillation=1", "--config.strategy=adadiff"],
     "applies to sandwich training"),
])
def test_distillation_settings_that_cannot_apply_are_refused(tmp_path, args, message):
    done = run_main(f"--workdir={tmp_path / 'run'}", *args)
    assert done.returncode == 1 and message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--config.search.timesteps=searched", "--config.sampling.method=ddpm"],
     "chooses DDIM's timesteps"),
    (["--config.search.timesteps=searched", "--config.strategy=multistage",
      "--config.multistage.decoder_widths=(1.0,0.5)"], "multi-stage network ties"),
    (["--config.search.cost=seconds", "--config.search.objective=weighted"],
     "prices the budget and pareto objectives"),
])
def test_search_settings_are_refused_before_a_run_trains(tmp_path, args, message):
    done = run_main(f"--workdir={tmp_path / 'run'}", "--mode=all", *args)
    assert done.returncode == 1 and message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_sampling_without_a_checkpoint_says_what_to_run(tmp_path):
    done = run_main(f"--workdir={tmp_path}", "--mode=sample", *TINY)
    assert done.returncode == 1
    assert "run --mode=train" in done.stderr.strip().splitlines()[-1]


def test_the_multistage_strategy_runs_its_whole_pipeline(tmp_path, digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    small = [*TINY, *SMALL_EVAL, "--config.strategy=multistage"]
    done = run_main(f"--workdir={workdir}", "--mode=all", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["stage"] for r in reports] == ["grids", "evaluate", "export"]  # nothing to search
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["strategy"] == "multistage"
    # Decoders of 48, 32 and 8 channels; most steps are in the noisy stage, the 8-channel one.
    assert 0.5 < metrics["full"]["macs_ratio"] < 0.9
    assert metrics["training"]["macs_ratio"] < 1
    log = (workdir / "metrics.jsonl").read_text()
    assert "loss_stage" in log and "loss_w" not in log
    sampled = subprocess.run([sys.executable, "-m", "ddsm_jax.sample",
                              f"--export={workdir / 'export'}", "--num_samples=3",
                              f"--out={tmp_path / 'drawn.npz'}"], capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    searched = run_main(f"--workdir={workdir}", "--mode=search", *small)
    assert searched.returncode == 1
    assert "no schedule to search" in searched.stderr.strip().splitlines()[-1]


def test_the_step_adaptive_strategy_runs_its_whole_pipeline(tmp_path, digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    small = [*TINY, *SMALL_EVAL, "--config.strategy=step_adaptive",
             "--config.step_adaptive.num_groups=2", "--config.step_adaptive.finetune_steps=4",
             "--config.step_adaptive.probe_images=16", "--config.step_adaptive.macs_budget=0.6"]
    done = run_main(f"--workdir={workdir}", "--mode=all", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["stage"] for r in reports] == ["grids", "evaluate", "export"]
    assert reports[0]["step"] == 4  # the fine-tuning's steps; the base model's are in base/
    assert (workdir / "base" / "checkpoints" / "4").is_dir()
    plan = json.loads((workdir / "step_groups.json").read_text())
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["strategy"] == "step_adaptive"
    assert abs(metrics["full"]["macs_ratio"] - plan["macs_ratio"]) < 1e-9
    assert plan["macs_ratio"] <= 0.6 and len(plan["group_widths"]) == 2
    assert metrics["training"]["images"] == (4 + 4) * 16  # base model and fine-tuning
    log = (workdir / "metrics.jsonl").read_text()
    assert "loss_stage" in log and "loss_w" not in log
    # Its fewer-steps baseline is the base model (the plain U-Net), up to every step.
    steps = metrics["sampler"]["num_steps"]
    assert metrics["fewer_steps_of"] == "full" and str(steps) in metrics["fewer_steps"]
    for count, entry in metrics["fewer_steps"].items():
        assert abs(entry["macs_ratio"] - int(count) / steps) < 1e-9
    # A later mode rebuilds the same groups from the plan; a plan from other base weights is
    # refused by name rather than fine-tuned further.
    evaluated = run_main(f"--workdir={workdir}", "--mode=evaluate", *small)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rescored = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert [rescored["full"]["fd"], rescored["fewer_steps"][str(steps)]["fd"]] == [
        metrics["full"]["fd"], metrics["fewer_steps"][str(steps)]["fd"]]
    other_budget = [a.replace("macs_budget=0.6", "macs_budget=0.5") for a in small]
    replanned = run_main(f"--workdir={workdir}", "--mode=train", *other_budget)
    assert replanned.returncode == 1
    assert "planned with other step_adaptive settings" in replanned.stderr.strip().splitlines()[-1]
    plan["base_weights"]["sha256"] = "0" * 16
    (workdir / "step_groups.json").write_text(json.dumps(plan))
    again = run_main(f"--workdir={workdir}", "--mode=train", *small)
    assert again.returncode == 1
    assert "pruned from other base weights" in again.stderr.strip().splitlines()[-1]


def test_slimmable_multistage_decoders_get_a_searched_width_per_step(tmp_path, digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    reports = run_all(workdir, *TINY, *SMALL_EVAL, *SMALL_SEARCH, "--config.strategy=multistage",
                      "--config.multistage.decoder_widths=(1.0,0.5)",
                      "--config.search.macs_budget=0.9")
    assert [r["stage"] for r in reports] == ["grids", "search", "evaluate", "export"]
    schedule = json.loads((workdir / "search" / "schedule.json").read_text())
    assert schedule["widths"] == [1.0, 0.5] and len(schedule["schedule"]) == 5
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert set(metrics["uniform"]) == {"0.5"} and metrics["schedule"]["macs_ratio"] <= 0.9
    assert metrics["uniform"]["0.5"]["macs_ratio"] < metrics["full"]["macs_ratio"]
    assert "loss_stage2_w0.5" in (workdir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("args, message", [
    (["--config.training.global_middles=2.0"], "global_middles=2.0 must lie in [0, 1]"),
    (["--config.model.stage_widths=True", "--config.model.widths=(1.0,)"],
     "stage_widths=True mixes neighbouring widths"),
    (["--config.model.stage_widths=True", "--config.strategy=adadiff"], "DDSM's search space")])
def test_stage_width_settings_that_cannot_work_are_one_line_and_create_nothing(tmp_path, args,
                                                                               message):
    done = run_main(f"--workdir={tmp_path / 'run'}", "--mode=all", *args)
    assert done.returncode == 1
    assert message in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_width_per_unet_stage_is_trained_searched_evaluated_and_exported(tmp_path,
                                                                           digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    reports = run_all(workdir, *TINY, *SMALL_EVAL, *SMALL_SEARCH, "--config.training.num_steps=2",
                      "--config.training.checkpoint_every=2", "--config.model.stage_widths=True",
                      "--config.model.widths=(1.0,0.5)", "--config.search.population_size=6",
                      "--config.search.macs_budget=0.7")
    assert [r["stage"] for r in reports] == ["grids", "search", "evaluate", "export"]
    schedule = json.loads((workdir / "search" / "schedule.json").read_text())
    assert schedule["widths"][0] == 1.0 and schedule["widths"][-1] == 0.5
    assert [0.5, 1.0, 1.0] in schedule["widths"] and len(schedule["widths"]) == 8
    pareto = json.loads((workdir / "search" / "pareto.json").read_text())
    assert [u["width"] for u in pareto["uniform"]] == [1.0, 0.5]  # the global widths' baselines
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert set(metrics["uniform"]) == {"0.5"} and metrics["schedule"]["macs_ratio"] <= 0.7
    assert sorted(p.name for p in (workdir / "samples").glob("width_*.png")) == [
        "width_0.5.png", "width_1.0.png"]
    trained = (workdir / "metrics.jsonl").read_text()
    assert "loss_w1.0" in trained and "loss_w0.5" in trained
    assert any(f"loss_w{label}" in trained for label in ("0.5/1.0/1.0", "1.0/0.5/1.0",
               "1.0/1.0/0.5", "0.5/0.5/1.0", "0.5/1.0/0.5", "1.0/0.5/0.5"))
    exported = json.loads((workdir / "export" / "front.json").read_text())
    assert any(m["chosen"] for m in exported)


def test_the_adadiff_strategy_searches_exit_depths_and_exits_where_certain(tmp_path,
                                                                           digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    reports = run_all(workdir, *TINY, *SMALL_EVAL, *SMALL_SEARCH, "--config.strategy=adadiff",
                      "--config.adadiff.exit_depths=(1.0,0.5)",
                      "--config.adadiff.thresholds=(0.0,1.0)", "--config.search.macs_budget=0.9")
    assert [r["stage"] for r in reports] == ["grids", "search", "evaluate", "export"]
    schedule = json.loads((workdir / "search" / "schedule.json").read_text())
    assert schedule["widths"] == [1.0, 0.5]  # exit depths, searched per step as widths are
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    never, always = metrics["thresholds"]["0"], metrics["thresholds"]["1"]
    # Uncertainty is never 0: the whole network at every step. It is always at most 1: every
    # sample leaves at the first exit, a quarter of the decoder, cheaper than half of it.
    assert never["macs_ratio"] == 1.0 and never["exit_depth_mean"] == 1.0
    assert abs(never["fd"] - metrics["full"]["fd"]) < 1e-3 * metrics["full"]["fd"]
    assert always["exit_depth_mean"] == 0.25 and always["timed_macs_ratio"] == always["macs_ratio"]
    assert always["macs_ratio"] < metrics["uniform"]["0.5"]["macs_ratio"] < 1.0
    assert "loss_d0.5" in (workdir / "metrics.jsonl").read_text()
    # Every way of sampling it, timed side by side with the others in one process.
    timed = subprocess.run([sys.executable, "-m", "benchmarks.strategies", f"--workdirs={workdir}",
                            "--batch=4", "--rounds=1", "--thresholds=0.5"],
                           capture_output=True, text=True)
    assert timed.returncode == 0, timed.stderr[-2000:]
    rows = [json.loads(line) for line in timed.stdout.splitlines() if line.startswith("{")]
    assert [r["entry"] for r in rows] == ["full", "schedule", "threshold 0.5"]
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["macs_ratio"] <= 0.9


def test_the_continuous_unet_searches_solver_steps_per_sampling_step(tmp_path, digits_classifier):
    workdir = tmp_path / "run"
    digits_classifier(workdir)
    reports = run_all(workdir, *TINY, *SMALL_EVAL, *SMALL_SEARCH,
                      "--config.strategy=continuous_unet", "--config.search.macs_budget=0.6")
    assert [r["stage"] for r in reports] == ["grids", "search", "evaluate", "export"]
    schedule = json.loads((workdir / "search" / "schedule.json").read_text())
    assert schedule["widths"] == [1.0, 0.5]  # solver-step fractions: 2 or 1 RK4 steps a block
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    # Against the full U-Net: two RK4 steps of the half-width digits network cost less than it.
    one_step, two_steps = metrics["uniform"]["0.5"]["macs_ratio"], metrics["full"]["macs_ratio"]
    assert 0.3 < one_step < 0.55 * two_steps and two_steps < 1.0
    assert "loss_w0.5" in (workdir / "metrics.jsonl").read_text()
