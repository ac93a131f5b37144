"""Training metrics to a JSON-lines file and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from etils import epath
from tensorboardX import record_writer

from ddsm_jax.layout import Workdir
from ddsm_jax.utils.files import write_atomically, write_text_atomically


class _EventFile:
    """A TensorBoard event file at a URI (gs://...), through etils.epath like every other file:
    an object cannot be appended to, so each flush uploads the whole file, atomically."""

    def __init__(self, path: str):
        self._path, self._buffer, self._closed = epath.Path(path), io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if not self._closed:
            write_atomically(self._path, lambda handle: handle.write(self._buffer.getvalue()))

    def close(self) -> None:
        self.flush()
        self._closed = True


class _EventFiles:
    def open(self, path: str) -> _EventFile:
        return _EventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


record_writer.register_writer_factory("gs", _EventFiles())


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


class MetricWriter:
    """`metrics.jsonl` (one object per logged step) and `tensorboard/` in the workdir.

    A run resumed from step s keeps the lines of steps up to s and drops later ones, which it is
    about to log again; its TensorBoard events start with a purge marker at s + 1, which makes
    TensorBoard drop the earlier run's events past s too. The file is rewritten whole at each
    write (object stores such as gs:// cannot append), atomically. On processes other than 0
    every method is a no-op, so callers need no branches.
    """

    def __init__(self, workdir: Workdir, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._path = workdir.metrics
        self._lines = []
        if self._path.exists():
            self._lines = [line for line in self._path.read_text().splitlines()
                           if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self._tensorboard = SummaryWriter(str(workdir.tensorboard),
                                          purge_step=start_step + 1 if start_step else None)

    def write_scalars(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{name: _plain(value) for name, value in metrics.items()}}
        self._lines.append(json.dumps(record))
        write_text_atomically(self._path, "".join(line + "\n" for line in self._lines))
        for name, value in record.items():
            if name != "step" and np.ndim(value) == 0:
                self._tensorboard.add_scalar(name, value, step)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 HWC image (e.g. a sample grid)."""
        if self.enabled:
            self._tensorboard.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
