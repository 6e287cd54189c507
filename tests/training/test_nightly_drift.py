"""The publish gate's drift guard: a model within the tolerance of `current` but clearly worse
than a recent version is not published (losses within the tolerance must not add up)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from remi_core.bundle import current_version, list_versions
from tests.helpers import REPO, write_tiny_bundle
from training.cli import app
from training.config import TrainConfig
from training.data import DataConfig
from training.nightly import NightlyConfig, run_bootstrap, run_nightly
from training.nightly.publish import decide

TEST_CONFIG = REPO / "configs" / "nightly-test.yaml"


def test_decide_also_holds_the_new_model_to_the_best_recent_version() -> None:
    best = ("v-good", {"recall@50": 0.30})
    ok, why = decide({"recall@50": 0.285}, {"recall@50": 0.29}, "recall@50", 0.01, best)
    assert not ok and "best recent version v-good" in why and "keeping the current" in why
    ok, why = decide({"recall@50": 0.295}, {"recall@50": 0.29}, "recall@50", 0.01, best)
    assert ok and "v-good" in why
    assert decide({"recall@50": 0.3}, None, "recall@50", 0.01, best)[0]
    assert not decide({"recall@50": 0.1}, None, "recall@50", 0.01, best)[0]


def config(tmp_path: Path, **nightly) -> NightlyConfig:
    raw = yaml.safe_load(TEST_CONFIG.read_text())
    return NightlyConfig(
        data=DataConfig(**raw["data"]),
        train=TrainConfig(**raw["train"]),
        **{**raw["nightly"], "bundle_root": tmp_path / "bundles", "state_dir": tmp_path / "s"},
        **nightly,
    )


@pytest.mark.integration
def test_drift_after_a_weak_publish_is_caught_by_the_recent_versions(
    tmp_path: Path, redis_server
) -> None:
    cfg = config(tmp_path, redis_url=None)
    assert run_bootstrap(cfg)["decision"] == "published"
    good = current_version(cfg.bundle_root)
    # A weak model became current (within the tolerance of its predecessor, say); tonight's
    # model is as weak: close to `current`, far below the good version two nights ago.
    write_tiny_bundle(cfg.bundle_root, seed=3)
    crippled = replace(cfg, redis_url=redis_server.url, train=replace(cfg.train, lr=0.0))

    report = run_nightly(crippled)

    assert report["decision"] == "rejected", report["reason"]
    assert f"best recent version {good}" in report["reason"]
    comparison = report["metrics"]["comparison"]
    assert comparison["baseline"]["version"] == good
    assert comparison["new"] < comparison["baseline"]["value"] - cfg.tolerance
    assert set(report["metrics"]["recent_versions"]) == {good}
    # `versions` shows numbers measured on the same users for every version.
    dataset = next((cfg.state_dir / "runs").iterdir()) / "dataset"

    def versions() -> dict[str, dict]:
        result = CliRunner().invoke(
            app, ["versions", "--bundle-root", str(cfg.bundle_root), "--dataset-dir",
                  str(dataset), "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return {r["version"]: r for r in json.loads(result.output)["versions"]}

    rows = versions()
    assert set(rows) == set(list_versions(cfg.bundle_root))
    same = report["metrics"]["recent_versions"][good]["recall@50"]
    assert rows[good]["same_users_recall@50"] == pytest.approx(same)
    # One damaged version is marked in its row; it stopped the whole listing.
    weights = cfg.bundle_root / good / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rows = versions()
    assert "encoder.safetensors" in rows[good]["error"]
    assert all("same_users_recall@50" in r for v, r in rows.items() if v != good)
