"""ddsm_jax against PyTorch eager on this CPU: the forward per width and the sandwich train step.

    python -m benchmarks.vs_torch                       # CIFAR-10 network, batch 8
    python -m benchmarks.vs_torch --layers              # one 3x3 conv and one GroupNorm per shape

PyTorch runs the independent spelling of the release's slimmable U-Net
(`tests/torch_release_unet.py`, the same channel counts at every width) in a worker process,
with as many threads as XLA uses here; this process runs ddsm_jax. The two take turns, row by
row and round by round, so a shared machine's slow minute hits both. Each cell is the median of
`--repeats` calls after a warm-up; `speed` is torch's seconds over ours (> 1: ddsm_jax faster),
one figure per round. The train step is the whole update on both sides: the sandwich's three
losses (each width its own t and noise), backward, gradient clipping, Adam and the EMA.

`--layers` times single layers instead, at the network's shapes (each level's resolution and
channels at the widths of `--layer_widths`): a 3x3 convolution (GFLOP/s) and a GroupNorm followed
by SiLU, forward and backward (ms: the gradients of the input, gamma and beta, as in training),
ddsm_jax's own (`models.conv.conv2d`, `SlimGroupNorm`) beside torch's, in one process, taking
turns.

Needs PyTorch, which the project does not install: `pip install torch==2.13.0+cpu`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks.common import median_seconds, report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar10.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per cell (median).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating rounds of every row.")
_SANDWICH = flags.DEFINE_list("sandwich", ["1.0", "0.25", "0.5"],
                              "Widths of the timed train step (empty: no train row).")
_LAYERS = flags.DEFINE_bool("layers", False, "Time single layers instead of the network.")
_LAYER_WIDTHS = flags.DEFINE_list("layer_widths", ["1.0", "0.75"], "Widths of --layers' shapes.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: run as the PyTorch side.")

TORCH_MISSING = ("benchmarks.vs_torch needs PyTorch, which the project does not install: "
                 "pip install torch==2.13.0+cpu")


def _rows(config, batch: int, sandwich: list[float]) -> list[tuple[str, str, tuple[float, ...]]]:
    """(name, kind, widths): one forward per width, then the train step."""
    rows = [(f"forward {w:g}", "forward", (float(w),)) for w in config.model.widths]
    if sandwich:
        rows.append(("sandwich " + "/".join(f"{w:g}" for w in sandwich), "train",
                     tuple(sandwich)))
    return rows


# -- the PyTorch side ---------------------------------------------------------------------------

def _torch_worker(config, batch: int) -> None:
    """Answers {"row": [kind, widths], "repeats": n} on stdin with {"seconds": median}."""
    import torch

    from tests.torch_release_unet import ReleaseUNet, randomize_

    torch.set_num_threads(int(os.environ["VS_TORCH_THREADS"]))
    model_config, image = config.model, config.data.image_size
    levels = [i for i in range(len(model_config.ch_mult)) if image // 2**i in model_config.attn_resolutions]
    model = ReleaseUNet(T=config.diffusion.num_timesteps, ch=model_config.ch,
                        ch_mult=tuple(model_config.ch_mult), attn=tuple(levels),
                        num_res_blocks=model_config.num_res_blocks, dropout=model_config.dropout,
                        groups=model_config.num_groups)
    randomize_(model, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=config.training.learning_rate)
    betas = torch.linspace(config.diffusion.beta_start, config.diffusion.beta_end,
                           config.diffusion.num_timesteps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=generator)
    t = torch.randint(0, config.diffusion.num_timesteps, (batch,), generator=generator)

    def forward(width: float) -> None:
        with torch.inference_mode():
            model(x, t, width)

    def train(widths: tuple[float, ...]) -> None:
        model.train()
        loss = 0.0
        for width in widths:
            steps = torch.randint(0, config.diffusion.num_timesteps, (batch,))
            noise = torch.randn_like(x)
            a = alpha_bar[steps].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x + (1 - a).sqrt() * noise
            loss = loss + torch.mean((model(x_t, steps, width) - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.training.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - config.training.ema_decay)
        model.eval()

    model.eval()
    for line in sys.stdin:
        request = json.loads(line)
        kind, widths = request["row"]
        run = (functools.partial(forward, widths[0]) if kind == "forward"
               else functools.partial(train, tuple(widths)))
        print(json.dumps({"seconds": _torch_seconds(run, request["repeats"])}), flush=True)


class TorchWorker:
    """The PyTorch side as a subprocess: one request, one answer."""

    def __init__(self, threads: int):
        env = {**os.environ, "VS_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
               "OMP_WAIT_POLICY": "PASSIVE"}  # idle torch threads must not spin beside XLA
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.vs_torch", "--worker", *sys.argv[1:]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def seconds(self, kind: str, widths: tuple[float, ...], repeats: int) -> float:
        self.process.stdin.write(json.dumps({"row": [kind, widths], "repeats": repeats}) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise SystemExit(f"the PyTorch worker stopped (exit {self.process.wait()})")
        return json.loads(answer)["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# -- the ddsm_jax side ----------------------------------------------------------------------

def _jax_runs(config, batch: int, rows) -> dict[str, Callable[[], object]]:
    from ddsm_jax.diffusion.schedules import diffusion_from_config
    from ddsm_jax.models.network import init_network
    from ddsm_jax.training.train_step import TrainState, make_optimizer, make_train_step

    network, params = init_network(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, *network.image_shape)).astype(np.float32))
    t = jax.device_put(rng.integers(0, config.diffusion.num_timesteps, batch).astype(np.int32))
    step = make_train_step(network, diffusion_from_config(config.diffusion), config.training)
    # The step donates its state: the forwards keep their own copy of the parameters.
    state = TrainState.create(jax.tree.map(jnp.copy, params), make_optimizer(config.training))
    key = jax.random.key(1)
    runs = {}
    for name, kind, widths in rows:
        if kind == "forward":
            forward = jax.jit(lambda p, x, t, w=widths[0]: network.apply(p, x, t, width=w))
            runs[name] = lambda forward=forward: forward(params, x, t)
        else:
            def train(widths=widths):
                nonlocal state
                state, metrics = step(state, x, key, widths)
                return metrics["loss"]

            runs[name] = train
    return runs


def _layer_rows(config, batch: int, threads: int) -> list[dict]:
    """A 3x3 convolution and a GroupNorm + SiLU's gradient at each level's shape and width."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads
    import torch

    from ddsm_jax.models.conv import conv2d
    from ddsm_jax.models.slimmable import slim_channels

    torch.set_num_threads(threads)
    model = config.model
    conv = jax.jit(conv2d)
    rows, rng = [], np.random.default_rng(0)
    shapes = dict.fromkeys((config.data.image_size // 2**level,
                            slim_channels(model.ch * mult, float(width), 8))
                           for level, mult in enumerate(model.ch_mult)
                           for width in _LAYER_WIDTHS.value)
    for resolution, channels in shapes:
        x = rng.standard_normal((batch, resolution, resolution, channels)).astype(np.float32)
        kernel = rng.standard_normal((3, 3, channels, channels)).astype(np.float32)
        x_jax, kernel_jax = jnp.asarray(x), jnp.asarray(kernel)
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        kernel_torch = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        dy = rng.standard_normal(x.shape).astype(np.float32)
        flops = 2 * batch * resolution**2 * 9 * channels**2
        runs = {"conv_jax": functools.partial(conv, x_jax, kernel_jax),
                "conv_torch": functools.partial(torch.nn.functional.conv2d, x_torch,
                                                kernel_torch, padding=1),
                "norm_jax": _jax_norm_grad(x, dy, model.num_groups),
                "norm_torch": _torch_norm_grad(x, dy, model.num_groups)}
        cells = {name: [] for name in runs}
        for _ in range(_ROUNDS.value):
            for name, run in runs.items():
                cells[name].append(median_seconds(run, 20)[0] if name.endswith("jax")
                                   else _torch_seconds(run, 20))
        rows.append({"config": config.data.name, "batch": batch,
                     "shape": f"{resolution}x{resolution}x{channels}",
                     "conv_gflops_torch": [flops / s / 1e9 for s in cells["conv_torch"]],
                     "conv_gflops_jax": [flops / s / 1e9 for s in cells["conv_jax"]],
                     "norm_ms_torch": [1e3 * s for s in cells["norm_torch"]],
                     "norm_ms_jax": [1e3 * s for s in cells["norm_jax"]]})
    for row in rows:
        for key in ("conv_gflops_torch", "conv_gflops_jax", "norm_ms_torch", "norm_ms_jax"):
            row[key + "_text"] = " ".join(f"{v:.3g}" for v in row[key])
    return rows


def _jax_norm_grad(x: np.ndarray, dy: np.ndarray, groups: int) -> Callable[[], object]:
    """`SlimGroupNorm` then SiLU: the gradients of its input, gamma and beta for `dy` (NHWC)."""
    from flax import nnx

    from ddsm_jax.models.slimmable import SlimGroupNorm, silu

    graphdef, params = nnx.split(SlimGroupNorm(x.shape[-1], groups))
    grad = jax.jit(lambda p, x, dy: jax.vjp(lambda p, x: silu(nnx.merge(graphdef, p)(x)),
                                            p, x)[1](dy))
    return functools.partial(grad, params, jnp.asarray(x), jnp.asarray(dy))


def _torch_norm_grad(x: np.ndarray, dy: np.ndarray, groups: int) -> Callable[[], None]:
    """torch's group_norm then SiLU, the same gradients (NCHW)."""
    import torch

    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    dy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
    gamma = torch.ones(x.shape[1], requires_grad=True)
    beta = torch.zeros(x.shape[1], requires_grad=True)

    def run() -> None:
        x.grad = gamma.grad = beta.grad = None
        torch.nn.functional.silu(torch.nn.functional.group_norm(x, groups, gamma, beta)).backward(dy)
    return run


def _torch_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall clock of `repeats` calls after a warm-up (eager torch: done on return)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str]) -> None:
    del argv
    config, batch = _CONFIG.value, _BATCH.value
    if _WORKER.value:
        return _torch_worker(config, batch)
    if importlib.util.find_spec("torch") is None:  # not imported here: its threads stay out
        raise SystemExit(TORCH_MISSING)
    threads = os.cpu_count() or 1  # XLA:CPU's intra-op pool takes every core
    if _LAYERS.value:
        rows = _layer_rows(config, batch, threads)
        return report(rows, [("shape", "shape", "s"),
                             ("conv_gflops_torch_text", "conv GFLOP/s torch", "s"),
                             ("conv_gflops_jax_text", "ddsm_jax", "s"),
                             ("norm_ms_torch_text", "GroupNorm+SiLU grad ms torch", "s"),
                             ("norm_ms_jax_text", "ddsm_jax", "s")],
                      notes=[f"torch {importlib.metadata.version('torch')}, {threads} threads; "
                             f"batch {batch}; one figure per round"])
    if config.data.channels != 3:
        raise app.UsageError(f"--config: the torch U-Net takes 3-channel images, "
                             f"{config.data.name} has {config.data.channels}; use an RGB config "
                             f"such as configs/cifar10.py")
    sandwich = [float(w) for w in _SANDWICH.value]
    rows = _rows(config, batch, sandwich)
    worker = TorchWorker(threads)
    runs = _jax_runs(config, batch, rows)
    results = {name: {"torch": [], "jax": []} for name, _, _ in rows}
    try:
        for _ in range(_ROUNDS.value):
            for name, kind, widths in rows:
                results[name]["jax"].append(median_seconds(runs[name], _REPEATS.value)[0])
                results[name]["torch"].append(worker.seconds(kind, widths, _REPEATS.value))
    finally:
        worker.close()
    table = []
    for name, _, _ in rows:
        ours, theirs = results[name]["jax"], results[name]["torch"]
        speed = [b / a for a, b in zip(ours, theirs)]
        table.append({"config": config.data.name, "batch": batch, "row": name,
                      "torch_seconds": theirs, "jax_seconds": ours,
                      "speed_min": min(speed), "speed_max": max(speed),
                      "torch": " ".join(f"{s:.3f}" for s in theirs),
                      "jax": " ".join(f"{s:.3f}" for s in ours)})
    report(table, [("row", "row", "s"), ("torch", "torch eager s", "s"),
                   ("jax", "ddsm_jax s", "s"), ("speed_min", "speed min", ".2f"),
                   ("speed_max", "speed max", ".2f")],
           notes=[f"torch {importlib.metadata.version('torch')}, {threads} threads; batch {batch}; "
                  f"speed = torch seconds / ddsm_jax seconds, per round"])


if __name__ == "__main__":
    app.run(main)
