"""Stop cleanly on SIGTERM (preemption, `scancel`, Ctrl-C in a scheduler): checkpoint, then exit."""

from __future__ import annotations

import signal
from typing import Any

import jax


class PreemptionWatch:
    """Single process: a SIGTERM handler sets a flag. Several processes: orbax's sync point,
    so every host stops after the same step (a local flag could leave hosts out of step)."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self.signalled = True

    def should_stop(self, checkpoint_manager: Any, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        return bool(checkpoint_manager.reached_preemption(step))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
