"""Training metrics to a JSON-lines file and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


class MetricWriter:
    """`metrics.jsonl` (one object per logged step) and `tensorboard/` in the workdir.

    On processes other than 0 every method is a no-op, so callers need no branches.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write_scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{name: _plain(value) for name, value in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step" and np.ndim(value) == 0:
                self._tensorboard.add_scalar(name, value, step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 HWC image (e.g. a sample grid)."""
        if self.enabled:
            self._tensorboard.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
