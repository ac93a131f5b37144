"""One-line summaries of the exceptions libraries raise, for the one-line messages users see."""

from __future__ import annotations


def summary(error: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message' (libraries put tracebacks and tensorstore specs
    after the first line), at most `limit` characters."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]
