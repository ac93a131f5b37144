"""One-line summaries of the exceptions libraries raise, for the one-line messages users see."""

from __future__ import annotations

import logging
import os
import sys

from absl import logging as absl_logging


def summary(error: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message' (libraries put tracebacks and tensorstore specs
    after the first line), at most `limit` characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def quiet_background_failures() -> None:
    """Keeps a failed background checkpoint write to the one line the program prints about it.

    When a write fails (a full disk), orbax logs each failed thread with its traceback, asyncio
    logs each failed write's 'exception was never retrieved', and the writes still in flight call
    back into an event loop that has closed, which Python reports as hundreds of 'Event loop is
    closed' tracebacks. The program raises the cause itself as one line
    (`Checkpointer.check_for_errors`), so these duplicates are dropped; anything else passes.
    The program itself uses no asyncio: its error records all come from orbax's writes.
    """
    default_hook = sys.unraisablehook

    def unraisable(report):
        if not (isinstance(report.exc_value, RuntimeError)
                and str(report.exc_value) == "Event loop is closed"):
            default_hook(report)

    sys.unraisablehook = unraisable
    absl_logging.get_absl_handler().addFilter(
        lambda record: not (record.levelno == logging.ERROR
                            and (_ORBAX in record.pathname or record.name == "asyncio")))


_ORBAX = f"{os.sep}orbax{os.sep}"
