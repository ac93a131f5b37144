"""Prints the network's parameter count and MACs per width as one JSON object.

    python -m ddsm_jax.cost --config=configs/cifar10.py
"""

from __future__ import annotations

import json

from ml_collections import config_flags

from ddsm_jax.models.cost import macs_table
from ddsm_jax.models.network import abstract_network, param_count
from ddsm_jax.models.stage_widths import width_json, width_label
from ddsm_jax.utils.cli import run_program

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)


def cost_report(config) -> dict:
    network, params = abstract_network(config)
    table = macs_table(network, params)
    return {"params": param_count(params), "widths": [width_json(w) for w in network.widths],
            "macs": {width_label(width): counts for width, counts in table.items()}}


def main(argv: list[str]) -> None:
    del argv
    print(json.dumps(cost_report(_CONFIG.value)))


if __name__ == "__main__":
    run_program(main, required=["config"])
