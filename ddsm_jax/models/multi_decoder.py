"""The multi-stage U-Net (Zhang, Lu et al., CVPR 2024, arXiv 2312.09181): one shared encoder,
one decoder per timestep stage.

The encoder (time MLP, input convolution, down path and middle: the parameters every noise level
needs) always runs at full width. Each stage has its own decoder with its own base channel count
`round(ch * ratio)`, fed the encoder's full-width skips, so a stage's cost is the encoder's plus
its decoder's. Ratios may exceed 1 (the paper's CIFAR-10 decoders are 1.5, 1 and 0.125 of the
encoder's 128 channels, low noise to high): a decoder is its own module, not a width of another.
Decoders are built from the slimmable layers, so a decoder can also run narrower (`width`), which
the search may use; a decoder trained only at full width is only meant to run at full width.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import ml_collections
from flax import nnx

from ddsm_jax.models.unet import (
    Array,
    build_decoder,
    build_encoder,
    compute_dtype,
    decode,
    dropout_keys,
    encode,
    res_block_call,
)


def decoder_channels(ch: int, ratio: float, num_groups: int) -> int:
    """A decoder's base channels; a clear error where GroupNorm could not divide them."""
    channels = round(ch * ratio)
    if ratio <= 0 or channels < num_groups or channels % num_groups:
        raise ValueError(f"a decoder ratio of {ratio} gives {channels} channels of the encoder's "
                         f"{ch}: a decoder needs a positive multiple of model.num_groups="
                         f"{num_groups}; choose multistage.decoder_ratios accordingly")
    return channels


class Encoder(nnx.Module):
    def __init__(self, **shape):
        skip_channels, self.channels, self.resolution = build_encoder(self, **shape)
        self.skip_channels = tuple(skip_channels)


class Decoder(nnx.Module):
    def __init__(self, **shape):
        build_decoder(self, **shape)


class MultiDecoderUNet(nnx.Module):
    """Epsilon from the shared encoder and the decoder of `stage` (static)."""

    def __init__(self, *, image_size: int, image_channels: int, ch: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int, attn_resolutions: tuple[int, ...], dropout: float,
                 num_groups: int, decoder_ratios: Sequence[float], dtype: str = "float32",
                 remat: bool = False, rngs: nnx.Rngs):
        if not decoder_ratios:
            raise ValueError("multistage.decoder_ratios is empty: give one ratio per stage")
        self.dtype = compute_dtype(dtype)
        self.remat = remat
        self.image_size = image_size
        self.image_channels = image_channels
        self.ch = ch
        shape = {"ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
                 "attn_resolutions": attn_resolutions, "dropout": dropout,
                 "num_groups": num_groups, "rngs": rngs}
        self.encoder = Encoder(image_size=image_size, image_channels=image_channels, ch=ch,
                               **shape)
        self.decoders = nnx.List([
            Decoder(skip_channels=self.encoder.skip_channels, in_channels=self.encoder.channels,
                    resolution=self.encoder.resolution, temb_channels=4 * ch,
                    image_channels=image_channels,
                    ch=decoder_channels(ch, ratio, num_groups), **shape)
            for ratio in decoder_ratios])

    def __call__(self, x: Array, t: Array, *, stage: int, width: float = 1.0,
                 dropout_rng: Array | None = None) -> Array:
        """`width` slims the stage's decoder only; the encoder always runs in full."""
        chex.assert_shape(x, (None, self.image_size, self.image_size, self.image_channels))
        chex.assert_shape(t, (x.shape[0],))
        if not 0 <= stage < len(self.decoders):
            raise ValueError(f"stage {stage} of a network with {len(self.decoders)} decoders")
        decoder = self.decoders[stage]
        rngs = dropout_keys(dropout_rng, len(self.encoder.down) + len(self.encoder.mid)
                            + len(decoder.up))
        res_block = res_block_call(self.remat)
        h, temb, skips = encode(self.encoder, x, t, 1.0, rngs, res_block, self.ch, self.dtype)
        out = decode(decoder, h, temb, skips, width, rngs, res_block)
        chex.assert_equal_shape([out, x])
        return out



def build_multi_decoder_unet(config: ml_collections.ConfigDict,
                             rngs: nnx.Rngs) -> MultiDecoderUNet:
    """The network of a full config (model, data and multistage sections)."""
    model = config.model
    return MultiDecoderUNet(
        image_size=config.data.image_size, image_channels=config.data.channels, ch=model.ch,
        ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
        attn_resolutions=tuple(model.attn_resolutions), dropout=model.dropout,
        num_groups=model.num_groups, decoder_ratios=tuple(config.multistage.decoder_ratios),
        dtype=model.dtype, remat=model.remat, rngs=rngs)
