"""The results report, built end to end on a tiny stand-in for the real datasets."""

import gzip
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import REPO
from training.cli import app
from training.data import DataConfig, load_dataset, synthetic_interactions
from training.report import DATASETS, find_run, plan, run_all, run_status, write_report
from training.trainer import TrainConfig

SHARED = Path(os.environ.get("REMI_DATA_ROOT", REPO / "../shared/data"))
TINY = TrainConfig(dim=8, seq_len=8, batch_size=32, num_negatives=64, max_iters=40,
                   eval_every=20, patience=2, device="cpu")  # fmt: skip


@pytest.fixture
def tiny_root(tmp_path):
    """A data root laid out like ../shared/data, holding small synthetic sequences."""
    frame = synthetic_interactions(250, seed=1)
    path = tmp_path / "data" / DATASETS["beauty"]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        for user, items in frame.groupby("user", sort=False)["item"]:
            f.write(f"{user} {' '.join(items)}\n")
    return tmp_path / "data"


def test_plan_runs_identical_settings_once():
    experiments = plan(["beauty"], ["table2", "table5", "sweeps", "seeds"], TINY)
    keys = {e.key for e in experiments}
    assert len(experiments) == 35 and len(keys) < len(experiments)
    routed = [e for e in experiments if e.cfg.routing_grad]
    assert {e.cfg.model_type for e in routed} == {"comirec-dr", "mind"}
    remi_rows = [e for e in experiments if e.cfg.beta == 0.1 and e.cfg.rr_lambda == 100.0
                 and e.cfg.model_type == "comirec-sa" and e.cfg.num_interests == 4
                 and e.cfg.seed == TINY.seed]  # fmt: skip
    assert len({e.key for e in remi_rows}) == 1 and len(remi_rows) > 3


def test_report_is_written_and_runs_are_reused(tiny_root, tmp_path):
    experiments = plan(["beauty"], ["table5"], TINY)
    assert {run_status(e, tmp_path / "runs") for e in experiments} == {"not run"}
    rows = run_all(experiments, tiny_root, tmp_path / "runs")
    assert {run_status(e, tmp_path / "runs") for e in experiments} == {"finished"}
    assert len(rows) == 4 and all(r["test/recall@50"] >= 0 for r in rows)
    report = write_report(rows, tmp_path / "out", machine="test machine").read_text()
    assert "Table 5" in report and "IHN=on,RR=on" in report and "test machine" in report
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"beauty-curves.png", "beauty-routing.png"} <= figures
    stamps = [Path(r["run"], "result.json").stat().st_mtime_ns for r in rows]
    again = run_all(experiments, tiny_root, tmp_path / "runs")
    assert [Path(r["run"], "result.json").stat().st_mtime_ns for r in again] == stamps


@pytest.mark.data
@pytest.mark.skipif(not (SHARED / DATASETS["beauty"]).is_file(), reason="../shared/data absent")
def test_beauty_loads_with_the_published_sizes():
    ds = load_dataset(DataConfig(source=str(SHARED / DATASETS["beauty"])))
    assert (len(ds.user_ids), ds.num_items - 1, ds.num_interactions) == (22363, 12101, 198502)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (17890, 2236, 2237)


def test_finished_runs_are_found_by_their_settings(tmp_path):
    run = tmp_path / "beauty" / "any-name"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": asdict(TINY)}))
    assert find_run(tmp_path / "beauty", TINY) == run
    assert find_run(tmp_path / "beauty", replace(TINY, beta=0.5)) is None
    older = {k: v for k, v in asdict(TINY).items() if k != "weight_decay"}
    (run / "config.json").write_text(json.dumps({"train": older}))
    assert find_run(tmp_path / "beauty", TINY) is None, "a setting it lacks is not assumed"


def _row(tmp_path, label: str, model: str, r50: float, hr50: float) -> dict:
    """A report row as run_all returns it, with a one-line training log for the curves."""
    run = tmp_path / "runs" / label.replace("/", "_")
    run.mkdir(parents=True)
    log = {"iteration": 200, "valid/recall@50": r50, "routing_max": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(log) + "\n")
    test = {"recall@20": r50 / 2, "hitrate@20": hr50 / 2, "ndcg@20": 0.01,
            "recall@50": r50, "hitrate@50": hr50, "ndcg@50": 0.02}  # fmt: skip
    return {"dataset": "beauty", "label": label, "run": str(run), "model": model,
            "rr_lambda": 0.0, "seconds": 1.0, "iterations": 200,
            **{f"test/{k}": v for k, v in test.items()},
            **{f"pop/{k}": v / 4 for k, v in test.items()}}  # fmt: skip


def test_table2_shows_the_gain_and_sweeps_are_plotted(tmp_path):
    rows = [
        _row(tmp_path, "table2/comirec-dr", "comirec-dr", 0.10, 0.20),
        _row(tmp_path, "table2/comirec-dr+REMI", "comirec-dr", 0.15, 0.25),
        _row(tmp_path, "table2/comirec-dr+REMI+routing-grad", "comirec-dr", 0.12, 0.30),
        *(_row(tmp_path, f"sweep/beta={b:g}", "comirec-dr", 0.1 + b / 100, 0.2) for b in (0, 1, 4)),
    ]
    report = write_report(rows, tmp_path / "out", machine="m").read_text()
    table2 = report.split("## Table 2")[1].split("\n## ")[0]
    assert "| beauty | most popular | - | 0.0125 | 0.0250 | 0.0250 | 0.0500 |" in table2
    assert (
        "| beauty | comirec-dr | REMI | 0.0750 | 0.1250 | 0.1500 | 0.2500 | +50.0% | +25.0% |"
        in (table2)
    )
    assert (
        "| comirec-dr | REMI + routing grad | 0.0600 | 0.1500 | 0.1200 | 0.3000 | +20.0% | +50.0% |"
        in table2
    )
    assert (tmp_path / "out" / "figures" / "beauty-sweeps.png").stat().st_size > 0


def test_a_plain_row_that_scored_zero_has_no_gain(tmp_path):
    # A smoke run's plain model at 0: the gain over it divided by zero, and no report.md.
    rows = [
        _row(tmp_path, "table2/comirec-sa", "comirec-sa", 0.0, 0.0),
        _row(tmp_path, "table2/comirec-sa+REMI", "comirec-sa", 0.05, 0.10),
    ]
    report = write_report(rows, tmp_path / "out", machine="m").read_text()
    assert "| 0.0500 | 0.1000 | n/a | n/a |" in report


def test_unknown_datasets_and_suites_are_named_before_anything_runs(tmp_path):
    # A misspelt dataset was listed by --dry-run as "not run", and failed only when loaded.
    for flag, value in (("--datasets", "beauty,sprots"), ("--suites", "table9")):
        result = CliRunner().invoke(
            app,
            ["report", "--out", str(tmp_path / "o"), "--data-root", str(tmp_path), flag, value,
             "--dry-run"],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"{flag}: unknown" in result.output and "Traceback" not in result.output
