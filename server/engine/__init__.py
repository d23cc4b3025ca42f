"""The engine: per-stage runtime, scheduler, rows in flight. Knows nothing of HTTP."""
