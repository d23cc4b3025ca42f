"""offramp server: serve multi-exit ONNX bundles with per-sample early exit (no torch)."""

__version__ = "0.1.0"
