"""Multi-process start-up: one JAX process per host (TPU pod worker, SLURM task, or by hand)."""

from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Calls `jax.distributed.initialize` when running as several processes, else nothing.

    On TPU pods and SLURM, JAX finds the coordinator itself; elsewhere pass all three values.
    """
    explicit = coordinator_address is not None
    slurm_multi = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_multi = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm_multi or tpu_multi or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id too")
    # Lets CPU-only processes (tests, debugging a launch on one machine) run collectives too;
    # accelerators use their own collectives and ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
