"""Loads the official PyTorch DDSM release (EnVision-Research/DDSM, CIFAR-10) into ddsm_jax.

    python -m ddsm_jax.convert_release --checkpoint=ckpt_450000.pt --out=DIR/export \\
        [--config=configs/cifar10.py] [--schedule=release_cifar10_schedule.json]

writes a ddsm_jax export (`ddsm_jax.export.load(DIR/export)` samples from it). Run it once, on
any machine with torch (`pip install torch`); the rest of the project never imports torch.

The release saves `{'net_model', 'ema_model', 'sched', 'optim', 'step', 'x_T'}` with
`torch.save`; its evaluation and search load `ema_model`, and so do we by default. The model is
its `SlimmableUNet` (`slimmable_model.py`): the DDPM CIFAR-10 U-Net with leading-slice slimmable
layers, the very layout of `ddsm_jax.models.unet`, so every full-width weight maps one-to-one:

    time_embedding.timembedding.1/.3   -> temb_dense0/1      (Linear weight (out, in) -> (in, out))
    head, tail.0, tail.2               -> head, tail_norm, tail_conv
    downblocks.i / middleblocks.i / upblocks.i -> down[i] / mid[i] / up[i], inside which
      block1.0, block1.2, temb_proj.1, block2.0, block2.3, shortcut -> norm1, conv1, temb_proj,
      norm2, conv2, shortcut; attn.{group_norm,proj_q,proj_k,proj_v,proj} -> attn.{norm,q,k,v,proj};
      main (DownSample / UpSample conv) -> conv
    conv weight OIHW -> kernel HWIO; GroupNorm weight -> scale

`time_embedding.timembedding.0.weight` is the frozen T x ch sinusoidal table, stored as an
`nn.Embedding`; our network computes the same table on the fly, so it is checked, not copied.
The release's GroupNorm has 32 groups (its `slimmable_model_g16.py` variant, 16, has the same
keys: the state_dict cannot tell them apart), and its attention levels are level indices
(`--attn=1`: the 16x16 level of a 32x32 image), ours resolutions (`attn_resolutions=(16,)`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from ddsm_jax.common_types import Params, PathLike
from ddsm_jax.utils.cli import run_program
from ddsm_jax.utils.errors import summary
from ddsm_jax.utils.files import read_json

TIME_TABLE_KEY = "time_embedding.timembedding.0.weight"
# The release's EMA update also runs over the frozen table (x <- 0.9999 x + 0.0001 x in float32),
# which walks it away from the exact sinusoid by up to ~1.7e-4 before it settles; a wrong layout
# (e.g. [sin, cos] halves instead of interleaved pairs) is off by O(1).
TIME_TABLE_ATOL = 2e-3
RELEASE_NUM_GROUPS = 32

# Our module names -> the release's (nn.Sequential indices included); leaves: weight/bias.
_TOP = {"temb_dense0": "time_embedding.timembedding.1",
        "temb_dense1": "time_embedding.timembedding.3", "head": "head",
        "down": "downblocks", "mid": "middleblocks", "up": "upblocks",
        "tail_norm": "tail.0", "tail_conv": "tail.2"}
_INNER = {"norm1": "block1.0", "conv1": "block1.2", "temb_proj": "temb_proj.1",
          "norm2": "block2.0", "conv2": "block2.3", "shortcut": "shortcut", "conv": "main",
          "attn": "attn", "norm": "group_norm", "q": "proj_q", "k": "proj_k", "v": "proj_v",
          "proj": "proj"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def release_key(path: tuple[str | int, ...]) -> str:
    """Our parameter path -> the release's key.

    ('down', 3, 'attn', 'q', 'kernel') -> 'downblocks.3.attn.proj_q.weight'.
    """
    top, *inner, leaf = path
    try:
        parts = [_TOP[top]]
        parts += [str(p) if isinstance(p, int) else _INNER[p] for p in inner]
        parts.append(_LEAF[leaf])
    except KeyError as error:
        raise ValueError(f"no release name for our parameter {'/'.join(map(str, path))}") from error
    return ".".join(parts)


def to_release_layout(array: np.ndarray) -> np.ndarray:
    """Ours -> torch: HWIO -> OIHW, (in, out) -> (out, in); vectors unchanged."""
    axes = {4: (3, 2, 0, 1), 2: (1, 0)}.get(array.ndim)
    return array.transpose(axes) if axes else array


def from_release_layout(array: np.ndarray) -> np.ndarray:
    """torch -> ours: OIHW -> HWIO, (out, in) -> (in, out); vectors unchanged."""
    axes = {4: (2, 3, 1, 0), 2: (1, 0)}.get(array.ndim)
    return array.transpose(axes) if axes else array


def _leaves(abstract: Params) -> list[tuple[tuple[str | int, ...], Any]]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    return [(tuple(entry.key for entry in path), leaf) for path, leaf in flat]


def release_shapes(config) -> dict[str, tuple[int, ...]]:
    """The release's state_dict keys and shapes for the network of `config` (table included)."""
    from ddsm_jax.models.network import abstract_network

    _, abstract = abstract_network(config)
    shapes = {release_key(path): tuple(to_release_layout(np.empty(leaf.shape, np.bool_)).shape)
              for path, leaf in _leaves(abstract)}
    shapes[TIME_TABLE_KEY] = (int(config.diffusion.num_timesteps), int(config.model.ch))
    return shapes


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def check_time_table(table: np.ndarray, config) -> float:
    """The checkpoint's frozen sinusoidal table against the one our network computes."""
    import jax.numpy as jnp

    from ddsm_jax.models.unet import timestep_embedding

    num_timesteps, ch = int(config.diffusion.num_timesteps), int(config.model.ch)
    ours = np.asarray(timestep_embedding(jnp.arange(num_timesteps), ch))
    deviation = float(np.max(np.abs(np.asarray(table, np.float32) - ours)))
    if not deviation <= TIME_TABLE_ATOL:
        raise ValueError(f"{TIME_TABLE_KEY} differs from the interleaved sin/cos table our "
                         f"network computes by up to {deviation:.3g} (tolerance "
                         f"{TIME_TABLE_ATOL}): not the release's time embedding")
    return deviation


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config) -> Params:
    """The release's U-Net state_dict (numpy arrays, the release's keys) -> our parameter tree.

    The result has exactly the tree, shapes and dtypes of `abstract_network(config)[1]` (numpy
    arrays). Raises ValueError on unknown, missing or misshaped keys, or a foreign time table.
    """
    from ddsm_jax.models.network import abstract_network

    _, abstract = abstract_network(config)
    leaves = _leaves(abstract)
    ours = {release_key(path): (path, leaf) for path, leaf in leaves}
    if len(ours) != len(leaves):
        raise ValueError("two of our parameters map to the same release key")
    expected = {*ours, TIME_TABLE_KEY}
    unknown = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if unknown or missing:
        raise ValueError(
            f"the state_dict does not fit the config's network: {len(unknown)} unknown keys "
            f"[{_examples(unknown)}], {len(missing)} missing keys [{_examples(missing)}]; check "
            f"model.ch/ch_mult/num_res_blocks/attn_resolutions and data.image_size")
    shapes = release_shapes(config)
    misshaped = [f"{key} {tuple(np.shape(value))} != {shapes[key]}"
                 for key, value in state_dict.items() if tuple(np.shape(value)) != shapes[key]]
    if misshaped:
        raise ValueError(f"{len(misshaped)} release tensors have the wrong shape for the config's "
                         f"network: {_examples(misshaped)}")
    deviation = check_time_table(state_dict[TIME_TABLE_KEY], config)
    logging.info("time-embedding table matches ours to %.3g", deviation)

    params: Params = {}
    for key, (path, leaf) in ours.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(
            from_release_layout(np.asarray(state_dict[key])), dtype=leaf.dtype)
    return params


def load_release_checkpoint(path: PathLike, *, use_ema: bool = True,
                            trusted: bool = False) -> dict[str, np.ndarray]:
    """The U-Net state_dict in the release's `.pt`, as numpy arrays under the release's keys.

    `use_ema` picks `ema_model` (what the release evaluates) over `net_model`; a bare state_dict
    is accepted as it is. DataParallel's `module.` prefix is stripped. The file is read with
    `weights_only=True` unless `trusted` (full unpickling runs code from the file).
    """
    try:
        import torch
    except ImportError:
        raise ImportError("reading the release's .pt needs PyTorch: pip install torch") from None
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with path.open("rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        hint = "" if trusted else " (if it is a trusted non-tensor pickle, pass --trust_pickle)"
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {summary(error)}{hint}"
                         ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not the release's "
                         f"checkpoint dict (net_model, ema_model, ...)")
    wanted = "ema_model" if use_ema else "net_model"
    if wanted in checkpoint:
        state_dict = checkpoint[wanted]
    elif "ema_model" in checkpoint or "net_model" in checkpoint:
        raise ValueError(f"{path} has no '{wanted}' (keys: {sorted(map(str, checkpoint))})")
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint  # a bare state_dict, e.g. torch.save(ema_model.state_dict())
    else:
        raise ValueError(f"{path} is not a DDSM release checkpoint: no 'ema_model' or "
                         f"'net_model' among its keys {sorted(map(str, checkpoint))[:8]}")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: '{wanted}' is a {type(state_dict).__name__}, not a state_dict")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: state_dict entry {key} is a {type(value).__name__}, "
                             f"not a tensor")
        value = value.detach().cpu()
        arrays[key.removeprefix("module.")] = (value.float() if value.is_floating_point()
                                               else value).numpy()
    return arrays


def convert_checkpoint(checkpoint: PathLike, out: PathLike, config, *,
                       schedule: PathLike | None = None, use_ema: bool = True,
                       trusted: bool = False) -> dict[str, Any]:
    """The release's `.pt` (and optionally its searched schedule) -> a ddsm_jax export at `out`."""
    from ddsm_jax import export
    from ddsm_jax.models.network import param_count

    if config.model.num_groups != RELEASE_NUM_GROUPS:
        logging.warning("model.num_groups=%d, but the release's SlimmableUNet normalises with %d "
                        "groups: the converted network computes something else",
                        config.model.num_groups, RELEASE_NUM_GROUPS)
    state_dict = load_release_checkpoint(checkpoint, use_ema=use_ema, trusted=trusted)
    params = convert_state_dict(state_dict, config)
    schedule_data = None
    if schedule is not None:
        if config.sampling.method != "ddpm":
            raise ValueError(f"the release's schedule gives a width per DDPM timestep; set "
                             f"--config.sampling.method=ddpm (not {config.sampling.method})")
        schedule_data = read_json(schedule)
    path = export.save(out, config, params, schedule=schedule_data)
    return {"out": str(path), "source": "ema_model" if use_ema else "net_model",
            "num_params": param_count(params),
            "time_table_max_deviation": check_time_table(state_dict[TIME_TABLE_KEY], config),
            "schedule": str(schedule) if schedule is not None else None}


def main() -> None:
    # Flags are defined here, not at import, so that importing this module next to
    # `ddsm_jax.main` or `ddsm_jax.eval.convert_inception` (also --config / --out) is harmless.
    config = config_flags.DEFINE_config_file("config", "configs/cifar10.py",
                                             "The config whose network the checkpoint holds.",
                                             lock_config=True)
    checkpoint = flags.DEFINE_string("checkpoint", None,
                                     "The release's .pt (e.g. ckpt_450000.pt).", required=True)
    out = flags.DEFINE_string("out", None, "Directory for the ddsm_jax export.", required=True)
    schedule = flags.DEFINE_string("schedule", None, "A schedule to export with the weights: the "
                                   "release's (JSON with `widths_per_timestep`) or ours.")
    use_ema = flags.DEFINE_bool("use_ema", True, "Convert `ema_model` (else `net_model`).")
    trust = flags.DEFINE_bool("trust_pickle", False, "Unpickle the whole file (runs its code).")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            report = convert_checkpoint(checkpoint.value, out.value, config.value,
                                        schedule=schedule.value, use_ema=use_ema.value,
                                        trusted=trust.value)
        except (ImportError, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(report))

    run_program(run)


if __name__ == "__main__":
    main()
