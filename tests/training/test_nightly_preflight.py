"""The nightly and bootstrap jobs check where they will write before they train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import REPO
from training.cli import app

TEST_CONFIG = REPO / "configs" / "nightly-test.yaml"


def bootstrap(bundle_root: Path, state: Path):
    return CliRunner().invoke(
        app,
        ["bootstrap", "--config", str(TEST_CONFIG), "--bundle-root", str(bundle_root),
         "--state-dir", str(state)],
    )  # fmt: skip


def test_a_bundle_root_that_cannot_be_a_directory_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the bundle root's parent should be")
    result = bootstrap(blocker / "bundles", tmp_path / "state")
    assert result.exit_code == 2, result.output
    assert "--bundle-root" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "state" / "runs").exists(), "it trained before finding out"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_bundle_root_fails_before_training(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    root.chmod(0o555)
    try:
        result = bootstrap(root, tmp_path / "state")
    finally:
        root.chmod(0o755)
    assert result.exit_code == 2, result.output
    assert "--bundle-root" in result.output and "not writable" in result.output
    assert not (tmp_path / "state" / "runs").exists()
