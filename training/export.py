"""Turn a training run into a retrieval bundle (see remi_core/bundle.py for the format)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from remi_core.bundle import write_bundle
from remi_core.index import RECALL_TARGET
from training.categories import read_categories
from training.run_dir import RunDir
from training.trainer import load_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """How a run becomes a bundle (the `export:` section of a config file)."""

    index_factory: str | None = None
    """Faiss index factory: Flat (exact), HNSW32, IVF1024,SQ8, ...; unset or empty: chosen by
    catalogue size (Flat up to remi_core.index.EXACT_MAX_ITEMS items, IVF with SQ8 codes above)."""
    search_params: str | None = None
    """Faiss search parameters, e.g. nprobe=16 or efSearch=64; unset or empty: the smallest
    nprobe or efSearch whose merged Eq. 7 recall on validation users reaches recall_target (on
    half of them, then confirmed on the other half)."""
    recall_target: float = RECALL_TARGET
    """Recall@n of the merged Eq. 7 list against exact search that tuning must reach."""
    categories: str = ""
    """Item categories for diverse lists: JSON {item_id: [attribute ids]} (each item gets its most
    widespread attribute) or CSV with item_id and --category-col columns, .gz allowed. Empty: none,
    and serving uses the interest that produced an item as its category."""
    category_col: str = "category"
    """Category column of a CSV --categories file."""

    def __post_init__(self) -> None:
        # An empty value (a blank environment variable in a template, `search_params: ""`) is
        # unset: given as is, "" exported an untuned IVF index (recall 0.53) or a Flat index
        # whatever the catalogue's size, as if someone had chosen them.
        for name in ("index_factory", "search_params"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                object.__setattr__(self, name, None)


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
    manifest's `index` section records the recall and the parameters). `export.categories`
    names an item-category file (training/categories.py) to ship in the bundle."""
    model, dataset, cfg = load_run(run_dir)
    item_categories = None
    if export.categories:
        item_categories = read_categories(
            Path(export.categories), dataset.item_ids, category_col=export.category_col
        )
    result = RunDir(run_dir).read_result()
    if not result:
        log.warning(
            "%s has not finished (no result.json): exporting its best checkpoint so far, "
            "without metrics in the manifest",
            run_dir,
        )
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
        index_factory=export.index_factory,
        search_params=export.search_params,
        tune_histories=[dataset.sequences[u] for u in dataset.users("valid")],
        recall_target=export.recall_target,
        version=version,
        publish=publish,
        categories=(item_categories.rows, item_categories.names) if item_categories else None,
    )
