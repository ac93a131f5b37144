"""Schedule files, and the export artifact: it loads without training code and samples the same."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ddsm_jax import export
from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import init_network
from ddsm_jax.sampling import ScheduleSampler, initial_noise, sample_in_batches
from ddsm_jax.width_schedule import (
    ScheduleError,
    WidthSchedule,
    find_schedule,
    load_schedule,
    schedule_from_json,
)
from tests.helpers import tiny_config

RELEASE_SCHEDULE = Path(__file__).resolve().parents[2] / "shared" / "data" / "release_cifar10_schedule.json"


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
