"""Counts XLA compilations: the proof that a hot loop stops compiling once it is warm.

Every executable JAX builds, freshly compiled or loaded from the persistent cache, passes
through one backend-compile event; listening to it counts them with their seconds and names.
"""

from __future__ import annotations

import collections
import dataclasses

from jax import monitoring

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCounter:
    """`with CompileCounter() as compiles: ...` then `compiles.count`, `.seconds`, `.by_name`."""

    count: int = 0
    seconds: float = 0.0
    by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def _listen(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration_secs
            self.by_name[str(kwargs.get("fun_name", "?"))] += 1

    def __enter__(self) -> CompileCounter:
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc_info) -> None:
        monitoring.unregister_event_duration_listener(self._listen)
