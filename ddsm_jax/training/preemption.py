"""Stop cleanly on SIGTERM (preemption, `scancel`) or Ctrl-C: checkpoint, then exit."""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax


class PreemptionWatch:
    """Single process: SIGTERM and the first SIGINT set a flag, and the loop saves and stops after
    the step it is in; a second SIGINT interrupts at once (the last checkpoint stays). Several
    processes: orbax's sync point, so every host stops after the same step (a local flag could
    leave hosts out of step)."""

    def __init__(self):
        self.signalled = False
        self._previous: dict[int, Any] = {}
        if jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT:
            if self.signalled:
                raise KeyboardInterrupt
            print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.signalled = True

    def should_stop(self, checkpoint_manager: Any, step: int) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        return bool(checkpoint_manager.reached_preemption(step))

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
