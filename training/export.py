"""Turn a training run into a published retrieval bundle, and evaluate bundles."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from remi_core.bundle import Bundle, write_bundle
from remi_core.index import RECALL_TARGET
from training.data import SequenceDataset
from training.evaluate import evaluate_model, make_eval_set
from training.trainer import load_run


def export_run(
    run_dir: Path,
    bundle_root: Path,
    index_factory: str | None = None,
    search_params: str | None = None,
    publish: bool = True,
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    recall_target: float = RECALL_TARGET,
) -> Path:
    """Write the run's best checkpoint as a new bundle version; returns its directory.

    No index_factory: chosen from the catalogue size; no search_params: tuned on validation
    users to recall_target (see remi_core.bundle.write_bundle)."""
    run_dir = Path(run_dir)
    model, dataset, cfg = load_run(run_dir)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    metadata = {
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "sha256": dataset.fingerprint,
            **{k: v for k, v in dataset.summary().items() if k not in ("name", "fingerprint")},
        },
        "training": {
            "settings": asdict(cfg),
            **{
                k: result[k]
                for k in ("best_iteration", "iterations", "seconds", "device")
                if k in result
            },
        },
        "metrics": {k: result.get(k, {}) for k in ("valid", "test", "popularity_test")},
        **(extra or {}),
    }
    return write_bundle(
        bundle_root,
        encoder=model,
        item_ids=dataset.item_ids,
        popularity=dataset.popularity(),
        metadata=metadata,
        index_factory=index_factory,
        search_params=search_params,
        tune_histories=[dataset.sequences[u] for u in dataset.users("valid")],
        recall_target=recall_target,
        version=version,
        publish=publish,
    )


def evaluate_bundle(
    bundle: Bundle, dataset: SequenceDataset, split: str = "test"
) -> dict[str, float]:
    """Metrics of a bundle's encoder on a dataset's held-out users, matching items by external id.

    The dataset may have a different catalogue (e.g. tonight's, with new items): its items are
    translated to the bundle's rows, and items the bundle does not know cannot be hit.
    """
    row_of = bundle.row_of()
    row_map = np.array([row_of.get(item, 0) if item else 0 for item in dataset.item_ids], np.int64)
    eval_set = make_eval_set(dataset, dataset.users(split), bundle.config.seq_len, row_map=row_map)
    return evaluate_model(bundle.encoder, eval_set)
