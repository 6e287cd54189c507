"""Faiss inner-product indexes over a catalogue's item embeddings."""

from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Index position p holds catalogue row p + ROW_OFFSET: padding row 0 is never indexed, so it can
# never be recommended.
ROW_OFFSET = 1


def build_index(item_embeddings: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """Inner-product index over rows 1.. of item_embeddings (N, d).

    `factory` is a Faiss index-factory string: "Flat" (exact, the default), or for large
    catalogues e.g. "IVF1024,Flat", "HNSW32" or "IVF1024,PQ16".
    """
    vectors = np.ascontiguousarray(item_embeddings[ROW_OFFSET:], dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid Faiss index factory string {factory!r}: {exc}") from None
    try:
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
    except RuntimeError as exc:  # e.g. fewer training points than IVF lists
        raise ValueError(f"cannot build Faiss index {factory!r}: {exc}") from None
    return index


def apply_search_params(index: faiss.Index, params: str) -> None:
    """Set search-time parameters such as "nprobe=16" or "efSearch=128" (comma separated)."""
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise ValueError(f"invalid Faiss search parameters {params!r}: {exc}") from None


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and a GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_best_device(index: faiss.Index) -> tuple[faiss.Index, str]:
    """Move an index to GPU 0 when possible; returns the index and where it lives."""
    if not gpu_available():
        return index, "cpu"
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep the resources alive with the index
        return gpu_index, "gpu"
    except RuntimeError as exc:  # e.g. an index type without a GPU implementation
        log.warning("keeping the Faiss index on the CPU: %s", exc)
        return index, "cpu"
