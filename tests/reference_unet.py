"""An ordinary (non-slimmable) DDPM U-Net made of flax's own layers, for testing the slicing.

It is built at the *slimmed* channel counts of one width and filled with the leading slices of
the supernet's weights; the width-w supernet must then compute exactly what it computes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def paper_rounding(value: float, divisor: int) -> int:
    """Independent spelling of MobileNet's make_divisible, as the DDSM release uses it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _set(variable: nnx.Variable, value) -> None:
    variable[...] = jnp.asarray(value)


def _conv(slim, c_in: int, c_out: int, stride: int = 1) -> nnx.Conv:
    size = slim.kernel[...].shape[0]
    conv = nnx.Conv(c_in, c_out, (size, size), strides=(stride, stride),
                    padding=[(size // 2, size // 2)] * 2, rngs=nnx.Rngs(0))
    _set(conv.kernel, slim.kernel[...][:, :, :c_in, :c_out])
    _set(conv.bias, slim.bias[...][:c_out])
    return conv


def _linear(slim, c_in: int, c_out: int) -> nnx.Linear:
    linear = nnx.Linear(c_in, c_out, rngs=nnx.Rngs(0))
    _set(linear.kernel, slim.kernel[...][:c_in, :c_out])
    _set(linear.bias, slim.bias[...][:c_out])
    return linear


def _norm(slim, channels: int, groups: int) -> nnx.GroupNorm:
    norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, rngs=nnx.Rngs(0))
    _set(norm.scale, slim.scale[...][:channels])
    _set(norm.bias, slim.bias[...][:channels])
    return norm


class DenseUNet:
    """Mirrors the supernet's block list with dense layers at one width, or at a width per
    stage: `width=(encoder, middle, decoder)`, the time MLP counted with the encoder."""

    def __init__(self, slim, width, groups: int):
        encoder, middle, decoder = width if isinstance(width, tuple) else (width,) * 3
        ch = slim.ch
        tdim = paper_rounding(4 * ch * encoder, 16)
        self.ch = ch
        self.temb0 = _linear(slim.temb_dense0, ch, tdim)
        self.temb1 = _linear(slim.temb_dense1, tdim, tdim)
        self.head = _conv(slim.head, slim.image_channels, paper_rounding(ch * encoder, 8))
        now = paper_rounding(ch * encoder, 8)
        skips = [now]

        def res(block, c_in, width):
            c_out = paper_rounding(block.conv1.out_channels * width, 8)
            layers = {
                "norm1": _norm(block.norm1, c_in, groups), "conv1": _conv(block.conv1, c_in, c_out),
                "temb": _linear(block.temb_proj, tdim, c_out), "norm2": _norm(block.norm2, c_out, groups),
                "conv2": _conv(block.conv2, c_out, c_out),
                "short": _conv(block.shortcut, c_in, c_out) if block.shortcut is not None else None,
                "attn": None,
            }
            if block.attn is not None:
                c_qkv = paper_rounding(block.attn.q.out_channels * width, 1)
                layers["attn"] = {
                    "norm": _norm(block.attn.norm, c_out, groups),
                    "q": _conv(block.attn.q, c_out, c_qkv), "k": _conv(block.attn.k, c_out, c_qkv),
                    "v": _conv(block.attn.v, c_out, c_qkv), "proj": _conv(block.attn.proj, c_qkv, c_out),
                }
            return layers, c_out

        self.down = []
        for layer in slim.down:
            if hasattr(layer, "conv1"):
                layers, now = res(layer, now, encoder)
                self.down.append(("res", layers))
            else:
                self.down.append(("down", _conv(layer.conv, now, now, stride=2)))
            skips.append(now)
        self.mid = []
        for layer in slim.mid:
            layers, now = res(layer, now, middle)
            self.mid.append(layers)
        self.up = []
        for layer in slim.up:
            if hasattr(layer, "conv1"):
                layers, now = res(layer, now + skips.pop(), decoder)
                self.up.append(("res", layers))
            else:
                self.up.append(("up", _conv(layer.conv, now, now)))
        self.tail_norm = _norm(slim.tail_norm, now, groups)
        self.tail = _conv(slim.tail_conv, now, slim.image_channels)

    @staticmethod
    def _res(layers, x, temb):
        h = layers["conv1"](nnx.silu(layers["norm1"](x)))
        h = h + layers["temb"](nnx.silu(temb))[:, None, None, :]
        h = layers["conv2"](nnx.silu(layers["norm2"](h)))
        if layers["short"] is not None:
            h = h + layers["short"](x)
        else:  # the identity: channel i to channel i, between stages of different widths too
            common = min(x.shape[-1], h.shape[-1])
            h = h.at[..., :common].add(x[..., :common])
        if layers["attn"] is None:
            return h
        a = layers["attn"]
        n = a["norm"](h)
        q, k, v = a["q"](n), a["k"](n), a["v"](n)
        b, height, width, c = q.shape
        w = jnp.einsum("bhwc,bHWc->bhwHW", q, k).reshape(b, height, width, height * width) / math.sqrt(c)
        w = jax.nn.softmax(w, axis=-1).reshape(b, height, width, height, width)
        return h + a["proj"](jnp.einsum("bhwHW,bHWc->bhwc", w, v))

    def encode(self, x, t):
        """(middle output, time embedding, skips)."""
        freqs = np.exp(-math.log(10000.0) * np.arange(0, self.ch, 2) / self.ch)
        angles = np.asarray(t, np.float64)[:, None] * freqs[None, :]
        emb = np.zeros((len(t), self.ch))
        emb[:, 0::2], emb[:, 1::2] = np.sin(angles), np.cos(angles)
        temb = self.temb1(nnx.silu(self.temb0(jnp.asarray(emb, jnp.float32))))
        h = self.head(x)
        skips = [h]
        for kind, layer in self.down:
            h = self._res(layer, h, temb) if kind == "res" else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = self._res(layer, h, temb)
        return h, temb, skips

    def __call__(self, x, t):
        h, temb, skips = self.encode(x, t)
        for kind, layer in self.up:
            if kind == "res":
                h = self._res(layer, jnp.concatenate([h, skips.pop()], axis=-1), temb)
            else:
                h = layer(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
        return self.tail(nnx.silu(self.tail_norm(h)))
