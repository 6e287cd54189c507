"""Turn a training run into a retrieval bundle (see remi_core/bundle.py for the format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from remi_core.bundle import write_bundle
from training.categories import read_categories
from training.run_dir import RunDir
from training.trainer import load_run


@dataclass(frozen=True)
class ExportConfig:
    """How a run becomes a bundle (the `export:` section of a config file)."""

    index_factory: str = "Flat"
    """Faiss index factory: Flat (exact), HNSW32, IVF1024,PQ16, ..."""
    search_params: str = ""
    """Faiss search parameters, e.g. nprobe=16 or efSearch=64."""
    categories: str = ""
    """Item categories for diverse lists: JSON {item_id: [attribute ids]} (each item gets its most
    widespread attribute) or CSV with item_id and --category-col columns, .gz allowed. Empty: none,
    and serving uses the interest that produced an item as its category."""
    category_col: str = "category"
    """Category column of a CSV --categories file."""


def export_run(
    run_dir: Path,
    bundle_root: Path,
    index_factory: str = ExportConfig.index_factory,
    search_params: str = ExportConfig.search_params,
    publish: bool = True,
    version: str | None = None,
    extra: dict[str, Any] | None = None,
    categories: Path | None = None,
    category_col: str = ExportConfig.category_col,
) -> Path:
    """Write the run's best checkpoint as a new bundle version; returns its directory.

    `categories`: an item-category file (see training/categories.py) to ship in the bundle.
    """
    model, dataset, cfg = load_run(run_dir)
    item_categories = None
    if categories is not None:
        item_categories = read_categories(categories, dataset.item_ids, category_col=category_col)
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
        **({"categories": item_categories.summary()} if item_categories else {}),
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
        categories=(item_categories.rows, item_categories.names) if item_categories else None,
    )
