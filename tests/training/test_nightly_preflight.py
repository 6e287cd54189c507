"""The nightly and bootstrap jobs check where they will write before they train."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import REPO
from training.cli import app

TEST_CONFIG = REPO / "configs" / "nightly-test.yaml"


def bootstrap(bundle_root: Path, state: Path, config: Path = TEST_CONFIG):
    return CliRunner().invoke(
        app,
        ["bootstrap", "--config", str(config), "--bundle-root", str(bundle_root),
         "--state-dir", str(state)],
    )  # fmt: skip


def bootstrap_with_export(tmp_path: Path, export: dict):
    """bootstrap with the test config's export: section replaced, into tmp_path."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["export"] = export
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(config))
    return bootstrap(tmp_path / "bundles", tmp_path / "state", path)


def test_a_bundle_root_that_cannot_be_a_directory_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the bundle root's parent should be")
    result = bootstrap(blocker / "bundles", tmp_path / "state")
    assert result.exit_code == 2, result.output
    assert "--bundle-root" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "state" / "runs").exists(), "it trained before finding out"


@pytest.mark.parametrize(
    ("export", "says"),
    [
        ({"index_factory": "IVF16,Foo"}, "invalid Faiss index factory string 'IVF16,Foo'"),
        ({"index_factory": "HNSW8", "search_params": "nprobe=4"}, "could not set parameter"),
        ({"recall_target": 1.5}, "recall target must be in (0, 1], not 1.5"),
        ({"index_factory": "NSG8"}, "NSG indexes are not supported"),
        ({"index_factory": "IDMap,Flat"}, "IDMap is not supported"),
        ({"search_params": "nprobe=4"}, "do not fit the Flat index chosen for tonight's"),
    ],
)
def test_index_settings_a_bundle_would_refuse_fail_before_training(
    tmp_path: Path, export: dict, says: str
) -> None:
    # They were checked when the bundle was written: after a whole night's training.
    result = bootstrap_with_export(tmp_path, export)
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "state" / "runs").exists(), "it trained before finding out"


def test_a_category_file_the_export_cannot_read_fails_before_training(tmp_path: Path) -> None:
    # Only its existence was checked: the export refused it after the whole training, and the
    # error named no setting.
    categories = tmp_path / "cats.csv"
    categories.write_text("item_id,cat\nbooks-0001,a\n")
    result = bootstrap_with_export(tmp_path, {"categories": str(categories)})
    assert result.exit_code == 2, result.output
    assert f"categories: {categories}" in result.output and "category" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "state" / "runs").exists(), "it trained before finding out"


def test_a_current_that_is_a_directory_fails_before_training(tmp_path: Path) -> None:
    # What `rsync -L` leaves: publishing refused it, after the whole training.
    (tmp_path / "bundles" / "current").mkdir(parents=True)
    result = bootstrap(tmp_path / "bundles", tmp_path / "state")
    assert result.exit_code == 2, result.output
    assert "current is not a symlink" in result.output and "Traceback" not in result.output
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


def test_a_report_that_cannot_be_printed_keeps_neither_the_lock_nor_the_error(
    redis_server, tmp_path: Path
) -> None:
    # The report is printed after the lock is released: with a closed stdout (`| head`, a dead
    # log pipe) the print failed first, the lock stayed for its TTL and the run's own error
    # was replaced by BrokenPipeError.
    from training.nightly import NightlyConfig, NightlyError, run_nightly

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the bundle root should be")
    cfg = NightlyConfig(bundle_root=blocker, state_dir=tmp_path / "s", redis_url=redis_server.url)

    def closed_stdout(report: dict) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(NightlyError, match="--bundle-root"):
        run_nightly(cfg, emit=closed_stdout)
    assert redis_server.client().get(cfg.lock_key) is None
