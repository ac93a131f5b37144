"""Test session set-up: 8 simulated CPU devices and a persistent compilation cache.

Both must happen before JAX is first imported.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # even where libtpu is installed (tests/test_aot.py)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("DDSM_JAX_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))

from ddsm_jax.utils.compilation_cache import enable_compilation_cache

enable_compilation_cache()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory):
    """The digits domain classifier, trained once per session; `install(workdir)` copies its
    cache into a workdir (local or gs://) so evaluation and search there read it instead of
    training."""
    from ddsm_jax.eval.classifier import domain_extractor
    from ddsm_jax.layout import Workdir
    from tests.helpers import tiny_config

    source = tmp_path_factory.mktemp("classifier")
    domain_extractor(tiny_config(), source, progress=False)

    def install(workdir) -> None:  # a local path or gs://
        target = Workdir(workdir).classifier
        if not target.exists():
            target.mkdir(parents=True, exist_ok=True)
            for cached in Workdir(source).classifier.iterdir():
                (target / cached.name).write_bytes(cached.read_bytes())

    return install
