"""`pip install .` gives a package and console scripts that work from any directory."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests.helpers.tiny_config as flags (the programs other tests compiled), trained for two steps.
TESTS_TINY = ["--config.training.num_steps=2", "--config.training.batch_size=16",
              "--config.training.warmup_steps=2", "--config.training.log_every=2",
              "--config.training.checkpoint_every=4", "--config.sampling.num_samples=8",
              "--config.sampling.batch_size=8"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """This checkout installed with pip into a prefix of its own (dependencies: this venv's)."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    shutil.copytree(REPO / "ddsm_jax", source / "ddsm_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    prefix = root / "prefix"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", f"--prefix={prefix}", str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix)}))
    # Only the installed copy is importable: no checkout on the path, run from elsewhere.
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return prefix, site, env, elsewhere


def test_the_package_installs_with_its_configs_and_the_release_schedule(installed):
    _, site, env, elsewhere = installed
    code = ("import ddsm_jax, json; from ddsm_jax.configs import DIRECTORY, resolve_config_path; "
            "print(json.dumps([ddsm_jax.__file__, resolve_config_path('configs/digits.py:tiny'), "
            "(DIRECTORY / 'release_cifar10_schedule.json').is_file()]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    module, config, schedule = json.loads(done.stdout)
    assert Path(module).is_relative_to(site)
    assert config == f"{site / 'ddsm_jax' / 'configs' / 'digits.py'}:tiny"
    assert schedule


def test_the_console_scripts_run_from_any_directory(installed, tmp_path):
    prefix, _, env, elsewhere = installed
    train = subprocess.run(
        [str(prefix / "bin" / "ddsm-jax"), "--config=configs/digits.py:tiny",
         f"--workdir={tmp_path / 'run'}", *TESTS_TINY],
        capture_output=True, text=True, cwd=elsewhere, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads(train.stdout.strip().splitlines()[-1])["step"] == 2
    sample = subprocess.run([str(prefix / "bin" / "ddsm-jax-sample"),
                             f"--export={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=elsewhere, env=env)
    assert sample.returncode == 1
    assert sample.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'run'} is not a "
                                                             f"ddsm_jax export")
    assert sorted(p.name for p in elsewhere.iterdir()) == []
