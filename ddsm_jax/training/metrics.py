"""Append-only JSON-lines metrics: one object per logged step, readable with pandas or jq."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()


class JsonlWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{name: _plain(value) for name, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
