"""Strategies on the same footing: evaluations that share their noise, and the compare table."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddsm_jax import compare
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.eval.evaluate import evaluate
from ddsm_jax.models.network import init_network
from ddsm_jax.utils.files import write_text_atomically
from tests.test_evaluate import eval_config


def as_one_stage(unet_params: dict) -> dict:
    """The single U-Net's weights as a one-stage multi-decoder U-Net's: the same network."""
    encoder = {k: unet_params[k] for k in ("temb_dense0", "temb_dense1", "head", "down", "mid")}
    decoder = {k: unet_params[k] for k in ("up", "tail_norm", "tail_conv")}
    return {"encoder": encoder, "decoders": {0: decoder}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, digits_classifier):
    """A DDSM workdir and a multi-stage one holding the same network, both evaluated."""
    config = eval_config()
    network, params = init_network(config, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # no zero-initialised output
    diffusion = diffusion_from_config(config.diffusion)
    one_stage = eval_config()
    one_stage.strategy = "multistage"
    one_stage.multistage.decoder_ratios = (1.0,)
    one_stage.multistage.boundaries = ()
    staged_network, staged_params = init_network(one_stage, jax.random.key(1))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
                           staged_params, as_one_stage(params))
    workdirs = []
    for name, cfg, net, weights in [("ddsm", config, network, params),
                                    ("multistage", one_stage, staged_network,
                                     as_one_stage(params))]:
        workdir = tmp_path_factory.mktemp(name)
        digits_classifier(workdir)
        evaluate(cfg, workdir, net, diffusion, weights, progress=False)
        write_text_atomically(workdir / "config.json", cfg.to_json_best_effort())
        workdirs.append(workdir)
    return workdirs


def test_two_strategies_score_the_same_network_identically(evaluated):
    ddsm, staged = (json.loads((w / "eval" / "metrics.json").read_text()) for w in evaluated)
    assert staged["strategy"] == "multistage" and ddsm["strategy"] == "ddsm"
    for key in ("fd", "kid", "macs_mean", "macs_ratio"):
        assert staged["full"][key] == ddsm["full"][key], key
    assert staged["training"]["macs"] < ddsm["training"]["macs"]  # one network, not a sandwich
    # The baseline runs each network's own full rule with fewer steps: here the same network.
    assert staged["fewer_steps_of"] == "stages" and ddsm["fewer_steps_of"] == "full"
    assert sorted(staged["fewer_steps"]) == sorted(ddsm["fewer_steps"]) == ["2", "3", "4"]
    for steps, entry in ddsm["fewer_steps"].items():
        for key in ("fd", "kid", "macs_ratio"):
            assert staged["fewer_steps"][steps][key] == entry[key], (steps, key)


def test_compare_writes_the_table_json_and_picture(evaluated, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ddsm_jax.compare",
                           f"--workdirs={evaluated[0]},{evaluated[1]}", f"--out={tmp_path}",
                           "--budget=0.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {r["strategy"] for r in rows} == {"ddsm", "multistage"}
    assert [r["entry"] for r in rows if r["strategy"] == "multistage"] == [
        "stages", "stages, 2 steps", "stages, 3 steps", "stages, 4 steps"]
    assert any(r["entry"] == "full, 3 steps" for r in rows)
    table, at_budget = (tmp_path / "compare.md").read_text().split("\nEach workdir's best")
    assert table.count("\n") == len(rows) + 2 and "| multistage | stages |" in table
    # At half the MACs: each workdir's best entry that cheap, the better workdir first.
    best = compare.within_budget(rows, 0.5)
    assert {r["workdir"] for r in best} == {str(w) for w in evaluated}
    for row in best:
        cheap = [r["fd"] for r in rows if r["workdir"] == row["workdir"] and r["macs_ratio"] <= 0.5]
        assert row["macs_ratio"] <= 0.5 and row["fd"] == min(cheap) < max(cheap)
    assert best[0]["fd"] <= best[1]["fd"]
    assert at_budget.count("\n| ") == 2 + 2  # header, rule, a row per workdir
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_refuses_evaluations_on_different_footing(evaluated, tmp_path):
    other = tmp_path / "other"
    (other / "eval").mkdir(parents=True)
    metrics = json.loads((evaluated[1] / "eval" / "metrics.json").read_text())
    metrics["seed"] = 7
    (other / "eval" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(compare.CompareError, match="seed .* 7 but .* 0"):
        compare.compare([str(evaluated[0]), str(other)], tmp_path / "out")
    with pytest.raises(compare.CompareError, match="no evaluation"):
        compare.compare([str(evaluated[0]), str(tmp_path / "nowhere")], tmp_path / "out")


def test_entries_name_each_strategys_rows():
    point = {"fd": 1.0, "macs_ratio": 0.5}
    evaluation = {"workdir": "w", "strategy": "adadiff", "full": point,
                  "uniform": {"0.5": point}, "thresholds": {"0.1": point},
                  "fewer_steps": {"10": point}, "fewer_steps_of": "full"}
    assert [r["entry"] for r in compare.entries(evaluation)] == [
        "full", "uniform 0.5", "threshold 0.1", "full, 10 steps"]
    evaluation.update(strategy="multistage", fewer_steps_of="stages", thresholds={})
    assert [r["entry"] for r in compare.entries(evaluation)] == [
        "stages", "uniform 0.5", "stages, 10 steps"]
