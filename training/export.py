"""Turn a training run into a retrieval bundle (see remi_core/bundle.py for the format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from remi_core.bundle import write_bundle
from remi_core.index import RECALL_TARGET
from training.run_dir import RunDir
from training.trainer import load_run


@dataclass(frozen=True)
class ExportConfig:
    """How a run becomes a bundle (the `export:` section of a config file)."""

    index_factory: str | None = None
    """Faiss index factory: Flat (exact), HNSW32, IVF1024,SQ8, ...; unset: chosen by catalogue
    size (Flat up to remi_core.index.EXACT_MAX_ITEMS items, IVF with SQ8 codes above)."""
    search_params: str | None = None
    """Faiss search parameters, e.g. nprobe=16 or efSearch=64; unset: the smallest nprobe or
    efSearch whose merged Eq. 7 recall on validation users reaches recall_target."""
    recall_target: float = RECALL_TARGET
    """Recall@n of the merged Eq. 7 list against exact search that tuning must reach."""


def export_run(
    run_dir: Path,
    bundle_root: Path,
    export: ExportConfig = ExportConfig(),
    publish: bool = True,
    version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the run's best checkpoint as a new bundle version; returns its directory.

    An approximate index is tuned and measured on the validation users' histories (the
    manifest's `index` section records the recall and the parameters)."""
    model, dataset, cfg = load_run(run_dir)
    result = RunDir(run_dir).read_result()
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
        index_factory=export.index_factory,
        search_params=export.search_params,
        tune_histories=[dataset.sequences[u] for u in dataset.users("valid")],
        recall_target=export.recall_target,
        version=version,
        publish=publish,
    )
