"""Data-parallel training under torchrun: two CPU processes on the gloo backend."""

import json
import subprocess
import sys

import pytest


@pytest.mark.integration
def test_two_gloo_ranks_stay_in_sync(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.cli", "train", "--run-dir", str(run_dir), "--synthetic-users", "300",
        "--dim", "8", "--seq-len", "8", "--batch-size", "32", "--max-iters", "60",
        "--eval-every", "30", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["iterations"] == 60
    first, second = result["replica_checksums"]
    assert first == second, "gradient averaging must keep both replicas identical"
    # The ranks really trained on different batches: a single process ends elsewhere.
    single = subprocess.run(
        [sys.executable, "-m", "training.cli", *command[command.index("train") :]]
        + ["--run-dir", str(tmp_path / "single")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "single" / "result.json").read_text())
    assert alone["replica_checksums"][0] != first
    log = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 2, "only rank 0 writes the metrics log"
