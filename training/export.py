"""Turn a training run into a retrieval bundle (see remi_core/bundle.py for the format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from remi_core.bundle import write_bundle
from training.run_dir import RunDir
from training.trainer import load_run


@dataclass(frozen=True)
class ExportConfig:
    """How a run becomes a bundle (the `export:` section of a config file)."""

    index_factory: str = "Flat"
    """Faiss index factory: Flat (exact), HNSW32, IVF1024,PQ16, ..."""
    search_params: str = ""
    """Faiss search parameters, e.g. nprobe=16 or efSearch=64."""


def export_run(
    run_dir: Path,
    bundle_root: Path,
    index_factory: str = ExportConfig.index_factory,
    search_params: str = ExportConfig.search_params,
    publish: bool = True,
    version: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the run's best checkpoint as a new bundle version; returns its directory."""
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
        index_factory=index_factory,
        search_params=search_params,
        version=version,
        publish=publish,
    )
