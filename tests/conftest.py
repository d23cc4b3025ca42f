"""Shared fixtures. `tiny_bundle`: a real 3-stage digits bundle, built once per test session.

The bundle is built with torch (the `export` extra); suites that need it skip when torch is
missing, so the server's own tests still run on a server-only install.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a verified bundle (3 stages, input `pixels` FP32 [-1, 8, 8], 10 classes,
    calibration.npz and reference.onnx included). Treat it as read-only: copy it to modify it."""
    pytest.importorskip("torch", reason="building the test bundle needs the `export` extra (torch)")
    from model_export.demo import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")
