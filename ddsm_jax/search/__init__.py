"""Step-aware search: per-step widths found by a parallel evolutionary search."""
