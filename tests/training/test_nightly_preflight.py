"""The nightly and bootstrap jobs check where they will write before they train."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
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


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Nobody may create files in `directory`: mode 0555, and for root (who writes through mode
    bits) the immutable attribute where the file system has one."""
    directory.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
        if done.returncode != 0:
            directory.chmod(0o755)
            pytest.skip(f"root writes through mode bits and chattr failed: {done.stderr!r}")
        immutable = True
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_a_read_only_bundle_root_fails_before_training(tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    with read_only(root):
        result = bootstrap(root, tmp_path / "state")
    assert result.exit_code == 2, result.output
    assert "--bundle-root" in result.output and "not writable" in result.output
    assert not (tmp_path / "state" / "runs").exists()
