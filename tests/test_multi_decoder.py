"""The multi-stage strategy's U-Net: each stage is the shared encoder plus its own decoder."""

from __future__ import annotations

import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ddsm_jax.configs import digits
from ddsm_jax.models.cost import width_macs
from ddsm_jax.models.multi_decoder import build_multi_decoder_unet, decoder_channels
from ddsm_jax.models.network import abstract_network, init_network, param_count
from tests.helpers import tiny_config
from tests.reference_unet import DenseUNet


def multistage_config(ratios=(1.5, 1.0, 0.25)):
    config = tiny_config()
    config.strategy = "multistage"
    config.multistage.decoder_ratios = ratios
    return config


def randomised(module: nnx.Module, seed: int) -> nnx.Module:
    """Random weights everywhere (no zero-initialised output layer), so every layer matters."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def one_stage_view(model, stage: int) -> types.SimpleNamespace:
    """The encoder and one decoder, laid out as one U-Net for the dense reference to copy."""
    encoder, decoder = model.encoder, model.decoders[stage]
    return types.SimpleNamespace(
        ch=model.ch, image_channels=model.image_channels, temb_dense0=encoder.temb_dense0,
        temb_dense1=encoder.temb_dense1, head=encoder.head, down=encoder.down, mid=encoder.mid,
        up=decoder.up, tail_norm=decoder.tail_norm, tail_conv=decoder.tail_conv)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_each_stage_equals_a_dense_unet_of_the_encoder_and_its_decoder(stage):
    model = randomised(build_multi_decoder_unet(multistage_config(), nnx.Rngs(3)), seed=7)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t = np.array([0, 170, 999])
    ours = nnx.jit(lambda m, x: m(x, jnp.asarray(t), stage=stage))(model, x)
    dense = DenseUNet(one_stage_view(model, stage), 1.0, groups=4)
    np.testing.assert_allclose(ours, jax.jit(lambda x: dense(x, t))(x), rtol=2e-4, atol=2e-5)
    others = [nnx.jit(lambda m, x, s=s: m(x, jnp.asarray(t), stage=s))(model, x)
              for s in range(3) if s != stage]
    assert not any(np.allclose(ours, other) for other in others)


def test_decoders_have_their_own_channels_and_the_encoder_is_shared():
    network, params = init_network(multistage_config(), jax.random.key(0))
    assert network.num_stages == 3 and set(params) == {"encoder", "decoders"}
    first_up = [params["decoders"][s]["up"][0]["conv1"]["kernel"].shape for s in range(3)]
    # Input: the decoder's own input (the middle's 64 channels) and the encoder's 64-channel skip.
    assert first_up == [(3, 3, 128, 96), (3, 3, 128, 64), (3, 3, 128, 16)]
    one_unet = param_count(abstract_network(tiny_config())[1])
    encoder = param_count(params["encoder"])
    assert encoder < one_unet < encoder + param_count(params["decoders"][0])


def test_stage_macs_agree_with_xla_and_grow_with_the_decoder():
    network, params = abstract_network(multistage_config())
    x = jax.ShapeDtypeStruct((2, *network.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    totals = []
    for stage in range(network.num_stages):
        counter = width_macs(network, params, 1.0, stage=stage)
        lowered = jax.jit(partial(network.apply, width=1.0, stage=stage)).lower(params, x, t)
        xla_flops = lowered.cost_analysis()["flops"]
        ours = 2 * 2 * (counter.total - counter.conv_padding)  # 2 images, 2 FLOPs per MAC
        assert abs(ours - xla_flops) / xla_flops < 0.005, (stage, ours, xla_flops)
        totals.append(counter.total)
    assert totals[0] > totals[1] > totals[2]
    unet_network, unet_params = abstract_network(tiny_config())
    # Decoder ratio 1: the same network as one U-Net, so the same MACs.
    assert totals[1] == width_macs(unet_network, unet_params, 1.0).total


@pytest.mark.parametrize("ratio,fragment", [(0.1, "3 channels"), (0.3, "10 channels"),
                                            (0.0, "0 channels")])
def test_a_decoder_groupnorm_cannot_divide_is_a_clear_error(ratio, fragment):
    with pytest.raises(ValueError, match=f"{fragment}.*multistage.decoder_ratios"):
        decoder_channels(32, ratio, 4)


def test_the_digits_config_runs_the_multistage_network():
    config = digits.get_config()
    config.strategy = "multistage"
    network, _ = abstract_network(config)
    assert network.num_stages == len(config.multistage.decoder_ratios) == 3
    with pytest.raises(ValueError, match="config.strategy='nope'"):
        config.strategy = "nope"
        abstract_network(config)
