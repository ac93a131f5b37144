"""An independent PyTorch spelling of the DDSM release's slimmable U-Net, for checkpoint tests.

Module names follow the release's `SlimmableUNet` (EnVision-Research/DDSM, slimmable_model.py),
so its `state_dict()` has the release's keys and shapes and `load_state_dict(strict=True)` takes
a release checkpoint. The forward pass follows the release's slicing rules at any width: every
layer keeps the leading `make_divisible(C * width, d)` output channels (d = 8 for convs, 16 for
every Linear, the time MLP's and the res blocks' `temb_proj` alike, 1 for q/k/v; the last conv
always 3) and the leading input channels of whatever comes in; GroupNorm keeps its group count
and its first c affine entries; attention scales by 1/sqrt(channels of its input). Width is an
argument here, where the release sets a `width_mult` attribute on every module.

`RELEASE_GROUPS` = 32 is the release; its `slimmable_model_g16.py` variant uses 16 (same keys).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

RELEASE_GROUPS = 32


def release_rounding(value: float, divisor: int) -> int:
    """The release's make_divisible with its default min_value=1 (ours floors at `divisor`)."""
    nearest = int(value + divisor / 2) // divisor * divisor
    nearest = max(1, nearest)
    return nearest + divisor if nearest < 0.9 * value else nearest


class LeadingConv(nn.Conv2d):
    def __init__(self, c_in: int, c_out: int, size: int, stride: int = 1, divisor: int = 8,
                 fixed_out: bool = False):
        super().__init__(c_in, c_out, size, stride=stride, padding=size // 2)
        self.divisor, self.fixed_out = divisor, fixed_out

    def run(self, x: torch.Tensor, width: float) -> torch.Tensor:
        full = self.weight.shape[0]
        keep = full if self.fixed_out else release_rounding(full * width, self.divisor)
        return F.conv2d(x, self.weight[:keep, :x.shape[1]], self.bias[:keep], self.stride,
                        self.padding)


class LeadingLinear(nn.Linear):
    def run(self, x: torch.Tensor, width: float) -> torch.Tensor:
        keep = release_rounding(self.weight.shape[0] * width, 16)
        return F.linear(x, self.weight[:keep, :x.shape[1]], self.bias[:keep])


class LeadingGroupNorm(nn.GroupNorm):
    def run(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return F.group_norm(x, self.num_groups, self.weight[:c], self.bias[:c], self.eps)


class Attention(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = LeadingGroupNorm(groups, channels)
        self.proj_q = LeadingConv(channels, channels, 1, divisor=1)
        self.proj_k = LeadingConv(channels, channels, 1, divisor=1)
        self.proj_v = LeadingConv(channels, channels, 1, divisor=1)
        self.proj = LeadingConv(channels, channels, 1)

    def run(self, x: torch.Tensor, width: float) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        normed = self.group_norm.run(x)
        q, k, v = (m.run(normed, width).flatten(2) for m in (self.proj_q, self.proj_k, self.proj_v))
        assert q.shape[1] == c, "the release reshapes q/k/v to the input's channel count"
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, hgt, wid)
        return x + self.proj.run(out, width)


class Block(nn.Module):
    """The release's ResBlock: block1 = [norm, swish, conv], temb_proj = [swish, linear],
    block2 = [norm, swish, dropout, conv]; Sequential indices give the state_dict names."""

    def __init__(self, c_in: int, c_out: int, tdim: int, groups: int, dropout: float, attn: bool):
        super().__init__()
        self.block1 = nn.ModuleList([LeadingGroupNorm(groups, c_in), nn.SiLU(),
                                     LeadingConv(c_in, c_out, 3)])
        self.temb_proj = nn.ModuleList([nn.SiLU(), LeadingLinear(tdim, c_out)])
        self.block2 = nn.ModuleList([LeadingGroupNorm(groups, c_out), nn.SiLU(),
                                     nn.Dropout(dropout), LeadingConv(c_out, c_out, 3)])
        self.shortcut = LeadingConv(c_in, c_out, 1) if c_in != c_out else None
        self.attn = Attention(c_out, groups) if attn else None

    def run(self, x: torch.Tensor, temb: torch.Tensor, width: float) -> torch.Tensor:
        h = self.block1[2].run(F.silu(self.block1[0].run(x)), width)
        h = h + self.temb_proj[1].run(F.silu(temb), width)[:, :, None, None]
        h = self.block2[2](F.silu(self.block2[0].run(h)))
        h = self.block2[3].run(h, width)
        h = h + (self.shortcut.run(x, width) if self.shortcut is not None else x)
        return self.attn.run(h, width) if self.attn is not None else h


class Resample(nn.Module):
    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.main = LeadingConv(channels, channels, 3, stride=2 if down else 1)

    def run(self, x: torch.Tensor, width: float) -> torch.Tensor:
        if not self.down:
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        return self.main.run(x, width)


def sinusoid_table(num_timesteps: int, dim: int) -> torch.Tensor:
    """Row t: (sin(t f_0), cos(t f_0), sin(t f_1), ...), f_i = 10000^(-2i/dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(num_timesteps).float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_timesteps, dim)


class ReleaseUNet(nn.Module):
    """`attn` holds level indices as the release's `--attn` flag does (1: the second level)."""

    def __init__(self, T: int = 1000, ch: int = 128, ch_mult=(1, 2, 2, 2), attn=(1,),
                 num_res_blocks: int = 2, dropout: float = 0.1, groups: int = RELEASE_GROUPS):
        super().__init__()
        tdim = 4 * ch
        self.time_embedding = nn.Module()
        self.time_embedding.timembedding = nn.ModuleList([
            nn.Embedding.from_pretrained(sinusoid_table(T, ch)),
            LeadingLinear(ch, tdim), nn.SiLU(), LeadingLinear(tdim, tdim)])
        self.head = LeadingConv(3, ch, 3)
        block = lambda i, o, level: Block(i, o, tdim, groups, dropout, level in attn)
        self.downblocks, skips, now = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(block(now, ch * mult, level))
                now = ch * mult
                skips.append(now)
            if level < len(ch_mult) - 1:
                self.downblocks.append(Resample(now, down=True))
                skips.append(now)
        self.middleblocks = nn.ModuleList([Block(now, now, tdim, groups, dropout, True),
                                           Block(now, now, tdim, groups, dropout, False)])
        self.upblocks = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(block(skips.pop() + now, ch * ch_mult[level], level))
                now = ch * ch_mult[level]
            if level > 0:
                self.upblocks.append(Resample(now, down=False))
        self.tail = nn.ModuleList([LeadingGroupNorm(groups, now), nn.SiLU(),
                                   LeadingConv(now, 3, 3, fixed_out=True)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, width: float = 1.0) -> torch.Tensor:
        table, dense0, _, dense1 = self.time_embedding.timembedding
        temb = dense1.run(F.silu(dense0.run(table(t), width)), width)
        h = self.head.run(x, width)
        skips = [h]
        for layer in self.downblocks:
            h = layer.run(h, temb, width) if isinstance(layer, Block) else layer.run(h, width)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer.run(h, temb, width)
        for layer in self.upblocks:
            if isinstance(layer, Block):
                h = layer.run(torch.cat([h, skips.pop()], dim=1), temb, width)
            else:
                h = layer.run(h, width)
        return self.tail[2].run(F.silu(self.tail[0].run(h)), width)


def randomize_(model: nn.Module, seed: int) -> None:
    """Random weights with O(1) activations everywhere (the release's 1e-5 gains would hide
    half the network), leaving the frozen sinusoidal table alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:  # GroupNorm scale
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
