"""AdaDiff's network (Tang et al., arXiv 2309.17074): the U-Net with an exit head and an
uncertainty estimator after each decoder residual block but the last.

Where exits sit in a U-Net is not in the paper (its backbone is U-ViT). Ours: the encoder and
middle always run (every decoder block reads their skips), and exit k follows the decoder's k-th
residual block. Its head sees that block's output, upsampled (nearest) to the image's size and
joined with the input convolution's output (a skip the encoder computed anyway): a
low-resolution exit alone could not give back the pixel-level noise of a noisy step. Head:
GroupNorm, SiLU, 3x3 convolution to the image's channels. Its uncertainty estimator is the
paper's timestep-aware one, sigmoid(linear([pooled features, time embedding])).

A branch is an exit `depth`, the fraction of the decoder's residual blocks run (1.0: the whole
network), so the search and the samplers treat depths as DDSM treats widths.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ddsm_jax.models import macs
from ddsm_jax.models.slimmable import SlimConv, SlimGroupNorm, SlimLinear, silu
from ddsm_jax.models.unet import ResBlock, SlimmableUNet, build_unet, dropout_keys, encode, res_block_call

Array = jax.Array
FULL = 1.0  # every layer at full width: the exits are depths of the full network


def exit_blocks(depth: float, num_blocks: int) -> int:
    """The decoder residual blocks an exit at `depth` runs, in 1..num_blocks."""
    blocks = round(depth * num_blocks)
    if not 0.0 < depth <= 1.0 or not 1 <= blocks <= num_blocks:
        raise ValueError(f"exit depth {depth} of a decoder with {num_blocks} residual blocks: "
                         f"give fractions in (0, 1] of at least 1/{num_blocks}")
    return blocks


class ExitHead(nnx.Module):
    """Epsilon and its estimated uncertainty from one decoder block's output."""

    def __init__(self, channels: int, first_channels: int, temb_channels: int,
                 image_channels: int, num_groups: int, *, rngs: nnx.Rngs):
        self.norm = SlimGroupNorm(channels + first_channels, num_groups)
        self.conv = SlimConv(channels + first_channels, image_channels, 3, fixed_out=True,
                             init_scale=1e-5, rngs=rngs)  # as the network's own output layer
        self.uncertainty = SlimLinear(channels + temb_channels, 1, divisor=1, rngs=rngs)

    def __call__(self, h: Array, first: Array, temb: Array) -> tuple[Array, Array]:
        return self.eps(h, first), self.estimate(h, temb)

    def estimate(self, h: Array, temb: Array) -> Array:
        """The uncertainty of each image's exit here, in (0, 1)."""
        pooled = h.astype(jnp.float32).mean(axis=(1, 2))
        macs.record_elementwise("elementwise", h.size, 1)
        features = jnp.concatenate([pooled, silu(temb).astype(jnp.float32)], axis=-1)
        return jax.nn.sigmoid(self.uncertainty(features, FULL)[:, 0])

    def eps(self, h: Array, first: Array) -> Array:
        scale = first.shape[1] // h.shape[1]
        up = jnp.repeat(jnp.repeat(h, scale, axis=1), scale, axis=2)
        eps = self.conv(silu(self.norm(jnp.concatenate([up, first], axis=-1))), FULL)
        return eps.astype(jnp.float32)


class EarlyExitUNet(SlimmableUNet):
    """`depth` (static) exits after that fraction of the decoder's residual blocks;
    `all_exits=True` (training) returns every exit's epsilon, the last being the full
    network's, stacked (exits + 1, B, H, W, C), and their uncertainties (exits, B)."""

    def __init__(self, *, num_groups: int, rngs: nnx.Rngs, **unet):
        super().__init__(num_groups=num_groups, rngs=rngs, **unet)
        blocks = [layer for layer in self.up if isinstance(layer, ResBlock)]
        self.exits = nnx.List([
            ExitHead(block.conv2.out_channels, self.ch, 4 * self.ch, self.image_channels,
                     num_groups, rngs=rngs)
            for block in blocks[:-1]])

    @property
    def num_blocks(self) -> int:
        return len(self.exits) + 1

    def __call__(self, x: Array, t: Array, *, depth: float = 1.0, all_exits: bool = False,
                 threshold: Array | None = None,
                 dropout_rng: Array | None = None) -> Array | tuple[Array, Array]:
        """With `threshold` (sampling, traced): the batch leaves at the first exit where every
        image's uncertainty is at most it, through a chain of `lax.cond`s, so only the layers
        run take time; returns (epsilon, the exit's decoder blocks - 1)."""
        chex.assert_shape(x, (None, self.image_size, self.image_size, self.image_channels))
        chex.assert_shape(t, (x.shape[0],))
        stop = self.num_blocks if all_exits else exit_blocks(depth, self.num_blocks)
        rngs = dropout_keys(dropout_rng, len(self.down) + len(self.mid) + len(self.up))
        res_block = res_block_call(self.remat)
        h, temb, skips = encode(self, x, t, FULL, rngs, res_block, self.ch, self.dtype)
        first, skips = skips[0], list(skips)
        if threshold is not None:
            return self._exit_when_certain(h, temb, skips, first, threshold, res_block)
        outputs, uncertainties, done = [], [], 0
        for layer in self.up:
            if not isinstance(layer, ResBlock):
                h = layer(h, FULL)
                continue
            h = res_block(layer, jnp.concatenate([h, skips.pop()], axis=-1), temb, FULL,
                          next(rngs, None))
            done += 1
            if done < self.num_blocks and (all_exits or done == stop):
                eps, uncertainty = self.exits[done - 1](h, first, temb)
                if not all_exits:
                    return eps
                outputs.append(eps)
                uncertainties.append(uncertainty)
        out = self.tail_conv(silu(self.tail_norm(h)), FULL).astype(jnp.float32)
        chex.assert_equal_shape([out, x])
        if all_exits:
            return jnp.stack([*outputs, out]), jnp.stack(uncertainties)
        return out


    def _exit_when_certain(self, h: Array, temb: Array, skips: list[Array], first: Array,
                           threshold: Array, res_block) -> tuple[Array, Array]:
        def run_from(index: int, h: Array, skips: list[Array], done: int):
            for position in range(index, len(self.up)):
                layer = self.up[position]
                if not isinstance(layer, ResBlock):
                    h = layer(h, FULL)
                    continue
                h = res_block(layer, jnp.concatenate([h, skips.pop()], axis=-1), temb, FULL, None)
                done += 1
                if done < self.num_blocks:
                    head, rest = self.exits[done - 1], list(skips)
                    return jax.lax.cond(
                        head.estimate(h, temb).max() <= threshold,
                        lambda h=h, head=head, done=done: (head.eps(h, first), jnp.int32(done - 1)),
                        lambda h=h, rest=rest, position=position, done=done:
                            run_from(position + 1, h, rest, done))
            out = self.tail_conv(silu(self.tail_norm(h)), FULL).astype(jnp.float32)
            return out, jnp.int32(self.num_blocks - 1)

        return run_from(0, h, skips, 0)


def build_early_exit_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> EarlyExitUNet:
    model = build_unet(config, rngs, EarlyExitUNet)
    for depth in config.adadiff.exit_depths:
        exit_blocks(float(depth), model.num_blocks)
    return model
