"""gs:// workdirs, as on a TPU pod: every stage writes to Cloud Storage, never to the local disk.

The bucket is an in-memory Cloud Storage server (`tests/fake_gcs.py`) that gcsfs, tensorstore
(orbax) and google-cloud-storage (TensorBoard) all talk to over HTTP, as they would to the real
service; nothing is mocked inside the program. Without it, a gs:// workdir must fail at once with
one line and create nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from ddsm_jax import export
from ddsm_jax.main import run
from tests.fake_gcs import fake_gcs
from tests.helpers import tiny_config

BUCKET = "ddsm-test"
REPO = str(Path(__file__).resolve().parents[1])


def in_another_directory(env: dict[str, str]) -> dict[str, str]:
    """The environment for running this checkout's commands from another directory."""
    return {**env, "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs(BUCKET) as url:
        yield url


def cloud_config(num_steps: int):
    config = tiny_config(num_steps=num_steps, widths=(1.0, 0.5))  # few programs to compile
    config.sampling.num_steps = 4
    config.sampling.batch_size = 16
    config.search.generations = 1
    config.search.num_samples = 16
    config.search.validation_samples = 16
    config.eval.num_samples = 16
    config.eval.num_reference = 200
    config.export.num_samples = 8
    return config


def _files(root: epath.Path) -> set[str]:
    """Every object under `root`, relative to it (a listing, as `gsutil ls -r` gives)."""
    bucket_path = str(root).removeprefix("gs://")  # fsspec walks without the scheme
    return {os.path.relpath(os.path.join(str(directory).removeprefix("gs://"), name), bucket_path)
            for directory, _, names in root.walk() for name in names}


def test_a_gs_workdir_runs_every_stage_resumes_and_writes_nothing_locally(
        gcs, tmp_path, monkeypatch, digits_classifier):
    monkeypatch.chdir(tmp_path)  # where a wrongly local "gs:/..." directory would appear
    workdir = f"gs://{BUCKET}/runs/tiny"
    digits_classifier(workdir)
    run(cloud_config(num_steps=4), workdir, "all")
    root = epath.Path(workdir)
    files = _files(root)
    for name in ("config.json", "metrics.jsonl", "samples/widths.png", "search/state.json",
                 "search/schedule.json", "search/pareto.json", "search/history.jsonl",
                 "search/pareto.png", "eval/metrics.json", "eval/samples.png",
                 "export/ddsm_export.json", "export/front.json", "export/samples.npz",
                 "export/schedule.json"):
        assert name in files, name
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert any(f.startswith("checkpoints/4/state/") for f in files)
    # Orbax marks a finished checkpoint on an object store with a commit file, not a rename.
    assert "checkpoints/4/commit_success.txt" in files
    assert not any(".tmp" in f for f in files), "a temporary object was left behind"
    assert list(tmp_path.iterdir()) == []

    model = export.load(f"{workdir}/export")
    assert model.manifest["step"] == 4 and len(model.front) >= 2
    assert model.sample(2, budget=1.0).shape == (2, 8, 8, 1)

    # Resume from the gs:// checkpoint: four more steps, logged once each.
    run(cloud_config(num_steps=8), workdir, "train")
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert "checkpoints/8/commit_success.txt" in _files(root)
    assert list(tmp_path.iterdir()) == []

    # The budget sampler reads the export from, and writes the samples to, the bucket too.
    out = f"gs://{BUCKET}/samples/cheap.npz"
    done = subprocess.run([sys.executable, "-m", "ddsm_jax.sample", f"--export={workdir}/export",
                           "--budget=0.5", "--num_samples=3", f"--out={out}"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=in_another_directory(dict(os.environ)))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["macs_ratio"] <= 0.5 and report["out"] == out
    with epath.Path(out).open("rb") as handle, np.load(handle) as data:
        assert data["arr_0"].shape == (3, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert epath.Path(out.replace(".npz", ".png")).exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["unreachable server", "no network or no credentials"])
def test_a_gs_workdir_that_cannot_be_reached_fails_at_once_and_creates_nothing(tmp_path, where):
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS")}
    if where == "unreachable server":
        with __import__("socket").socket() as probe:  # a port that nothing listens on
            probe.bind(("127.0.0.1", 0))
            env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{probe.getsockname()[1]}"
    done = subprocess.run([sys.executable, "-m", "ddsm_jax.main", "--config=configs/digits.py:tiny",
                           f"--workdir=gs://{BUCKET}/nowhere", "--mode=all"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=in_another_directory(env), timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: gs://{BUCKET}/nowhere: "), lines[-1]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
