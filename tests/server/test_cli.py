"""`offramp serve` flags: one per setting, flags over environment, clear failures, no secret in logs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from offramp.cli import build_parser, main
from server.cli import redacted, settings_docs, settings_from_args
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OFFRAMP_"):
            monkeypatch.delenv(key)


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_setting_has_a_documented_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    docs = settings_docs()
    for name in Settings.model_fields:
        flag = "--bundle" if name == "bundles" else "--" + name.replace("_", "-")
        assert flag in help_text, flag
        assert docs.get(name), f"Settings.{name} has no docstring"
        assert f"OFFRAMP_{name.upper()}" in help_text


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OFFRAMP_PORT", "9000")
    monkeypatch.setenv("OFFRAMP_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("OFFRAMP_BUNDLES", "/env/a,/env/b")
    settings = settings_from_args(_serve_args("--port", "9100", "--bundle", str(tmp_path / "x"),
                                              "--bundle", str(tmp_path / "y"), "--device", "cpu"))
    assert settings.port == 9100  # flag
    assert settings.max_batch_size == 8  # environment, no flag given
    assert settings.bundles == [tmp_path / "x", tmp_path / "y"]
    assert settings.device == "cpu"
    assert settings_from_args(_serve_args()).bundles == [Path("/env/a"), Path("/env/b")]


def test_invalid_flags_are_refused() -> None:
    with pytest.raises(SystemExit):
        _serve_args("--device", "tpu")
    with pytest.raises(SystemExit):
        _serve_args("--max-batch-size", "many")
    with pytest.raises(ValidationError):
        settings_from_args(_serve_args("--max-batch-size", "0"))


def test_redacted_settings_never_show_the_admin_token() -> None:
    settings = Settings(admin_token="s3cr3t-token-value")
    assert "s3cr3t" not in str(redacted(settings))
    assert redacted(settings)["admin_token"] == "set"


def test_serve_fails_clearly_on_a_missing_bundle_and_logs_no_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
    env["OFFRAMP_ADMIN_TOKEN"] = "s3cr3t-token-value"
    proc = subprocess.run(
        [sys.executable, "-m", "offramp.cli", "serve", "--bundle", str(tmp_path / "nope"), "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "bundle directory does not exist" in proc.stderr
    assert "admin_token" in proc.stderr and "s3cr3t" not in proc.stderr + proc.stdout


def test_invalid_setting_from_the_environment_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFRAMP_")}
    env["OFFRAMP_ADMIN_TOKEN"] = "changeme"
    proc = subprocess.run(
        [sys.executable, "-m", "offramp.cli", "serve", "--bundle", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "admin_token" in proc.stderr and "placeholder" in proc.stderr


def test_usage_doc_lists_every_setting() -> None:
    usage = (REPO / "docs" / "usage.md").read_text()
    for name in Settings.model_fields:
        flag = "--bundle" if name == "bundles" else "--" + name.replace("_", "-")
        assert f"`{flag}" in usage and f"`OFFRAMP_{name.upper()}`" in usage, name
