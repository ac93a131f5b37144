"""Converts pytorch-fid's Inception weights (a torch state_dict) into our `.npz`.

    python -m ddsm_jax.eval.convert_inception \\
        --pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Run once, on any machine with torch (`pip install torch`; nothing else of PyTorch is needed,
and the rest of the project never imports it). Conv kernels go from torch's OIHW to HWIO,
BatchNorm's weight/bias/running_mean/running_var to scale/bias/mean/var; the classifier
(`fc.*`) and the auxiliary head (`AuxLogits.*`) are not part of the pool3 features and are
dropped; any other key is an error, so a different checkpoint cannot slip through.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags
from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.eval.inception import (
    TORCH_WEIGHTS_NAME,
    check_flat_params,
    load_inception_params,
    param_shapes,
)
from ddsm_jax.utils.cli import run_program
from ddsm_jax.utils.files import write_atomically

_PTH = flags.DEFINE_string("pth", None, f"pytorch-fid's weights ({TORCH_WEIGHTS_NAME}).")
_OUT = flags.DEFINE_string("out", "inception_fid.npz", "Where to write our .npz.")

_BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_IGNORED_SUFFIXES = (".num_batches_tracked",)  # a BatchNorm training counter


def _our_key(torch_key: str) -> str | None:
    """Torch's "Mixed_5b.branch1x1.conv.weight" -> our "Mixed_5b/branch1x1/conv/kernel" (or
    None for a name that is no conv kernel or BatchNorm vector)."""
    parts = torch_key.split(".")
    if len(parts) < 3:
        return None
    *module, layer, field = parts
    if layer == "conv" and field == "weight":
        return "/".join([*module, "conv", "kernel"])
    if layer == "bn" and field in _BN_FIELDS:
        return "/".join([*module, "bn", _BN_FIELDS[field]])
    return None


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid's state_dict (numpy arrays, or anything np.asarray takes) -> our flat params.

    Raises ValueError listing unexpected, missing or misshaped keys.
    """
    expected = param_shapes()
    flat: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
            continue
        ours = _our_key(key)
        if ours not in expected:
            unexpected.append(key)
            continue
        array = np.asarray(value, dtype=np.float32)
        if ours.endswith("/kernel") and array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        flat[ours] = np.ascontiguousarray(array)
    hint = f"expected pytorch-fid's {TORCH_WEIGHTS_NAME}"
    if unexpected:
        raise ValueError(f"the state_dict has {len(unexpected)} unexpected keys (e.g. "
                         f"{', '.join(unexpected[:3])}); {hint}")
    check_flat_params(flat, "the state_dict", hint=hint)
    return flat


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict in a torch `.pth` as numpy arrays (torch is imported only here)."""
    try:
        import torch
    except ImportError as error:
        raise ImportError("reading a .pth needs PyTorch: pip install torch") from error
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; download pytorch-fid's {TORCH_WEIGHTS_NAME} "
                                "(README, Evaluation)")
    try:
        with path.open("rb") as handle:
            state_dict = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike
        raise ValueError(f"cannot read {path} as a torch state_dict ({type(error).__name__}); "
                         f"expected pytorch-fid's {TORCH_WEIGHTS_NAME}") from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
    return {key: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            for key, value in state_dict.items()}


def save_params(flat: Mapping[str, np.ndarray], out: PathLike) -> epath.Path:
    """Writes `flat` as an uncompressed `.npz`, atomically: a crash never leaves half a file."""
    return write_atomically(out, lambda handle: np.savez(handle, **flat))


def convert(pth: PathLike, out: PathLike) -> dict[str, Any]:
    """Converts `pth` to `out`, reads `out` back through the loader, returns a short report."""
    flat = convert_state_dict(load_torch_state_dict(pth))
    save_params(flat, out)
    load_inception_params(out)  # the round trip the evaluator will do
    with epath.Path(pth).open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"out": str(out), "arrays": len(flat),
            "parameters": int(sum(array.size for array in flat.values())),
            "pth_sha256": digest}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        report = convert(_PTH.value, _OUT.value)
    except (ImportError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(report))


if __name__ == "__main__":
    run_program(main, required=["pth"])
