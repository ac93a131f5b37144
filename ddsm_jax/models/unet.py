"""The slimmable DDPM U-Net of DDSM: one set of weights, any width in (0, 1] at call time.

`width` is a static Python float: each width is its own traced (and compiled) program.
`dtype` is the compute dtype (bfloat16 on accelerators): parameters stay float32, each layer
casts its slice of them, normalisation and softmax statistics run in float32, and epsilon comes
out in float32. `remat` recomputes each residual block in the backward pass instead of storing
its activations, for configs whose activations do not fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ddsm_jax.models import macs
from ddsm_jax.models.slimmable import SlimConv, SlimGroupNorm, SlimLinear, silu, slim_channels
from ddsm_jax.models.stage_widths import Width, stage_profile

Array = jax.Array

CONV_DIVISOR = 8
TIME_DIVISOR = 16
QKV_DIVISOR = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype={name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding with interleaved sin/cos pairs, the layout of the DDPM port."""
    if dim % 2:
        raise ValueError(f"model.ch must be even for the sinusoidal embedding, got {dim}")
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(t.shape[0], dim)


def _dropout(x: Array, rate: float, rng: Array | None) -> Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class AttnBlock(nnx.Module):
    """Self-attention over pixels; q/k/v slim to round(C*w), scaled by 1/sqrt of that width."""

    def __init__(self, channels: int, num_groups: int, *, rngs: nnx.Rngs):
        self.norm = SlimGroupNorm(channels, num_groups)
        self.q = SlimConv(channels, channels, 1, divisor=QKV_DIVISOR, rngs=rngs)
        self.k = SlimConv(channels, channels, 1, divisor=QKV_DIVISOR, rngs=rngs)
        self.v = SlimConv(channels, channels, 1, divisor=QKV_DIVISOR, rngs=rngs)
        self.proj = SlimConv(channels, channels, 1, divisor=CONV_DIVISOR, init_scale=1e-5, rngs=rngs)

    def __call__(self, x: Array, width: float) -> Array:
        batch, height, width_px, _ = x.shape
        h = self.norm(x)
        q, k, v = self.q(h, width), self.k(h, width), self.v(h, width)
        c_qkv = q.shape[-1]
        pixels = height * width_px
        q, k, v = (a.reshape(batch, pixels, c_qkv) for a in (q, k, v))
        logits = jnp.einsum("bic,bjc->bij", q, k) * (c_qkv**-0.5)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(batch, height, width_px, c_qkv)
        macs.record("attention", 2 * batch * pixels * pixels * c_qkv)
        macs.record_elementwise("elementwise", logits.size, 6)  # scale, max, subtract, exp, sum, divide
        out = self.proj(out, width)
        if out.shape != x.shape:
            raise ValueError(f"attention output {out.shape} does not match its input {x.shape}")
        return x + out


def _match_channels(x: Array, like: Array) -> Array:
    """The identity shortcut between stages of different widths (`models.stage_widths`): a
    slimmed layer's channels are the leading ones, so channel i stays channel i; dropped where
    the block is narrower than its input, zero where it is wider."""
    channels = like.shape[-1]
    if x.shape[-1] >= channels:
        return x[..., :channels]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, channels - x.shape[-1])])


class ResBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, dropout: float,
                 attention: bool, num_groups: int, rngs: nnx.Rngs):
        self.norm1 = SlimGroupNorm(in_channels, num_groups)
        self.conv1 = SlimConv(in_channels, out_channels, 3, rngs=rngs)
        self.temb_proj = SlimLinear(temb_channels, out_channels, divisor=CONV_DIVISOR, rngs=rngs)
        self.norm2 = SlimGroupNorm(out_channels, num_groups)
        self.conv2 = SlimConv(out_channels, out_channels, 3, init_scale=1e-5, rngs=rngs)
        self.shortcut = (SlimConv(in_channels, out_channels, 1, rngs=rngs)
                         if in_channels != out_channels else None)
        self.attn = AttnBlock(out_channels, num_groups, rngs=rngs) if attention else None
        self.dropout = dropout

    def __call__(self, x: Array, temb: Array, width: float, rng: Array | None) -> Array:
        h = self.conv1(silu(self.norm1(x)), width)
        h = h + self.temb_proj(silu(temb), width)[:, None, None, :]
        h = _dropout(silu(self.norm2(h)), self.dropout, rng)
        h = self.conv2(h, width)
        skip = self.shortcut(x, width) if self.shortcut is not None else _match_channels(x, h)
        macs.record_elementwise("elementwise", h.size, 2)  # temb add, residual add
        h = h + skip
        return self.attn(h, width) if self.attn is not None else h


class Downsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = SlimConv(channels, channels, 3, stride=2, rngs=rngs)

    def __call__(self, x: Array, width: float) -> Array:
        return self.conv(x, width)


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = SlimConv(channels, channels, 3, rngs=rngs)

    def __call__(self, x: Array, width: float) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x, width)


def build_encoder(module: nnx.Module, *, image_size: int, image_channels: int, ch: int,
                  ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                  dropout: float, num_groups: int, rngs: nnx.Rngs) -> tuple[list[int], int, int]:
    """Gives `module` the U-Net's encoder (time MLP, input conv, down path, middle) as the
    attributes `temb_dense0`, `temb_dense1`, `head`, `down`, `mid`: the parameter names of the
    DDPM port. Returns the skip channels, the middle's channels and its resolution."""
    temb_channels = 4 * ch
    module.temb_dense0 = SlimLinear(ch, temb_channels, divisor=TIME_DIVISOR, rngs=rngs)
    module.temb_dense1 = SlimLinear(temb_channels, temb_channels, divisor=TIME_DIVISOR, rngs=rngs)
    module.head = SlimConv(image_channels, ch, 3, rngs=rngs)
    down, skip_channels, now, resolution = [], [ch], ch, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            down.append(ResBlock(now, ch * mult, temb_channels, dropout=dropout,
                                 attention=resolution in attn_resolutions, num_groups=num_groups,
                                 rngs=rngs))
            now = ch * mult
            skip_channels.append(now)
        if level != len(ch_mult) - 1:
            down.append(Downsample(now, rngs=rngs))
            skip_channels.append(now)
            resolution //= 2
    module.down = nnx.List(down)
    module.mid = nnx.List([
        ResBlock(now, now, temb_channels, dropout=dropout, attention=True, num_groups=num_groups,
                 rngs=rngs),
        ResBlock(now, now, temb_channels, dropout=dropout, attention=False,
                 num_groups=num_groups, rngs=rngs),
    ])
    return skip_channels, now, resolution


def build_decoder(module: nnx.Module, *, skip_channels: list[int], in_channels: int,
                  resolution: int, temb_channels: int, image_channels: int, ch: int,
                  ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                  dropout: float, num_groups: int, rngs: nnx.Rngs) -> None:
    """Gives `module` the U-Net's decoder (up path and output layers) as the attributes `up`,
    `tail_norm`, `tail_conv`, with `ch` base channels: the encoder's (one U-Net) or its own
    (a decoder of the multi-decoder U-Net, fed the encoder's skips)."""
    skip_channels, up, now = list(skip_channels), [], in_channels
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            up.append(ResBlock(skip_channels.pop() + now, ch * mult, temb_channels,
                               dropout=dropout, attention=resolution in attn_resolutions,
                               num_groups=num_groups, rngs=rngs))
            now = ch * mult
        if level != 0:
            up.append(Upsample(now, rngs=rngs))
            resolution *= 2
    module.up = nnx.List(up)
    module.tail_norm = SlimGroupNorm(now, num_groups)
    module.tail_conv = SlimConv(now, image_channels, 3, fixed_out=True, init_scale=1e-5,
                                rngs=rngs)


def res_block_call(remat: bool) -> Callable:
    """`ResBlock.__call__`, recomputed in the backward pass when `remat`."""
    return nnx.remat(ResBlock.__call__, static_argnums=3) if remat else ResBlock.__call__


def encode(module: nnx.Module, x: Array, t: Array, width: float, rngs: Iterator[Array],
           res_block: Callable, ch: int, dtype: jnp.dtype,
           mid_width: float | None = None) -> tuple[Array, Array, list[Array]]:
    """The encoder `build_encoder` gave `module`: (middle output, time embedding, skips); the
    middle blocks at `mid_width` (default: `width`)."""
    temb = module.temb_dense0(timestep_embedding(t, ch).astype(dtype), width)
    temb = module.temb_dense1(silu(temb), width)
    h = module.head(x.astype(dtype), width)
    skips = [h]
    for layer in module.down:
        h = (res_block(layer, h, temb, width, next(rngs, None)) if isinstance(layer, ResBlock)
             else layer(h, width))
        skips.append(h)
    for layer in module.mid:
        h = res_block(layer, h, temb, width if mid_width is None else mid_width, next(rngs, None))
    return h, temb, skips


def decode(module: nnx.Module, h: Array, temb: Array, skips: list[Array], width: float,
           rngs: Iterator[Array], res_block: Callable) -> Array:
    """The decoder `build_decoder` gave `module`, on the encoder's outputs: epsilon, float32."""
    skips = list(skips)
    for layer in module.up:
        if isinstance(layer, ResBlock):
            h = res_block(layer, jnp.concatenate([h, skips.pop()], axis=-1), temb, width,
                          next(rngs, None))
        else:
            h = layer(h, width)
    return module.tail_conv(silu(module.tail_norm(h)), width).astype(jnp.float32)


def dropout_keys(dropout_rng: Array | None, count: int) -> Iterator[Array]:
    """One dropout key per residual block, in call order; none for the deterministic network."""
    return iter(jax.random.split(dropout_rng, count) if dropout_rng is not None else [])


class SlimmableUNet(nnx.Module):
    """The DDPM U-Net (Ho et al.) with every layer slimmable, as DDSM's supernet."""

    def __init__(self, *, image_size: int, image_channels: int, ch: int, ch_mult: tuple[int, ...],
                 num_res_blocks: int, attn_resolutions: tuple[int, ...], dropout: float,
                 num_groups: int = 32, dtype: str = "float32", remat: bool = False,
                 rngs: nnx.Rngs):
        self.dtype = compute_dtype(dtype)
        self.remat = remat
        self.image_size = image_size
        self.image_channels = image_channels
        self.ch = ch
        shape = {"ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
                 "attn_resolutions": attn_resolutions, "dropout": dropout,
                 "num_groups": num_groups, "rngs": rngs}
        skip_channels, now, resolution = build_encoder(
            self, image_size=image_size, image_channels=image_channels, **shape)
        build_decoder(self, skip_channels=skip_channels, in_channels=now, resolution=resolution,
                      temb_channels=4 * ch, image_channels=image_channels, **shape)

    def __call__(self, x: Array, t: Array, *, width: Width = 1.0,
                 dropout_rng: Array | None = None) -> Array:
        """Predicts epsilon; `dropout_rng=None` is the deterministic (evaluation) network.
        `width`: one for every layer, or (encoder, middle, decoder) (`models.stage_widths`)."""
        chex.assert_shape(x, (None, self.image_size, self.image_size, self.image_channels))
        chex.assert_shape(t, (x.shape[0],))
        rngs = dropout_keys(dropout_rng, len(self.down) + len(self.mid) + len(self.up))
        res_block = res_block_call(self.remat)
        encoder, middle, decoder = stage_profile(width)
        h, temb, skips = encode(self, x, t, encoder, rngs, res_block, self.ch, self.dtype, middle)
        out = decode(self, h, temb, skips, decoder, rngs, res_block)
        chex.assert_equal_shape([out, x])
        return out


def build_unet(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
               module: type[SlimmableUNet] = SlimmableUNet) -> SlimmableUNet:
    """The network of a full config (model + data sections); `module`: the U-Net's class."""
    model = config.model
    for width in model.widths:
        slim_channels(model.ch, width, CONV_DIVISOR)  # validates the width
    return module(
        image_size=config.data.image_size, image_channels=config.data.channels, ch=model.ch,
        ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
        attn_resolutions=tuple(model.attn_resolutions), dropout=model.dropout,
        num_groups=model.num_groups, dtype=model.dtype, remat=model.remat, rngs=rngs)
