"""Schedule files, and the export artifact: it loads without training code and samples the same."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ddsm_jax import configs, export
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches
from ddsm_jax.utils.images import to_uint8
from ddsm_jax.width_schedule import (
    ScheduleError,
    WidthSchedule,
    find_schedule,
    load_schedule,
    schedule_from_json,
)
from tests.helpers import tiny_config

RELEASE_SCHEDULE = configs.DIRECTORY / "release_cifar10_schedule.json"  # the release's searched widths


@pytest.fixture(scope="module")
def trained():
    config = tiny_config()
    network, params = init_network(config, jax.random.key(0))
    sampler = ScheduleSampler(network, diffusion_from_config(config.diffusion), config.sampling)
    return config, network, params, sampler


def test_schedule_file_round_trip_and_checks(tmp_path, trained):
    _, network, _, sampler = trained
    schedule = sampler.to_width_schedule([0] * 4 + [2] * 6, fd=1.5, macs_ratio=0.4)
    path = schedule.save(tmp_path / "search" / "schedule.json")
    data = json.loads(path.read_text())
    assert data["sampler"] == "ddim" and data["num_steps"] == 10 and data["fd"] == 1.5
    assert data["timesteps"] == [int(t) for t in sampler.timesteps]
    loaded = load_schedule(path)
    assert loaded == schedule
    np.testing.assert_array_equal(sampler.to_indices(loaded), [0] * 4 + [2] * 6)
    # DIR/search/schedule.json is found by default; nothing there means no schedule.
    kwargs = {"widths": network.widths, "sampler": "ddim", "timesteps": sampler.timesteps}
    assert find_schedule(None, tmp_path, **kwargs) == schedule
    assert find_schedule(None, tmp_path / "elsewhere", **kwargs) is None
    with pytest.raises(FileNotFoundError):
        find_schedule(str(tmp_path / "missing.json"), tmp_path, **kwargs)
    # Another sampler or step count is refused with the settings to change.
    with pytest.raises(ScheduleError, match="sampling.method/num_steps"):
        find_schedule(None, tmp_path, widths=network.widths, sampler="ddpm",
                      timesteps=range(999, -1, -1))
    with pytest.raises(ScheduleError, match="does not have"):
        loaded.indices_for((1.0, 0.5), "ddim", sampler.timesteps)
    with pytest.raises(ScheduleError, match="one width index per sampling step"):
        WidthSchedule((1.0,), (0, 0), (1,), "ddim")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ScheduleError, match="not a JSON schedule"):
        load_schedule(tmp_path / "broken.json")


def test_release_schedule_file_becomes_indices_in_sampling_order():
    data = json.loads(RELEASE_SCHEDULE.read_text())
    timesteps = list(range(999, -1, -1))
    schedule = schedule_from_json(data, widths=(1.0, 0.75, 0.5, 0.25), sampler="ddpm",
                                  timesteps=timesteps)
    per_t = np.asarray(data["widths_per_timestep"])
    np.testing.assert_array_equal(schedule.width_per_step, per_t[::-1])
    counts = np.bincount(schedule.schedule, minlength=4)
    assert counts.tolist() == [274, 181, 534, 11]  # DESIGN.md: the release's counts


def test_export_loads_and_samples_exactly_like_the_trained_model(tmp_path, trained):
    config, network, params, sampler = trained
    schedule = sampler.to_width_schedule([0] * 5 + [3] * 5)
    path = export.export_run(config, tmp_path / "export", network,
                             diffusion_from_config(config.diffusion), params, schedule, step=7,
                             progress=False)
    with np.load(path / "samples.npz") as data:
        samples = data["arr_0"]
    assert samples.dtype == np.uint8
    assert samples.shape == (config.export.num_samples, 8, 8, 1)
    model = export.load(path)
    assert model.manifest["step"] == 7 and model.schedule == schedule
    leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(model.params))
    assert all(np.array_equal(a, b) for a, b in leaves)
    # The loaded model draws the same images as the in-memory sampler, schedule included.
    key = jax.random.key(3)
    noise = initial_noise(jax.random.fold_in(key, 0), 4, network.image_shape)
    direct = sample_in_batches(sampler, params, [0] * 5 + [3] * 5, noise,
                               jax.random.fold_in(key, 1), config.sampling.batch_size)
    np.testing.assert_array_equal(model.sample(4, seed=3), direct)
    full = model.sample(4, seed=3, schedule="full")
    assert not np.array_equal(full, direct)


def test_export_is_standalone_from_training_data_and_search_code(tmp_path, trained):
    config, _, params, _ = trained
    path = export.save(tmp_path / "export", config, params)
    code = (f"import sys; from ddsm_jax import export; m = export.load({str(path)!r}); "
            f"x = m.sample(2); "
            f"bad = [n for n in sys.modules if n.startswith(('ddsm_jax.training', "
            f"'ddsm_jax.data', 'ddsm_jax.eval', 'ddsm_jax.search', 'grain', 'tensorflow_datasets'))]; "
            f"assert not bad, bad; print(x.shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1],
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(2, 8, 8, 1)" in done.stdout


def test_export_replaces_atomically_and_refuses_foreign_folders(tmp_path, trained):
    config, _, params, _ = trained
    path = export.save(tmp_path / "export", config, params, step=1)
    export.save(tmp_path / "export", config, params, step=2)
    assert export.load(path).manifest["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left over
    with pytest.raises(export.ExportError, match="not a ddsm_jax export"):
        export.load(tmp_path)
    wrong = tiny_config()
    wrong.model.ch = 16
    with pytest.raises(export.ExportError, match="tree and shapes"):
        export.save(tmp_path / "other", wrong, params)
    manifest = json.loads((path / "ddsm_export.json").read_text())
    (path / "ddsm_export.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(export.ExportError, match="version 99"):
        export.load(path)


def _member(macs_ratio, fd=None, seconds_ratio=None, chosen=False):
    return export.FrontMember((0,), macs_ratio, fd, seconds_ratio, chosen)


def test_the_budget_picks_the_best_validated_schedule_it_affords():
    front = [_member(0.067, 11.0, 0.2), _member(0.31, 7.0, 0.4), _member(0.42, 6.1, 0.5),
             _member(0.49, 6.0, 0.55, chosen=True), _member(0.57, 7.4, 0.7), _member(1.0, 6.4, 1.0)]
    assert export.choose(front).macs_ratio == 0.49  # no budget: the search's choice
    assert export.choose(front, budget=0.45).macs_ratio == 0.42
    assert export.choose(front, budget=0.3999).macs_ratio == 0.31
    assert export.choose(front, budget=1.0).macs_ratio == 0.49  # cheaper and better than full
    assert export.choose(front, seconds_budget=0.45).macs_ratio == 0.31
    assert export.choose(front, budget=0.45, seconds_budget=0.45).macs_ratio == 0.31
    with pytest.raises(export.ExportError, match="the cheapest costs 0.067: ask for at least"):
        export.choose(front, budget=0.05)
    # Without validated FDs (a converted release), the most compute within the budget.
    unvalidated = [_member(0.51), _member(1.0)]
    assert export.choose(unvalidated, budget=0.6).macs_ratio == 0.51
    assert export.choose(unvalidated, budget=2.0).macs_ratio == 1.0
    with pytest.raises(export.ExportError, match="no measured sampling times"):
        export.choose(unvalidated, seconds_budget=0.9)


def test_sample_command_draws_with_the_schedule_the_budget_buys(tmp_path, trained):
    config, network, params, sampler = trained
    schedule = sampler.to_width_schedule([0] * 4 + [2] * 6, fd=5.0, full_fd=6.0)
    validated = [{"schedule": [3] * 10, "fd": 9.0}, {"schedule": [0] * 2 + [3] * 8, "fd": 7.0},
                 {"schedule": [0] * 10, "fd": 6.0}]
    front = export.build_front(config, network, params, sampler, schedule, validated)
    assert [m.fd for m in front] == [9.0, 7.0, 5.0, 6.0]  # by MACs: 0.25, two steps full, ...
    path = export.save(tmp_path / "export", config, params, schedule, front=front)
    cheap = front[1]

    def sample(*flags):
        return subprocess.run([sys.executable, "-m", "ddsm_jax.sample", f"--export={path}",
                               "--num_samples=3", *flags], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])

    out = tmp_path / "cheap.npz"
    done = sample(f"--budget={cheap.macs_ratio + 0.01:.4f}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["macs_ratio"] == cheap.macs_ratio and report["fd"] == 7.0
    assert report["widths"] == [1.0] * 2 + [0.25] * 8
    with np.load(out) as data:
        images = data["arr_0"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    assert (tmp_path / "cheap.png").is_file()
    # The same draw from Python: the same schedule, the same seed, the same pixels.
    model = export.load(path)
    np.testing.assert_array_equal(to_uint8(model.sample(3, budget=cheap.macs_ratio + 0.01)),
                                  images)
    # Too small a budget: one line naming the cheapest schedule, and no file.
    refused = sample("--budget=0.01", f"--out={tmp_path / 'none.npz'}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: no schedule in {path} samples at 0.01 of full width's MACs; the cheapest costs "
        f"{front[0].macs_ratio:.3f}: ask for at least that")
    assert not (tmp_path / "none.npz").exists()


def test_an_export_of_the_release_schedule_offers_it_and_full_width(tmp_path, trained):
    config, _, params, _ = trained
    config = copy.deepcopy(config)
    config.sampling.method = "ddpm"  # the release's schedule gives a width per DDPM timestep
    config.sampling.num_steps = 1000
    path = export.save(tmp_path / "export", config, params,
                       schedule=json.loads(RELEASE_SCHEDULE.read_text()))
    model = export.load(path)
    assert [round(m.macs_ratio, 2) for m in model.front] == [0.51, 1.0]
    assert all(m.fd is None and m.seconds_ratio is None for m in model.front)
    assert model.choose(budget=0.6).chosen and not model.choose(budget=1.0).chosen
    with pytest.raises(export.ExportError,
                       match=f"the cheapest costs {model.front[0].macs_ratio:.3f}"):
        model.choose(budget=0.4)
