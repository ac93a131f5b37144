"""Every paper config builds, and its sharded train step traces and lowers on 8 devices.

Shape-only (`jax.eval_shape` and `.lower()`, no compilation), so paper-size networks are cheap
to check here; `tests/test_aot.py` compiles CIFAR-10 and CelebA for a TPU slice.
"""

import importlib

import jax
import jax.numpy as jnp
import pytest

from ddsm_jax.diffusion.schedules import diffusion_from_config
from ddsm_jax.models.network import abstract_network, param_count
from ddsm_jax.training.sandwich import sandwich_widths
from ddsm_jax.training.sharding import batch_sharding, make_mesh
from ddsm_jax.training.train_step import abstract_train_state, make_optimizer, make_train_step

PAPER_CONFIGS = {  # name: (parameters, image size)
    "cifar10": (35_746_307, 32),
    "celeba": (78_700_803, 64),
    "lsun_bedroom": (113_673_219, 256),
    "afhq": (78_700_803, 64),
    "imagenet64": (115_938_691, 64),
    "mnist": (None, 28),
    "digits": (None, 8),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_config_builds_and_its_sharded_train_step_lowers(name):
    config = importlib.import_module(f"ddsm_jax.configs.{name}").get_config()
    expected_params, image_size = PAPER_CONFIGS[name]
    network, params = abstract_network(config)
    if expected_params is not None:
        assert param_count(params) == expected_params
    assert network.image_shape == (image_size, image_size, config.data.channels)

    mesh = make_mesh(config.mesh)
    state_in, state_sharding = abstract_train_state(params, make_optimizer(config.training), mesh)
    data_sharding = batch_sharding(mesh)
    step = make_train_step(network, diffusion_from_config(config.diffusion), config.training,
                           state_sharding=state_sharding, batch_sharding=data_sharding)
    batch = jax.ShapeDtypeStruct((config.training.batch_size, *network.image_shape), jnp.float32,
                                 sharding=data_sharding)
    widths = sandwich_widths(network.widths, config.seed, 0)
    lowered = step.lower(state_in, batch, jax.random.key(0), widths)
    out_state, metrics = lowered.out_info
    assert out_state.params["head"]["kernel"].shape == params["head"]["kernel"].shape
    assert metrics["loss"].shape == ()
